"""Knowledge preservation at task boundaries (docs/methods.md §4): importance, salient sets, transfer.

Importance Ω per parameter: diagonal Fisher (methods.common.diagonal_fisher, empirical labels, on the
model's dense-masked forward, which equals the sparse one) accumulated over tasks (Ω ← Ω + Ω_t), or
the magnitude |θ| at the boundary. Salient set: per module (encoder, router, expert_i) the top p% of
its parameters by Ω. ``regularize`` adds λ_pres Σ_modules λ_i Σ_salient Ω̂ (θ − θ*)², with Ω̂ = Ω
divided by its median over the salient entries (robust to the heavy tail of Fisher values) and capped
at WEIGHT_CAP, so λ_pres means the same for Fisher and magnitude and plain SGD stays stable while
2·lr·λ_pres·WEIGHT_CAP < 2; λ_i = 1, or (1 − H(M_i)/log C) for experts when scaled by specialization.
Maps are keyed by the model's parameter names, so another node can select what to send.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from methods.common import diagonal_fisher
from methods.dmkd.model import DMKDModel

WEIGHT_CAP = 3.0  # largest normalised importance: the penalty's curvature is bounded by 2·λ_pres·WEIGHT_CAP


def module_of(param_name: str) -> str | None:
    """encoder / router / expert_i for a DMKDModel parameter name; None for autoencoders."""
    parts = param_name.split(".")
    if parts[0] == "experts":
        return f"expert_{parts[1]}"
    if parts[0] in ("encoder", "router"):
        return parts[0]
    return None


def preserved_parameters(model: DMKDModel) -> dict[str, nn.Parameter]:
    """Parameters that preservation protects (encoder, router, experts; not the autoencoders)."""
    return {n: p for n, p in model.named_parameters() if module_of(n) is not None}


def fisher_importance(model: DMKDModel, batches: Iterable[tuple[Tensor, Tensor]], max_samples: int,
                      class_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of every preserved parameter.

    When every preserved parameter belongs to an nn.Linear (encoder none/linear, mlp backbone) the
    per-sample squared gradients come in closed form from one forward/backward of the sparse model
    (each sample passes each Linear at most once; ``diagonal_fisher(per_sample="linear")``): the same
    Fisher as per-sample gradients up to float rounding, at the cost of one training step instead of
    a per-sample vmap over every expert. Otherwise vmap on the dense forward."""
    params = {n: p for n, p in preserved_parameters(model).items() if p.requires_grad}

    def forward(m: nn.Module, p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(m, p, (x,), {"dense": True})

    closed_form = all(isinstance(m, nn.Linear) or not any(True for _ in m.parameters(recurse=False))
                      for n, m in model.named_modules() if not n.startswith("autoencoders"))
    with torch.no_grad():  # torch.func.grad still differentiates w.r.t. ``params``; no outer graph is kept
        if closed_form:
            fisher = diagonal_fisher(model, batches, params=params, max_samples=max_samples,
                                     class_mask=class_mask, per_sample="linear")
        else:
            fisher = diagonal_fisher(model, batches, params=params, forward=forward, max_samples=max_samples,
                                     class_mask=class_mask)
    return {n: f.detach() for n, f in fisher.items()}


def magnitude_importance(model: DMKDModel) -> dict[str, Tensor]:
    return {n: p.detach().abs().clone() for n, p in preserved_parameters(model).items()}


def salient_masks(importance: dict[str, Tensor], p: float) -> dict[str, Tensor]:
    """Boolean masks of the top ``p`` share of each module's parameters by importance."""
    groups: dict[str, list[str]] = {}
    for name in importance:
        groups.setdefault(module_of(name) or "other", []).append(name)
    masks: dict[str, Tensor] = {}
    for names in groups.values():
        flat = torch.cat([importance[n].flatten() for n in names])
        k = max(1, math.ceil(p * flat.numel()))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        chosen[flat.topk(k).indices] = True
        start = 0
        for n in names:
            size = importance[n].numel()
            masks[n] = chosen[start : start + size].reshape(importance[n].shape)
            start += size
    return masks


@dataclass
class Preservation:
    """Accumulated importance, anchors θ*, salient masks and the penalty weights derived from them."""

    importance: dict[str, Tensor] = field(default_factory=dict)
    anchors: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)  # Ω̂ · mask · λ_i
    # Per parameter (shape, flat indices of its non-zero weights, those weights, their anchors): the
    # penalty touches only the salient entries (salient_p of them) instead of every parameter.
    _compact: dict[str, tuple[torch.Size, Tensor, Tensor, Tensor]] | None = field(
        default=None, init=False, repr=False, compare=False)

    def update(self, model: DMKDModel, new_importance: dict[str, Tensor], accumulate: bool, p: float,
               module_scale: dict[str, float] | None = None) -> None:
        """Fold in a boundary's importance, take anchors, recompute masks and weights."""
        for n, omega in new_importance.items():
            old = self.importance.get(n)
            self.importance[n] = omega + old if accumulate and old is not None and old.shape == omega.shape else omega
        params = preserved_parameters(model)
        self.importance = {n: v for n, v in self.importance.items() if n in params}
        self.anchors = {n: params[n].detach().clone() for n in self.importance}
        self.masks = salient_masks(self.importance, p)
        salient = torch.cat([self.importance[n][self.masks[n]] for n in self.importance])
        norm = salient.median().clamp_min(1e-30)
        scale = module_scale or {}
        self.weights = {n: (self.importance[n] / norm).clamp(max=WEIGHT_CAP) * self.masks[n]
                        * scale.get(module_of(n) or "", 1.0) for n in self.importance}
        self._compact = None

    def _compacted(self) -> dict[str, tuple[torch.Size, Tensor, Tensor, Tensor]]:
        if self._compact is None:
            self._compact = {}
            for n, w in self.weights.items():
                idx = w.reshape(-1).nonzero().squeeze(1)
                self._compact[n] = (w.shape, idx, w.reshape(-1).index_select(0, idx),
                                    self.anchors[n].reshape(-1).index_select(0, idx))
        return self._compact

    @torch.no_grad()
    def add_penalty_grad(self, model: DMKDModel, scale: float) -> Tensor:
        """Add scale · ∂penalty/∂θ = 2·scale·w(θ − θ*) to the parameters' .grad and return the penalty
        (detached): what backward of scale · penalty(model) does, without building its graph. Like that
        backward, every trainable preserved parameter ends with a gradient (zero outside its salient set)."""
        params = dict(model.named_parameters())
        total = torch.zeros((), device=next(model.parameters()).device)
        for n, (shape, idx, w, a) in self._compacted().items():
            p = params.get(n)
            if p is None or p.shape != shape or not p.requires_grad:
                continue
            diff = p.detach().reshape(-1).index_select(0, idx) - a
            wd = w * diff
            total = total + (wd * diff).sum()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.view(-1).index_add_(0, idx, wd, alpha=2.0 * scale)
        return total

    def penalty(self, model: DMKDModel) -> Tensor:
        """Σ_n weights_n (θ_n − θ*_n)² over the preserved parameters present in the model.

        Entries of zero weight add exactly zero, so only the non-zero ones are gathered (every
        parameter still gets a gradient, zero outside its salient set, as the dense form gives)."""
        params = dict(model.named_parameters())
        total = torch.zeros((), device=next(model.parameters()).device)
        for n, (shape, idx, w, a) in self._compacted().items():
            p = params.get(n)
            if p is not None and p.shape == shape:
                total = total + (w * (p.reshape(-1).index_select(0, idx) - a).pow(2)).sum()
        return total

    def on_expert_added(self, model: DMKDModel) -> None:
        """Pad router maps with zeros for the new row (a new expert has no importance yet)."""
        self._compact = None
        for maps in (self.importance, self.anchors, self.weights, self.masks):
            for n in ("router.weight", "router.bias"):
                if n in maps:
                    v = maps[n]
                    maps[n] = torch.cat([v, v.new_zeros(1, *v.shape[1:])])

    def on_expert_removed(self, i: int) -> None:
        """Drop expert i's maps, renumber the later experts and the router rows."""
        self._compact = None
        for maps in (self.importance, self.anchors, self.weights, self.masks):
            renamed: dict[str, Tensor] = {}
            for n, v in maps.items():
                parts = n.split(".")
                if parts[0] == "experts":
                    j = int(parts[1])
                    if j == i:
                        continue
                    if j > i:
                        n = ".".join(["experts", str(j - 1), *parts[2:]])
                elif parts[0] == "router":
                    v = torch.cat([v[:i], v[i + 1 :]])
                renamed[n] = v
            maps.clear()
            maps.update(renamed)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size()
                   for maps in (self.importance, self.anchors, self.masks, self.weights) for v in maps.values())

    def state(self) -> dict[str, dict[str, Tensor]]:
        return {"importance": self.importance, "anchors": self.anchors, "masks": self.masks, "weights": self.weights}

    def load(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.importance = dict(state.get("importance", {}))
        self.anchors = dict(state.get("anchors", {}))
        self.masks = dict(state.get("masks", {}))
        self.weights = dict(state.get("weights", {}))
        self._compact = None


def importance_histograms(importance: dict[str, Tensor], bins: int = 20) -> dict[str, dict[str, list[float]]]:
    """Per module, a histogram of log10(Ω) (Ω clamped at 1e-20): bin_edges and counts."""
    groups: dict[str, list[Tensor]] = {}
    for n, v in importance.items():
        groups.setdefault(module_of(n) or "other", []).append(v.detach().flatten().float().cpu())
    out: dict[str, dict[str, list[float]]] = {}
    for mod, vals in groups.items():
        logs = torch.cat(vals).clamp_min(1e-20).log10()
        lo, hi = float(logs.min()), float(logs.max())
        if hi <= lo:
            hi = lo + 1.0
        counts = torch.histc(logs, bins=bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, bins + 1)
        out[mod] = {"bin_edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}
    return out
