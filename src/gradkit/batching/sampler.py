"""A batch sampler whose batch size can grow between batches (progressive batching).

``AdaptiveBatchSampler`` is a ``torch.utils.data.Sampler`` of index lists, meant for
``DataLoader(dataset, batch_sampler=sampler)``. The batch size is read when each batch is
drawn, so a change made with :meth:`AdaptiveBatchSampler.set_batch_size` between two
batches applies to the next one (with ``num_workers > 0`` the DataLoader prefetches
``prefetch_factor * num_workers`` batches, which keep the old size).

Epoch semantics:

* each epoch is one permutation of ``range(n)`` (or ``range(n)`` in order when
  ``shuffle=False``), cut into consecutive batches, so every index appears exactly once;
* the last batch of an epoch holds what is left: it may be smaller than the batch size
  (``drop_last=False``, default) or is skipped (``drop_last=True``); a batch never spans two
  epochs;
* the permutation depends only on ``(seed, epoch)``; the epoch counter advances by one each
  time iteration starts (every ``iter(sampler)``, i.e. every pass over the DataLoader), or is
  set with :meth:`set_epoch` (as with ``DistributedSampler``);
* the batch size never decreases (:meth:`set_batch_size` refuses a smaller value).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from gradkit._checks import check_positive_int


class AdaptiveBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices with a batch size that may grow between batches.

    Args:
        data_source: the dataset (anything with ``len``) or its length as an int.
        batch_size: the initial batch size.
        shuffle: draw a fresh seeded permutation each epoch (default) or go in order.
        seed: seed of the permutations; two samplers with the same seed yield the same
            batches given the same batch-size changes.
        drop_last: skip the last, smaller batch of each epoch.
        max_batch_size: optional cap; :meth:`set_batch_size` clips to it.

    Usage (the two changed lines of a training script)::

        sampler = AdaptiveBatchSampler(train_set, batch_size=32, seed=0)
        loader = DataLoader(train_set, batch_sampler=sampler)  # was batch_size=32, shuffle=True
    """

    def __init__(self, data_source: Sized | int, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False,
                 max_batch_size: int | None = None) -> None:
        n = data_source if isinstance(data_source, int) else len(data_source)
        check_positive_int("dataset length", n)
        check_positive_int("batch_size", batch_size)
        if max_batch_size is not None:
            check_positive_int("max_batch_size", max_batch_size)
            if max_batch_size < batch_size:
                raise ValueError(f"Invalid max_batch_size value: {max_batch_size} (smaller than "
                                 f"batch_size={batch_size})")
        self.num_samples = n
        self._batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def set_batch_size(self, batch_size: int) -> int:
        """Use ``batch_size`` (clipped to ``max_batch_size``) from the next batch on.

        Returns the batch size now in use. Raises ``ValueError`` if it would shrink.
        """
        check_positive_int("batch_size", batch_size)
        if batch_size < self._batch_size:
            raise ValueError(f"the batch size never decreases: asked for {batch_size}, "
                             f"currently {self._batch_size}")
        if self.max_batch_size is not None:
            batch_size = min(batch_size, self.max_batch_size)
        self._batch_size = batch_size
        return batch_size

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of the next ``iter(sampler)``."""
        self.epoch = int(epoch)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + epoch) % (2**63))
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        self.epoch += 1
        order = self._order(epoch)
        start = 0
        while start < self.num_samples:
            stop = start + self._batch_size  # read now: the size may have changed
            if stop > self.num_samples and self.drop_last:
                return
            yield order[start:stop]
            start = stop

    def __len__(self) -> int:
        """Batches in one epoch at the CURRENT batch size (fewer if it grows mid-epoch)."""
        full, rest = divmod(self.num_samples, self._batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self._batch_size, "epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batch_size = int(state["batch_size"])
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
