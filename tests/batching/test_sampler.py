"""AdaptiveBatchSampler: exact epoch coverage, determinism, growth between batches,
drop_last, and use as a DataLoader batch_sampler."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradkit.batching import AdaptiveBatchSampler


def _epoch(sampler, grow=None):
    """Batches of one epoch; grow(batch_index) -> new batch size or None."""
    batches = []
    for i, batch in enumerate(sampler):
        batches.append(batch)
        if grow is not None and grow(i):
            sampler.set_batch_size(grow(i))
    return batches


def test_each_index_exactly_once_with_growth_and_partial_last_batch():
    sampler = AdaptiveBatchSampler(103, batch_size=4, seed=3)
    batches = _epoch(sampler, grow=lambda i: {2: 7, 5: 20}.get(i))
    sizes = [len(b) for b in batches]
    assert sizes[:3] == [4, 4, 4] and sizes[3:6] == [7, 7, 7] and set(sizes[6:-1]) == {20}
    assert sizes[:-1] == sorted(sizes[:-1]) and sizes[-1] <= 20
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(103))
    assert flat != list(range(103))  # shuffled


def test_drop_last_skips_only_the_short_tail():
    sampler = AdaptiveBatchSampler(10, batch_size=4, drop_last=True, shuffle=False)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(sampler) == 2
    keep = AdaptiveBatchSampler(10, batch_size=4, shuffle=False)
    assert list(keep) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(keep) == 3


def test_deterministic_given_seed_and_epochs_differ():
    a, b, c = (AdaptiveBatchSampler(50, 8, seed=s) for s in (1, 1, 2))
    ea1, ea2 = list(a), list(a)
    assert ea1 == list(b) and ea2 == list(b)
    assert ea1 != ea2  # new permutation each epoch
    assert ea1 != list(c)
    a.set_epoch(0)
    assert list(a) == ea1


def test_never_decreases_and_cap():
    s = AdaptiveBatchSampler(20, 4, max_batch_size=10)
    with pytest.raises(ValueError, match="never decreases"):
        s.set_batch_size(3)
    assert s.set_batch_size(64) == 10 and s.batch_size == 10


def test_state_dict_round_trip():
    s = AdaptiveBatchSampler(30, 4, seed=5)
    list(s)
    s.set_batch_size(6)
    t = AdaptiveBatchSampler(30, 4, seed=0)
    t.load_state_dict(s.state_dict())
    assert list(t) == list(s)


def test_dataloader_follows_changes_between_batches():
    ds = TensorDataset(torch.arange(40).float(), torch.arange(40))
    sampler = AdaptiveBatchSampler(ds, batch_size=3, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler)
    seen, sizes = [], []
    for i, (x, y) in enumerate(loader):
        sizes.append(len(x))
        seen.append(y)
        if i == 1:
            sampler.set_batch_size(10)
    assert sizes == [3, 3, 10, 10, 10, 4]
    assert sorted(torch.cat(seen).tolist()) == list(range(40))


def test_errors():
    with pytest.raises(ValueError, match="Invalid batch_size value: 0"):
        AdaptiveBatchSampler(10, 0)
    with pytest.raises(ValueError, match="max_batch_size"):
        AdaptiveBatchSampler(10, 8, max_batch_size=4)
    with pytest.raises(ValueError, match="dataset length"):
        AdaptiveBatchSampler([], 2)
