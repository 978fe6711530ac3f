"""Continual-learning metrics as pure functions of the accuracy matrix (docs/methods.md §1).

``R[k][j]`` is the accuracy on task j after training task k (T x T, 0-based). ``b[j]`` is the
accuracy of the randomly initialised model on task j (needed by FWT only).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _matrix(R: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {m.shape}")
    return m


def final_average_accuracy(R) -> float:
    """A_T = (1/T) Σ_j R[T][j]: mean accuracy over all tasks after the last task."""
    m = _matrix(R)
    return float(m[-1].mean())


def average_incremental_accuracy(R) -> float:
    """(1/T) Σ_k A_k with A_k = (1/k) Σ_{j<=k} R[k][j]."""
    m = _matrix(R)
    T = m.shape[0]
    return float(np.mean([m[k, : k + 1].mean() for k in range(T)]))


def forgetting(R) -> float:
    """Chaudhry et al. 2018: mean over j<T of max_{j<=l<T} R[l][j] - R[T][j] (0 when T == 1)."""
    m = _matrix(R)
    T = m.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([m[j : T - 1, j].max() - m[T - 1, j] for j in range(T - 1)]))


def backward_transfer(R) -> float:
    """Lopez-Paz & Ranzato 2017: (1/(T-1)) Σ_{i<T} R[T][i] - R[i][i] (0 when T == 1)."""
    m = _matrix(R)
    T = m.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([m[T - 1, i] - m[i, i] for i in range(T - 1)]))


def forward_transfer(R, b: Sequence[float]) -> float:
    """(1/(T-1)) Σ_{i>=2} R[i-1][i] - b_i, b_i the random-init accuracy on task i."""
    m = _matrix(R)
    T = m.shape[0]
    bb = np.asarray(b, dtype=float)
    if bb.shape != (T,):
        raise ValueError(f"b must have one entry per task ({T}), got {bb.shape}")
    if T == 1:
        return 0.0
    return float(np.mean([m[i - 1, i] - bb[i] for i in range(1, T)]))


def summary(R, b: Sequence[float] | None = None) -> dict[str, float]:
    """All metrics of one accuracy matrix, keyed by their report names."""
    out = {
        "final_avg_acc": final_average_accuracy(R),
        "avg_inc_acc": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
    }
    if b is not None:
        out["fwt"] = forward_transfer(R, b)
    return out
