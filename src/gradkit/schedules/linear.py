r"""Linear decay with linear warm-up, as a ``torch.optim.lr_scheduler.LRScheduler``.

With :math:`W` = ``warmup_steps``, :math:`T` = ``total_steps``, :math:`r` =
``final_lr_ratio`` and :math:`t` the number of ``scheduler.step()`` calls so far (the index
of the optimizer step about to be taken), each param group's lr is ``base_lr * f(t)``:

.. math::
    f(t) = \begin{cases}
        \dfrac{t + 1}{W + 1} & t < W \quad\text{(warm-up)} \\[1ex]
        1 - (1 - r)\,\dfrac{t - W}{T - 1 - W} & W \le t \le T - 1 \quad\text{(decay)} \\[1ex]
        r & t \ge T - 1
    \end{cases}

Defazio, Cutkosky, Mehta & Mishchenko, "When, Why and How Much? Adaptive Learning Rate
Scheduling by Refinement" (arXiv 2310.07831): linear decay :math:`\eta_t = \eta(1 - t/T)` is
the worst-case optimal schedule for the last iterate; it is also what
:func:`gradkit.schedules.refine_schedule` returns for constant gradient norms.

Choices: the decay reaches ``final_lr_ratio`` exactly at the LAST step taken (index
:math:`T-1`), as the refined schedule's :math:`\eta_T = 0` does, so with ``warmup_steps=0``
``LinearDecayLR`` equals :class:`gradkit.schedules.RefinedLR` on constant norms; the warm-up
starts at ``base_lr/(W+1)`` rather than 0 so that no step is wasted, and reaches the peak at
step :math:`W`.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class FactorLR(LRScheduler):
    """Base of closed-form schedulers: ``lr = base_lr * self.factor(step)`` per group."""

    def factor(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_lr(self) -> list:
        f = self.factor(max(self.last_epoch, 0))
        return [base_lr * f for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list:
        return self.get_lr()


def check_steps(total_steps: int, warmup_steps: int = 0) -> None:
    for name, value in (("total_steps", total_steps), ("warmup_steps", warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Invalid {name} value: {value!r} (must be a non-negative integer)")
    if total_steps < warmup_steps + 2:
        raise ValueError(
            f"Invalid total_steps value: {total_steps} (must be at least warmup_steps + 2 = "
            f"{warmup_steps + 2}: the decay needs a first and a last step)"
        )


class LinearDecayLR(FactorLR):
    """Linear warm-up to each group's lr, then linear decay to ``final_lr_ratio`` of it.

    Args:
        optimizer: wrapped optimizer (each param group keeps its own base lr).
        total_steps: number of optimizer steps in the run (T, at least ``warmup_steps + 2``).
        warmup_steps: W, steps of linear warm-up (0: start at the peak).
        final_lr_ratio: r in [0, 1], the lr of the last step as a fraction of the peak.
        last_epoch: as in torch's schedulers (for resuming).
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                 final_lr_ratio: float = 0.0, last_epoch: int = -1) -> None:
        check_steps(total_steps, warmup_steps)
        if not 0.0 <= final_lr_ratio <= 1.0:
            raise ValueError(f"Invalid final_lr_ratio value: {final_lr_ratio} (must be in [0, 1])")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.final_lr_ratio = float(final_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        w, t, r = self.warmup_steps, self.total_steps, self.final_lr_ratio
        if step < w:
            return (step + 1) / (w + 1)
        if step >= t - 1:
            return r
        return 1.0 - (1.0 - r) * (step - w) / (t - 1 - w)
