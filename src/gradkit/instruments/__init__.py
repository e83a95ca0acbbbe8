"""Training-dynamics instruments and the :class:`Monitor` that runs them in a training loop.

Each quantity is a standalone function (``coherence``, ``noise_scale_per_example``,
``neural_collapse``, ``sharpness``, ...) and an :class:`Instrument` with a schedule
(``Coherence``, ``NoiseScale``, ``NeuralCollapse``, ``Sharpness``, ...). ``plot(run, png)``
draws a dashboard of a recorded run. Names are imported lazily, so importing
``gradkit.instruments.cli`` (the ``gradkit plot`` command) loads neither torch nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "basic": ["global_norm", "layer_norms", "layer_update_ratios", "max_abs_logit",
              "nlm_alignment", "per_example_losses", "softmax_collapse_fraction",
              "update_ratio", "update_size", "zero_loss_fraction"],
    "collapse": ["neural_collapse"],
    "core": ["Instrument", "StepContext"],
    "gradients": ["GradientMoments", "NoiseScaleEMA", "coherence", "gradient_moments",
                  "gradient_snr", "noise_scale_per_example", "noise_scale_two_batch"],
    "library": ["Coherence", "GradNorm", "GradientSNR", "GradientTests", "HessianTrace",
                "LayerGradNorms", "LogitStats", "Loss", "NLMAlignment", "NeuralCollapse",
                "NoiseScale", "OpposingSignals", "PreconditionedSharpness", "Sharpness",
                "UpdateSize", "default_instruments"],
    "monitor": ["Monitor", "StepHandle"],
    "opposing": ["opposing_signals"],
    "dashboard": ["plot"],
    "records": ["RunWriter", "load_run", "load_runs"],
    "stability": ["adam_preconditioner_sqrt_inv", "adam_threshold", "gd_threshold",
                  "heavy_ball_threshold", "hessian_trace", "preconditioned_sharpness",
                  "sharpness", "stability_threshold"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
