"""Cache tiling: an optional wrapper that runs an eager (foreach) step one cache-sized slice
of the parameters at a time.

One foreach op per step over all parameters streams the whole model from memory once per op;
run the whole step on a slice of about :data:`SLICE_BYTES` (large tensors cut into pieces of
whole rows, views, so in-place updates reach them) and every op after the first reads what the
previous op just wrote, from cache, and temporaries stay small. Kept because
``benchmarks/optimizer_step.py`` shows it pays on large tensors (regimes b and c); it only
regroups work, so it applies to updates that act row by row on the tensors it cuts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor

# tensors of more than CUT_ABOVE bytes are cut into pieces of about SLICE_BYTES
CUT_ABOVE = 1 << 20
SLICE_BYTES = 1 << 19


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _cut(group: Sequence[Tensor]) -> list[list[Tensor]] | None:
    """Row pieces (1-D: flat pieces) of the tensors in ``group``, alike; None to keep whole."""
    p = group[0]
    if _nbytes(p) <= CUT_ABOVE or not all(t.is_contiguous() for t in group):
        return None
    rows = p.shape[0] if p.ndim > 1 else p.numel()
    views = [t.view(rows, -1) if p.ndim > 1 else t.view(-1) for t in group]
    step = max(1, SLICE_BYTES * rows // _nbytes(p))
    return [[v[a:a + step] for v in views] for a in range(0, rows, step)]


def tiles(tensorlists: list[list[Tensor]], extras: list[list[object]],
          cuttable: Sequence[bool] | None = None,
          ) -> Iterator[tuple[list[list[Tensor]], list[list[object]]]]:
    """Slices ``(tensorlists, extras)`` of about :data:`SLICE_BYTES` each: tensor ``i`` of
    every list (``cuttable[i]``, default all) cut into pieces if large, each piece carrying
    tensor ``i``'s entry of every ``extras`` list."""
    lists: list[list[Tensor]] = [[] for _ in tensorlists]
    more: list[list[object]] = [[] for _ in extras]
    size = 0
    for i in range(len(tensorlists[0])):
        group = [ts[i] for ts in tensorlists]
        pieces = _cut(group) if cuttable is None or cuttable[i] else None
        for piece in pieces or [group]:
            if lists[0] and size + _nbytes(piece[0]) > SLICE_BYTES:
                yield lists, more
                lists, more, size = [[] for _ in tensorlists], [[] for _ in extras], 0
            for dst, t in zip(lists, piece):
                dst.append(t)
            for dst, extra in zip(more, extras):
                dst.append(extra[i])
            size += _nbytes(piece[0])
    if lists[0]:
        yield lists, more
