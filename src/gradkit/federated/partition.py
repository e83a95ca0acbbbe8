r"""Splitting a labelled dataset among federated clients.

Three schemes, all deterministic in ``seed`` and all leaving every client at least one sample:

* ``"iid"``: a shuffled, near-equal split;
* ``"dirichlet"``: Dirichlet(α) label skew: for each class c, proportions p ~ Dir(α·1_N) cut
  the class's shuffled indices among the N clients (smaller α = more skew). These two are
  :func:`gradkit.distributed.simulator.dirichlet_partition` (one owner for both);
* ``"quantity"``: quantity skew (NIID-Bench's scheme): client sizes follow proportions
  q ~ Dir(β·1_N) of the shuffled data, labels stay i.i.d. within each client.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gradkit.distributed import _validation as V
from gradkit.distributed.simulator import dirichlet_partition

__all__ = ["PARTITIONS", "partition", "quantity_skew_partition"]

PARTITIONS = ("iid", "dirichlet", "quantity")


def quantity_skew_partition(n_samples: int, n_clients: int, beta: float, seed: int
                            ) -> list[Tensor]:
    """Indices ``0..n_samples-1`` split into ``n_clients`` parts of Dirichlet(β) sizes.

    Each client first gets one sample; the other ``n_samples − N`` are divided by
    proportions q ~ Dir(β·1_N) (NumPy, seeded by ``seed``), rounded down, the remainder going
    to the largest fractional parts. The shuffled indices are then cut consecutively.
    """
    V.check_count("quantity_skew_partition", "n_clients", n_clients, minimum=1)
    beta = V.check_real("quantity_skew_partition", "beta", beta, positive=True)
    if n_samples < n_clients:
        raise ValueError(f"quantity_skew_partition: {n_samples} samples cannot be split "
                         f"among {n_clients} clients; use fewer clients")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_samples)
    q = rng.dirichlet(np.full(n_clients, beta))
    extra = q * (n_samples - n_clients)
    sizes = 1 + np.floor(extra).astype(int)
    short = n_samples - int(sizes.sum())
    sizes[np.argsort(-(extra - np.floor(extra)), kind="stable")[:short]] += 1
    cuts = np.cumsum(sizes)[:-1]
    return [torch.as_tensor(np.sort(part), dtype=torch.long) for part in np.split(perm, cuts)]


def partition(labels: Tensor, n_clients: int, scheme: str = "iid", *,
              alpha: float | None = None, beta: float | None = None, seed: int = 0
              ) -> list[Tensor]:
    """Sample indices of each client under ``scheme`` ("iid", "dirichlet", "quantity").

    Args:
        labels: the (n,) integer labels of the training data.
        n_clients: N, the number of clients.
        scheme: see the module docstring.
        alpha: the Dirichlet concentration of the label skew (``"dirichlet"``).
        beta: the Dirichlet concentration of the client sizes (``"quantity"``).
        seed: the seed of every random choice.
    """
    if scheme == "iid":
        return dirichlet_partition(labels, n_clients, None, seed)
    if scheme == "dirichlet":
        if alpha is None:
            raise ValueError("partition: scheme='dirichlet' needs alpha= (e.g. 0.5)")
        return dirichlet_partition(labels, n_clients, alpha, seed)
    if scheme == "quantity":
        if beta is None:
            raise ValueError("partition: scheme='quantity' needs beta= (e.g. 0.5)")
        return quantity_skew_partition(len(labels), n_clients, beta, seed)
    raise ValueError(f"Invalid partition scheme: {scheme!r} (one of {', '.join(PARTITIONS)})")
