r"""Who takes part in a round, and how the server weighs the updates it receives.

Participation models return a boolean mask over the N clients for round t, a pure function
of ``(seed, t)``:

* :class:`FullParticipation`: every client, every round;
* :class:`UniformSampling`: m of the N clients, uniformly without replacement;
* :class:`Bernoulli`: client n independently with probability p_n (heterogeneous p allowed;
  a round may have no participant, and is then a no-op).

Weighting rules map the mask to one weight ω_n per participant; the server applies
``x ← x + η_g · rule(rows ω_n·Δ_n)`` with the normalisation each rule states:

* ``"uniform"`` (FedAvg over the participants): ω_n = 1, normalised by |S_t|;
* ``"known"``: ω_n = 1/p_n, normalised by N — unbiased when p is known;
* :class:`FedAUWeights` (FedAU, Wang & Ji, ICLR 2024): ω_n estimated online as the mean
  interval between participations, normalised by N — for unknown p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradkit.distributed import _validation as V
from gradkit.distributed.simulator import worker_generator

__all__ = ["Bernoulli", "FedAUWeights", "FullParticipation", "UniformSampling"]

#: random stream of client selection (the simulator's streams are 0 and 1)
PARTICIPATION_STREAM = 2


class FullParticipation:
    """Every client in every round."""

    probabilities: Tensor | None = None

    def sample(self, n_clients: int, round: int, seed: int) -> Tensor:
        return torch.ones(n_clients, dtype=torch.bool)

    def __repr__(self) -> str:
        return "FullParticipation()"


class UniformSampling:
    """m of the N clients per round, uniformly without replacement (p_n = m/N).

    Args:
        clients_per_round: m (>= 1).
    """

    def __init__(self, clients_per_round: int):
        self.m = V.check_count("UniformSampling", "clients_per_round", clients_per_round,
                               minimum=1)
        self.probabilities = None

    def sample(self, n_clients: int, round: int, seed: int) -> Tensor:
        if self.m > n_clients:
            raise ValueError(f"UniformSampling: clients_per_round={self.m} exceeds the "
                             f"{n_clients} clients")
        gen = worker_generator(seed, 0, round, PARTICIPATION_STREAM)
        mask = torch.zeros(n_clients, dtype=torch.bool)
        mask[torch.randperm(n_clients, generator=gen)[:self.m]] = True
        return mask

    def __repr__(self) -> str:
        return f"UniformSampling(clients_per_round={self.m})"


class Bernoulli:
    """Client n takes part in round t with probability p_n, independently of the others.

    Args:
        probabilities: (N,) values in (0, 1]; one float = the same p for every client.
    """

    def __init__(self, probabilities: float | Sequence[float] | Tensor):
        p = torch.as_tensor(probabilities, dtype=torch.float64).reshape(-1)
        if p.numel() == 0 or not bool(((p > 0) & (p <= 1)).all()):
            raise ValueError(f"Invalid participation probabilities: {p.tolist()} "
                             "(each must be in (0, 1])")
        self.probabilities = p

    def sample(self, n_clients: int, round: int, seed: int) -> Tensor:
        p = self.probabilities
        if p.numel() == 1:
            p = p.expand(n_clients)
        elif p.numel() != n_clients:
            raise ValueError(f"Bernoulli: {p.numel()} probabilities for {n_clients} clients")
        gen = worker_generator(seed, 0, round, PARTICIPATION_STREAM)
        return torch.rand(n_clients, generator=gen, dtype=torch.float64) < p

    def __repr__(self) -> str:
        return f"Bernoulli(probabilities={self.probabilities.tolist()})"


class FedAUWeights:
    r"""FedAU's online aggregation weights under unknown participation probabilities.

    Per client n the server keeps c_n, the number of consecutive rounds it has been absent,
    and the running sum and count of the observed participation intervals I_n. In every
    round, for every client::

        if n participates:
            ω_n = mean(I_n) if I_n is non-empty else 1
            append c_n + 1 to I_n;  c_n ← 0      # used from the next participation on
        else:
            c_n ← c_n + 1
            if c_n ≥ K: append c_n to I_n;  c_n ← 0    # the cutoff truncates long absences

    and the server applies ``x ← x + η_g · (1/N) Σ_{n ∈ S_t} ω_n Δ_n`` (divided by all N
    clients). ω_n estimates 1/p_n; the weight used at a participation excludes the
    interval that ends there. With full participation every ω_n = 1 and FedAU is FedAvg.

    Matches the authors' code (``IBM/fedau``, ``weighting_method='adaptive'``), which keeps
    the list of intervals; here a running sum and count (O(1) memory per client).

    Args:
        n_clients: N.
        cutoff: K, the longest absence counted as one interval (default None = no cutoff,
            the reference's default of 100000).
    """

    def __init__(self, n_clients: int, cutoff: int | None = None):
        self.n = V.check_count("FedAUWeights", "n_clients", n_clients, minimum=1)
        if cutoff is not None:
            V.check_count("FedAUWeights", "cutoff", cutoff, minimum=1)
        self.cutoff = cutoff
        self.absent = torch.zeros(n_clients, dtype=torch.long)
        self.interval_sum = torch.zeros(n_clients, dtype=torch.float64)
        self.interval_count = torch.zeros(n_clients, dtype=torch.long)

    def update(self, participating: Tensor) -> Tensor:
        """Advance one round; returns the (N,) weights ω (meaningful for participants)."""
        part = torch.as_tensor(participating, dtype=torch.bool)
        if part.shape != (self.n,):
            raise ValueError(f"FedAUWeights: participation mask of shape {tuple(part.shape)},"
                             f" expected ({self.n},)")
        seen = self.interval_count > 0
        omega = torch.where(seen, self.interval_sum / self.interval_count.clamp(min=1),
                            torch.ones_like(self.interval_sum))
        # participants: close the interval c + 1
        self.interval_sum[part] += (self.absent[part] + 1).double()
        self.interval_count[part] += 1
        self.absent[part] = 0
        # the others: one more absent round, truncated at the cutoff
        self.absent[~part] += 1
        if self.cutoff is not None:
            cut = ~part & (self.absent >= self.cutoff)
            self.interval_sum[cut] += self.absent[cut].double()
            self.interval_count[cut] += 1
            self.absent[cut] = 0
        return omega

    def state_dict(self) -> dict[str, Tensor]:
        return {"absent": self.absent.clone(), "interval_sum": self.interval_sum.clone(),
                "interval_count": self.interval_count.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key in ("absent", "interval_sum", "interval_count"):
            setattr(self, key, state[key].clone())

    def __repr__(self) -> str:
        return f"FedAUWeights(n_clients={self.n}, cutoff={self.cutoff})"

