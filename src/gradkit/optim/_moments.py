"""Adam-style first and second moment estimates, written once (loop and foreach forms).

    m_t = β1 m_{t-1} + (1 - β1) g_t        (computed as a lerp, like torch.optim.Adam)
    v_t = β2 v_{t-1} + (1 - β2) g_t²
"""

from __future__ import annotations

import torch
from torch import Tensor


def init_adam_state(state: dict, param: Tensor) -> None:
    """Lazily create torch's ``exp_avg`` / ``exp_avg_sq`` keys for ``param``."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def update_first_moment(exp_avgs: list[Tensor], grads: list[Tensor], beta1: float,
                        foreach: bool) -> None:
    if foreach:
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    else:
        for m, g in zip(exp_avgs, grads):
            m.lerp_(g, 1.0 - beta1)


def update_second_moment(exp_avg_sqs: list[Tensor], grads: list[Tensor], beta2: float,
                         foreach: bool) -> None:
    if foreach:
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    else:
        for v, g in zip(exp_avg_sqs, grads):
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def update_adam_moments(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor],
                        beta1: float, beta2: float, foreach: bool) -> None:
    update_first_moment(exp_avgs, grads, beta1, foreach)
    update_second_moment(exp_avg_sqs, grads, beta2, foreach)
