"""Argument checks shared by the torch.distributed and Ray runtimes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradkit.distributed import _validation as V


def check_byzantine(owner: str, byzantine: Sequence[int], attack: Any, n: int) -> list[int]:
    """The sorted Byzantine worker ids, after checking them against ``n`` workers and the attack.

    Raises ``ValueError`` for ids out of range or repeated, no honest worker left, Byzantine
    workers without an attack, and attacks the runtimes cannot reproduce (label flipping needs
    every honest worker's gradient on flipped labels: the simulator computes it).
    """
    ids = sorted(V.check_indices(owner, "byzantine", list(byzantine), n))
    if ids and attack is None:
        raise ValueError(f"{owner}: byzantine workers given but no attack; pass attack=, e.g. "
                         "gradkit.distributed.attacks.SignFlipping()")
    if getattr(attack, "needs_flipped_labels", False):
        raise ValueError(f"{owner}: {attack!r} needs every honest worker's gradient on flipped "
                         "labels, which the runtime does not compute; use the Simulator")
    if len(ids) >= n:
        raise ValueError(f"{owner}: every one of the {n} workers is Byzantine; keep at least "
                         "one honest worker")
    return ids
