"""Drop-Muon: Muon that updates (and back-propagates through) a random suffix of layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradkit.optim._base import evaluate_closure
from gradkit.optim._registry import register
from gradkit.optim.muon import Muon

_RNG_KEY = "drop_muon_generator"


def drop_muon_layer_groups(layers: Any) -> list[dict[str, Any]]:
    """Parameter groups with a ``layer`` index (0 = input side) for :class:`DropMuon`.

    ``layers`` may be:

    * an ``nn.Module``: one layer per module that owns parameters directly, in
      ``model.modules()`` order (registration order, normally input -> output);
    * a list of lists of tensors: layer ``i`` is ``layers[i]``;
    * a flat iterable of tensors: one layer per tensor, in order;
    * ``model.named_parameters()`` (``(name, tensor)`` pairs): one layer per owning module
      (the name without its last component), in order, names kept as torch keeps them
      (``param_names`` in the groups and in ``state_dict``);
    * a list of param-group dicts: a dict's ``layer`` key if present, else the next index.

    Inside a layer, ≥2-D tensors form a Muon group and 0/1-D tensors an AdamW group
    (``use_muon=False``); dicts are kept as given. The same groups also build a plain
    :class:`~gradkit.optim.muon.Muon` (which ignores the ``layer`` key).
    """
    if isinstance(layers, nn.Module):
        layers = [
            [p for p in m.parameters(recurse=False) if p.requires_grad] for m in layers.modules()
        ]
        layers = [ps for ps in layers if ps]
    items = list(layers)
    if not items:
        raise ValueError("DropMuon got an empty list of layers")
    if all(isinstance(x, dict) for x in items):
        next_index = 0
        for group in items:
            group.setdefault("layer", next_index)
            next_index = max(next_index, group["layer"] + 1)
        return items
    if all(isinstance(x, Tensor) for x in items):
        items = [[x] for x in items]
    elif all(_is_named(x) for x in items):
        owners: dict[str, list[tuple[str, Tensor]]] = {}
        for name, p in items:
            owners.setdefault(name.rpartition(".")[0], []).append((name, p))
        items = list(owners.values())
    elif any(isinstance(x, (Tensor, dict)) for x in items):
        raise ValueError("DropMuon layers must be all tensors, all lists of tensors, or all "
                         "param-group dicts (not a mix)")
    groups = []
    for index, layer in enumerate(items):
        params = list(layer)
        matrices = [p for p in params if _tensor(p).ndim >= 2]
        others = [p for p in params if _tensor(p).ndim < 2]
        if matrices:
            groups.append({"params": matrices, "use_muon": True, "layer": index})
        if others:
            groups.append({"params": others, "use_muon": False, "layer": index})
    return groups


def _is_named(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], Tensor)


def _tensor(p: Tensor | tuple[str, Tensor]) -> Tensor:
    return p[1] if isinstance(p, tuple) else p


def _save_generator(optimizer: DropMuon, state_dict: dict) -> dict:
    state_dict[_RNG_KEY] = optimizer.generator.get_state()
    return state_dict


def _load_generator(optimizer: DropMuon, state_dict: dict) -> dict:
    state_dict = dict(state_dict)
    rng_state = state_dict.pop(_RNG_KEY, None)
    if rng_state is not None:
        optimizer.generator.set_state(rng_state)
    return state_dict


@register("dropmuon")
class DropMuon(Muon):
    r"""Drop-Muon: each step samples a cutoff layer and updates only the layers above it.

    .. math::
        \begin{aligned}
            &s_k \sim \mathcal{D} \text{ on } \{0, \dots, b-1\}
                \quad (\text{uniform by default}),\qquad S_k = \{s_k, \dots, b-1\}\\
            &i \notin S_k:\ M_i, X_i \text{ unchanged (bitwise; momentum is not decayed)}\\
            &i \in S_k:\ M_i \leftarrow \beta M_i + (1-\beta)\nabla_i f(X_k; \xi_k), \quad
                X_i \leftarrow X_i(1-\gamma_i\lambda) - \gamma_i\, \mathrm{NS5}(\cdot)
                \text{ (the Muon step)}
        \end{aligned}

    Paper: K. Gruntkowska et al., "Drop-Muon" (arXiv 2510.02239, 2025). No official code
    was found; this follows the algorithm as written, with
    Muon's momentum convention (β = 0.95 EMA; the paper's β is 1 − β here), per-layer step
    sizes through per-group ``lr``, and the paper's uniform index sampling as default. Layers
    are numbered from 0 (input side) to b−1 (output); the paper's s = 1 is cutoff 0 here.
    Under uniform sampling layer i is updated with probability (i+1)/b.

    Layers are the ``layer`` keys of the param groups (see :func:`drop_muon_layer_groups`,
    which turns a model, a list of per-layer parameter lists, or plain tensors into such
    groups). Within a layer, Muon groups and AdamW (``use_muon=False``) groups are frozen and
    updated together.

    **Real savings in backward.** Call :meth:`sample_cutoff` *before the forward pass*: it
    draws s and sets ``requires_grad=False`` on the frozen prefix, so autograd does not
    compute those gradients nor back-propagate below layer s. :meth:`step` updates the suffix
    and restores ``requires_grad``::

        opt = DropMuon(model, lr=0.02)        # or DropMuon([[l.weight, l.bias] for l in ...])
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            opt.sample_cutoff()               # freeze layers < s for this step
            loss_fn(model(x), y).backward()   # backward stops at layer s
            opt.step()                        # update layers >= s, unfreeze

    ``step(closure)`` samples (and freezes) before calling the closure, so the closure form
    saves the same work. A plain ``step()`` without a prior :meth:`sample_cutoff` still
    samples and updates only the suffix (correct, but the full backward was already paid).
    Frozen layers ignore their ``p.grad`` (stale gradients from earlier steps are harmless).
    :meth:`release_cutoff` drops a pending cutoff without stepping. ``last_cutoff`` is the
    cutoff used by the latest step (``(b − last_cutoff)/b`` of the layers were updated).

    Example (a point mass on cutoff 1: only the second layer is ever updated)::

        >>> import torch
        >>> from gradkit.optim import DropMuon
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2))
        >>> opt = DropMuon(model, lr=0.02, probs=[0.0, 1.0])
        >>> first = model[0].weight.detach().clone()
        >>> opt.zero_grad(set_to_none=True)
        >>> opt.sample_cutoff()
        1
        >>> model(torch.randn(5, 3)).sum().backward()
        >>> model[0].weight.grad is None  # the frozen prefix got no gradient
        True
        >>> opt.step()
        >>> torch.equal(model[0].weight, first), opt.last_cutoff
        (True, 1)

    Args:
        params: a model, ``model.named_parameters()`` (one layer per owning module),
            per-layer parameter lists, tensors, or groups with ``layer`` keys.
        lr (float, Tensor, optional): Muon learning rate (default: 0.02).
        momentum: momentum factor β (default: 0.95).
        nesterov: use the Nesterov-style update (default: True).
        ns_steps: number of Newton–Schulz iterations (default: 5).
        weight_decay: decoupled weight decay of the Muon groups (default: 0).
        probs: probabilities of the cutoffs 0..b−1 (length b, non-negative, summing to 1);
            None is uniform, a point mass on 0 gives plain Muon (default: None).
        seed: seed of the optimizer's own cutoff generator; None draws it from torch's
            global RNG, so ``torch.manual_seed`` makes runs reproducible. The generator state
            is part of ``state_dict`` (default: None).
        **muon_kwargs: keyword-only arguments of :class:`Muon` (``adamw_lr``, ``ns_dtype``,
            ``maximize``, ``foreach``, ...).
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        *,
        probs: Sequence[float] | Tensor | None = None,
        seed: int | None = None,
        **muon_kwargs: Any,
    ) -> None:
        super().__init__(drop_muon_layer_groups(params), lr, momentum, nesterov, ns_steps,
                         weight_decay, **muon_kwargs)
        indices = sorted({g["layer"] for g in self.param_groups})
        if indices != list(range(len(indices))):
            raise ValueError(f"Invalid layer indices {indices}: they must be 0..b-1")
        self.probs = self._check_probs(probs)
        self.generator = torch.Generator()
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator.manual_seed(seed)
        self.cutoff: int | None = None  # pending cutoff (drawn, step not taken yet)
        self.last_cutoff: int | None = None  # cutoff used by the latest step
        self._frozen: list[Tensor] = []
        self.register_state_dict_post_hook(_save_generator)
        self.register_load_state_dict_pre_hook(_load_generator)

    def __getstate__(self) -> dict[str, Any]:
        # keep the generator, probs and state_dict hooks through deepcopy / pickle
        return self.__dict__.copy()

    @property
    def num_layers(self) -> int:
        return 1 + max(g["layer"] for g in self.param_groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "layer" not in param_group:
            param_group["layer"] = self.num_layers if self.param_groups else 0
        super().add_param_group(param_group)

    def _check_probs(self, probs: Sequence[float] | Tensor | None) -> Tensor | None:
        if probs is None:
            return None
        vec = torch.as_tensor(probs, dtype=torch.float64).flatten().clone()
        b = self.num_layers
        if vec.numel() != b:
            raise ValueError(f"Invalid probs: expected {b} probabilities (one per layer), got "
                             f"{vec.numel()}")
        if not bool(torch.isfinite(vec).all()) or bool((vec < 0).any()):
            raise ValueError(f"Invalid probs: entries must be finite and >= 0, got {probs!r}")
        if not math.isclose(float(vec.sum()), 1.0, abs_tol=1e-6):
            raise ValueError(f"Invalid probs: entries must sum to 1, got sum {float(vec.sum())}")
        return vec

    # ---------------------------------------------------------------- cutoff
    def _draw(self) -> int:
        if self.probs is None:
            return int(torch.randint(self.num_layers, (1,), generator=self.generator).item())
        return int(torch.multinomial(self.probs, 1, generator=self.generator).item())

    def sample_cutoff(self) -> int:
        """Draw the cutoff s for the next step and freeze layers ``< s`` (``requires_grad``).

        Returns s (0-based index of the first layer that will be updated).
        """
        self.release_cutoff()
        self.cutoff = self._draw()
        for group in self.param_groups:
            if group["layer"] < self.cutoff:
                for p in group["params"]:
                    if p.requires_grad:
                        p.requires_grad_(False)
                        self._frozen.append(p)
        return self.cutoff

    def release_cutoff(self) -> None:
        """Forget a pending cutoff and restore ``requires_grad`` (to skip a step, e.g. after
        an exception in forward/backward). :meth:`step` does this itself."""
        self.cutoff = None
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []

    @torch.no_grad()
    def step(self, closure=None):
        if self.cutoff is None and closure is not None:
            self.sample_cutoff()
        try:
            loss = evaluate_closure(closure)
            cutoff = self._draw() if self.cutoff is None else self.cutoff
            self._update([g for g in self.param_groups if g["layer"] >= cutoff])
        finally:
            self.release_cutoff()
        self.last_cutoff = cutoff
        return loss

