"""Benchmark suites: which workloads (with which sizes), how many trials and seeds.

Protocol per (workload, optimizer) *study*: the defaults trial plus ``n_trials`` quasi-random
configurations, all at seed ``seeds[0]``; the configuration that reaches the validation target
in the fewest steps (ties and misses broken by the best final validation metric) is selected
and rerun at every seed in ``seeds`` (its ``seeds[0]`` run is reused). Bump ``version`` when
a workload or the protocol changes: it is part of every trial key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradkit.errors import UsageError


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    workloads: tuple[str, ...]
    n_trials: int
    seeds: tuple[int, ...]
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    search_seed: int = 0
    description: str = ""


SUITES: dict[str, Suite] = {
    "quick": Suite(
        name="quick", version="1",
        workloads=("quadratic", "rosenbrock", "logreg", "mlp", "cnn", "char-lm"),
        n_trials=4, seeds=(0, 1, 2),
        description="6 small workloads incl. a character transformer LM, defaults + 4 "
                    "quasi-random trials, 3 seeds (minutes on a laptop CPU)",
    ),
    "full": Suite(
        name="full", version="1",
        workloads=("quadratic", "rosenbrock", "logreg", "mlp", "cnn", "char-lm",
                   "transformer"),
        n_trials=8, seeds=(0, 1, 2, 3, 4),
        overrides={
            "quadratic": {"steps": 1000, "eval_every": 20, "dim": 500},
            "rosenbrock": {"steps": 2000, "eval_every": 20, "dim": 100},
            "logreg": {"steps": 400},
            "mlp": {"steps": 800, "hidden": 128, "eval_every": 20},
            "cnn": {"steps": 800, "channels": 16, "eval_every": 20},
            "char-lm": {"steps": 600, "eval_every": 50, "layers": 2, "d_model": 64,
                        "context": 64, "target": 3.6},
        },
        description="7 workloads incl. a character LM and grokking, defaults + 8 "
                    "quasi-random trials, 5 seeds (hours on 2 CPU cores with 12 "
                    "optimizers; the transformers dominate)",
    ),
    "tiny": Suite(
        name="tiny", version="1",
        workloads=("quadratic", "logreg"),
        n_trials=2, seeds=(0, 1),
        overrides={
            "quadratic": {"steps": 20, "eval_every": 5, "dim": 10, "target": 0.5},
            "logreg": {"steps": 20, "eval_every": 5, "target": 0.9},
        },
        description="smoke test: 2 workloads, defaults + 2 trials, 2 seeds, 20 steps",
    ),
}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise UsageError(f"unknown suite {name!r}; valid: {', '.join(SUITES)}") from None
