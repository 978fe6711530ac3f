"""Specialization of experts (docs/methods.md §4): routed-class distributions, entropies, usage.

p(c | M_i) ∝ Σ_{x: y(x)=c} g_i(x) with g the full softmax gates; H(M_i) = −Σ_c p(c|M_i) log p(c|M_i).
Computed from a C x N gate-mass matrix accumulated over validation batches, never the test split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from methods.dmkd.model import DMKDModel


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) along ``dim``; 0 log 0 = 0."""
    return -(p * p.clamp_min(1e-30).log()).sum(dim=dim)


def class_gate_mass(gates: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """C x N matrix: Σ over samples of class c of the gates g_i(x)."""
    return torch.zeros(num_classes, gates.shape[1], dtype=gates.dtype, device=gates.device).index_add_(0, y, gates)


def expert_entropies(mass: Tensor) -> Tensor:
    """H(M_i) for every expert from a C x N gate-mass matrix; an expert with no mass gets log C."""
    col = mass.sum(dim=0)
    p = mass / col.clamp_min(1e-30)
    h = entropy(p, dim=0)
    return torch.where(col > 0, h, torch.full_like(h, math.log(mass.shape[0])))


def specialization_scores(h: Tensor, num_classes: int) -> Tensor:
    """s_i = 1 − H(M_i)/log C in [0, 1] (1 = one class only)."""
    return (1.0 - h / math.log(num_classes)).clamp(0.0, 1.0)


@dataclass
class Specialization:
    """What is measured after a task: per-expert entropy and usage, gate entropy, the routing matrix."""

    mass: Tensor  # C x N gate mass
    counts: Tensor  # C x N top-K selections
    expert_entropy: Tensor  # N
    usage: Tensor  # N, share of samples that select expert i (sums to K)
    gate_entropy: float  # mean per-sample entropy of the full gates (nats)
    n_samples: int

    def routing_matrix(self) -> list[list[float]]:
        """p(expert | class) from gate mass, C x N (rows of unseen classes are zeros)."""
        rows = self.mass.sum(dim=1, keepdim=True)
        return (self.mass / rows.clamp_min(1e-30)).tolist()


@torch.no_grad()
def measure(model: DMKDModel, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int) -> Specialization:
    """Accumulate gates over the given (validation) batches."""
    n = model.n_experts
    mass = torch.zeros(num_classes, n, dtype=torch.float64)
    counts = torch.zeros(num_classes, n, dtype=torch.float64)
    gate_h = torch.zeros((), dtype=torch.float64)
    total = 0
    for x, y in batches:
        _, g = model.gates(x)
        _, idx = g.topk(model.top_k, dim=1)
        sel = torch.zeros_like(g).scatter_(1, idx, 1.0)
        yc = y.cpu()
        mass += class_gate_mass(g.double().cpu(), yc, num_classes)
        counts += class_gate_mass(sel.double().cpu(), yc, num_classes)
        gate_h += entropy(g.double()).sum().cpu()
        total += len(y)
    usage = counts.sum(dim=0) / max(total, 1)
    return Specialization(mass, counts, expert_entropies(mass), usage, float(gate_h) / max(total, 1), total)
