"""Autodiff building blocks shared by optimizers, curvature and instruments."""

from gradkit.autodiff.flat import FlatParams
from gradkit.autodiff.per_example import check_per_example_safe, per_example_grads

__all__ = ["FlatParams", "check_per_example_safe", "per_example_grads"]
