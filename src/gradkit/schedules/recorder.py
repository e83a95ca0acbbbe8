"""Record the global gradient norm (ℓ2 and ℓ1) at every step, to refine the next schedule.

Usage::

    recorder = GradNormRecorder()
    recorder.attach(optimizer)          # records just before every optimizer.step()
    ... train ...
    recorder.save("norms.json")         # or .npy
    schedule = refine_schedule(GradNormRecorder.load("norms.json"), norm="l2")

or call ``recorder.record()`` yourself after ``loss.backward()``. The recorder only reads
``p.grad`` (never modifies gradients, parameters or the optimizer). It sees the gradients as
they are when it runs: attached to the optimizer, that is after any clipping done before
``optimizer.step()``; call ``record()`` before clipping to log raw norms. A step where no
parameter has a gradient is logged as NaN (``refine_schedule`` drops non-finite values).
Norms are kept as tensors and converted to floats only when read, so recording does not
synchronise with an accelerator.

One computation, two front ends: the norm itself is
:func:`gradkit.instruments.basic.global_norm_tensor`, which the Monitor's ``GradNorm``
instrument uses too. The recorder stays a separate front end because schedule refinement
needs what a Monitor does not give: every optimizer step without exception (a step
pre-hook, so after any gradient clipping), the ℓ1 norm as well, no synchronisation with the
device at each step, and a plain array to save and pass to :func:`refine_schedule`. The
Monitor's ``grad_norm`` is a scheduled, stored diagnostic next to the other instruments.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from gradkit.instruments.basic import global_norm_tensor

NormKind = Literal["l2", "l1"]


class GradNormRecorder:
    """Logs ``(||g||_2, ||g||_1)`` of the concatenated gradient of some parameters per call.

    Args:
        params: a module or an iterable of parameters to watch; ``None`` takes the
            parameters of the optimizer given to :meth:`attach` (read at every record, so
            param groups added later are included).
    """

    def __init__(self, params: nn.Module | Iterable[Tensor] | None = None) -> None:
        if isinstance(params, nn.Module):
            params = params.parameters()
        self._params: list[Tensor] | None = None if params is None else list(params)
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: list[Tensor] = []
        self._values = np.zeros((0, 2), dtype=np.float64)

    # ------------------------------------------------------------------ recording
    def _watched(self) -> list[Tensor]:
        if self._params is not None:
            return self._params
        if self._optimizer is not None:
            return [p for g in self._optimizer.param_groups for p in g["params"]]
        raise RuntimeError("this recorder watches no parameters: create it with "
                           "GradNormRecorder(model) or call attach(optimizer) first")

    @torch.no_grad()
    def record(self) -> None:
        """Append the current global gradient norms (read from ``p.grad``)."""
        grads = [p.grad for p in self._watched() if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("GradNormRecorder does not support sparse gradients; record "
                               "the norms of g.to_dense() yourself")
        if not grads:
            self._pending.append(torch.full((2,), math.nan, dtype=torch.float64))
            return
        self._pending.append(torch.stack([global_norm_tensor(grads, 2),
                                          global_norm_tensor(grads, 1)]))

    __call__ = record

    def attach(self, optimizer: torch.optim.Optimizer):
        """Record before every ``optimizer.step()``; returns the removable hook handle."""
        self._optimizer = optimizer
        return optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.record())

    # ------------------------------------------------------------------ reading
    def _table(self) -> np.ndarray:
        if self._pending:
            new = torch.stack(self._pending).cpu().numpy()
            self._values = np.concatenate([self._values, new])
            self._pending = []
        return self._values

    def norms(self, norm: NormKind = "l2") -> np.ndarray:
        """The recorded ``"l2"`` or ``"l1"`` norms, one per step (a copy)."""
        if norm not in ("l2", "l1"):
            raise ValueError(f"Invalid norm: {norm!r} (use 'l2' or 'l1')")
        return self._table()[:, 0 if norm == "l2" else 1].copy()

    @property
    def l2(self) -> list[float]:
        return self.norms("l2").tolist()

    @property
    def l1(self) -> list[float]:
        return self.norms("l1").tolist()

    def __len__(self) -> int:
        return len(self._table())

    def clear(self) -> None:
        self._pending = []
        self._values = np.zeros((0, 2), dtype=np.float64)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """``.json``: ``{"l2": [...], "l1": [...]}``; ``.npy``: a (T, 2) array [l2, l1]."""
        path = Path(path)
        table = self._table()
        if path.suffix == ".json":
            data = {"l2": table[:, 0].tolist(), "l1": table[:, 1].tolist()}
            path.write_text(json.dumps(data))  # NaN is written as the JSON token NaN
        elif path.suffix == ".npy":
            np.save(path, table)
        else:
            raise ValueError(f"unsupported file type {path.suffix!r}: use .json or .npy")

    @classmethod
    def load(cls, path: str | Path) -> GradNormRecorder:
        """A recorder holding the norms saved by :meth:`save` (attach it to keep recording)."""
        path = Path(path)
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            table = np.column_stack([np.asarray(data["l2"], dtype=np.float64),
                                     np.asarray(data["l1"], dtype=np.float64)])
        elif path.suffix == ".npy":
            table = np.asarray(np.load(path), dtype=np.float64)
        else:
            raise ValueError(f"unsupported file type {path.suffix!r}: use .json or .npy")
        if table.ndim != 2 or table.shape[1] != 2:
            raise ValueError(f"{path} does not hold a (T, 2) table of [l2, l1] norms")
        rec = cls()
        rec._values = table.reshape(-1, 2)
        return rec
