"""Data partitions of one task's training indices over P nodes (IID, Dirichlet(α), class round-robin).

Every scheme is seeded and returns disjoint index shards whose union is the task's training set.
:func:`partition_stats` gives the per-node class counts that methods log with each task.

- ``iid``: a seeded shuffle cut into P shards whose sizes differ by at most one.
- ``dirichlet``: for each class, node proportions p ~ Dir(α·1_P) (Hsu et al. 2019); the class's
  samples are cut by the cumulative proportions. Small α: each class sits on few nodes.
  Draws are repeated (up to 100 times) until every node holds ``min_per_node`` samples.
- ``round_robin``: DIMAT's non-IID split: the k-th class of the scenario's class order goes whole to
  node k mod P, so over the stream every node sees different classes and may see none of a task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from harness.core.errors import UserError

SCHEMES = ("iid", "dirichlet", "round_robin")


@dataclass
class Partition:
    """Shards of one task: ``shards[i]`` are node i's training indices (into the task's source)."""

    scheme: str
    shards: list[Tensor]

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.shards]


def _rng(seed: int, task_id: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(task_id), 7717])


def iid(indices: Tensor, n_nodes: int, rng: np.random.Generator) -> list[Tensor]:
    """Shuffle and cut into ``n_nodes`` near-equal shards."""
    order = torch.from_numpy(rng.permutation(len(indices)))
    return [indices[part] for part in torch.tensor_split(order, n_nodes)]


def dirichlet(
    indices: Tensor, labels: Tensor, n_nodes: int, alpha: float, rng: np.random.Generator, min_per_node: int = 1
) -> list[Tensor]:
    """Per class, node shares drawn from Dir(alpha); resampled until each node has ``min_per_node``."""
    classes = torch.unique(labels).tolist()
    by_class = [indices[labels == c] for c in classes]
    for _ in range(100):
        parts: list[list[Tensor]] = [[] for _ in range(n_nodes)]
        for idx in by_class:
            p = rng.dirichlet(np.full(n_nodes, alpha))
            perm = torch.from_numpy(rng.permutation(len(idx)))
            cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for node, piece in enumerate(np.split(perm.numpy(), cuts)):
                parts[node].append(idx[torch.from_numpy(piece)])
        shards = [torch.cat(p) if p else indices[:0] for p in parts]
        if min(len(s) for s in shards) >= min_per_node:
            return [s.sort().values for s in shards]
    raise UserError(
        f"Dirichlet(alpha={alpha}) left a node with fewer than {min_per_node} samples in 100 draws",
        "raise alpha, lower n_nodes, or use more samples per task",
    )


def round_robin(indices: Tensor, labels: Tensor, n_nodes: int, class_order: Sequence[int]) -> list[Tensor]:
    """Class k of ``class_order`` goes whole to node k mod P (DIMAT's non-IID split)."""
    owner = torch.full((int(max(class_order)) + 1,), -1, dtype=torch.long)
    for k, c in enumerate(class_order):
        owner[int(c)] = k % n_nodes
    node_of = owner[labels]
    if bool((node_of < 0).any()):
        raise ValueError("a label is missing from class_order")
    return [indices[node_of == i] for i in range(n_nodes)]


def partition_indices(
    indices: Tensor,
    labels: Tensor,
    n_nodes: int,
    scheme: str,
    *,
    seed: int,
    task_id: int = 0,
    alpha: float = 0.5,
    class_order: Sequence[int] | None = None,
    min_per_node: int = 1,
) -> Partition:
    """Split ``indices`` (with their ``labels``) over ``n_nodes`` by ``scheme``; seeded by (seed, task_id)."""
    if scheme not in SCHEMES:
        raise UserError(f"partition={scheme!r} is not one of {', '.join(SCHEMES)}", f"set partition to one of {SCHEMES}")
    if n_nodes < 1:
        raise UserError(f"n_nodes must be >= 1, got {n_nodes}", "use n_nodes=4 for example")
    rng = _rng(seed, task_id)
    if scheme == "iid":
        shards = iid(indices, n_nodes, rng)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise UserError(f"alpha must be > 0, got {alpha}", "use alpha=0.5 for example")
        shards = dirichlet(indices, labels, n_nodes, alpha, rng, min_per_node)
    else:
        order = list(class_order) if class_order is not None else sorted(torch.unique(labels).tolist())
        shards = round_robin(indices, labels, n_nodes, order)
    return Partition(scheme, shards)


def partition_stats(partition: Partition, targets: Tensor, num_classes: int) -> dict[str, object]:
    """Per-node sample and class counts plus a non-IID summary (mean largest class share per node)."""
    counts = torch.stack([torch.bincount(targets[s], minlength=num_classes) for s in partition.shards])
    sizes = counts.sum(1)
    share = counts.float() / sizes.clamp(min=1).unsqueeze(1).float()
    nonempty = sizes > 0
    return {
        "scheme": partition.scheme,
        "sizes": sizes.tolist(),
        "class_counts": counts.tolist(),
        "mean_max_class_share": float(share[nonempty].max(1).values.mean()) if bool(nonempty.any()) else 0.0,
        "empty_nodes": int((~nonempty).sum()),
    }


def task_class_order(task_classes: Sequence[Sequence[int]]) -> list[int]:
    """The scenario's class order: the tasks' classes concatenated (first appearance kept)."""
    seen: dict[int, None] = {}
    for cls in task_classes:
        for c in cls:
            seen.setdefault(int(c), None)
    return list(seen)
