"""Adaptive batch sizes: AdAdaGrad's batch-size tests, a controller, a growing batch sampler,
and the learning-rate-vs-batch-size rules.

* :mod:`.statistics` — norm, inner-product, orthogonality, augmented and coordinate-wise
  tests from per-example gradients (functional API, reusable by instruments);
* :class:`AdaptiveBatchSize` — runs a test on the current batch and grows the batch size;
* :class:`AdaptiveBatchSampler` — the ``batch_sampler`` of a standard ``DataLoader``;
* :func:`scale_lr` — linear / square-root lr scaling with the batch size.
"""

from gradkit.batching.controller import AdaptiveBatchSize
from gradkit.batching.lr_scaling import default_lr_rule, lr_scale_factor, scale_lr
from gradkit.batching.sampler import AdaptiveBatchSampler
from gradkit.batching.statistics import (
    TESTS,
    BatchSizeDecision,
    GradientStatistics,
    augmented_inner_product_test,
    coordinate_test,
    gradient_statistics,
    inner_product_test,
    norm_test,
    orthogonality_test,
    run_test,
)

__all__ = [
    "TESTS",
    "AdaptiveBatchSampler",
    "AdaptiveBatchSize",
    "BatchSizeDecision",
    "GradientStatistics",
    "augmented_inner_product_test",
    "coordinate_test",
    "default_lr_rule",
    "gradient_statistics",
    "inner_product_test",
    "lr_scale_factor",
    "norm_test",
    "orthogonality_test",
    "run_test",
    "scale_lr",
]
