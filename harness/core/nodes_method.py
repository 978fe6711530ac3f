"""The building blocks of every method on the nodes API (FedAvg, DIMAT, WA, decentralized DMKD).

:class:`NodesParams` are the options of a method that trains on P nodes; :class:`NodesMethod` holds
what such methods share: the nodes object, per-task partitions, one random stream per node and the
local training loop of a round. They live in the core so that a nodes method imports only the core.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import require
from harness.core.context import RunContext
from harness.core.data import Task
from harness.core.defaults import documented
from harness.core.errors import UserError
from harness.core.memory import check_allocation
from harness.core.method import HParams, Method
from harness.core.nodes import BACKENDS, FAULT_POLICIES, Nodes, make_nodes, node_generator, using_generator
from harness.core.partition import SCHEMES, partition_indices, partition_stats, task_class_order


@dataclass
class NodesParams(HParams):
    """Options of a method that trains on P nodes; each field documents its default and source
    (``dmkd list --method fedavg``). The budget: E may be a fraction of an epoch: each node's training
    stream for the task (R·E passes over its shard, reshuffled every pass) is cut into R consecutive
    pieces of equal batch count, one per round; an explicit E with R·E != epochs is refused unless
    free_budget=true (the run's measured passes_per_task then shows its real budget)."""

    n_nodes: int = documented(4, "P, the number of nodes (clients / agents)",
                              "ours: a small P that runs on a laptop (DIMAT's code defaults to 5 agents)", ge=1)
    topology: str = documented("full", "full | ring | star | adj:0-1,1-2 (explicit edges)",
                               "DIMAT (Saadati et al. 2024): fully connected and ring topologies")
    partition: str = documented("iid", "iid | dirichlet | round_robin (class k to node k mod P)",
                                "McMahan et al. 2017 (IID and pathological non-IID); Hsu et al. 2019 (Dirichlet)",
                                choices=SCHEMES)
    dirichlet_alpha: float = documented(0.5, "Dirichlet concentration of the dirichlet partition (small = non-IID)",
                              "Hsu et al. 2019 / common FL benchmarks: α = 0.5", gt=0)
    rounds: int = documented(3, "R, communication rounds per task",
                             "ours: 3 rounds per task; R·E = epochs keeps the budget (docs/methods.md §6)", ge=1)
    local_epochs: float = documented(
        0.0, "E, local epochs per round; 0 = epochs / R (a fraction of an epoch when R > epochs)",
        "docs/methods.md §6: R·E = the protocol's epochs (McMahan et al. 2017 use E in 1..20 without a budget)", ge=0)
    free_budget: bool = documented(False, "allow R·E != the protocol's epochs (an off-budget run)",
                                   "ours: off by default so that every row spends the same budget")
    backend: str = documented("inprocess", "inprocess (one process, deterministic) | distributed (torchrun)",
                              "ours (harness option)", choices=BACKENDS)
    round_timeout_s: float = documented(300.0, "seconds a round waits for a node", "ours (harness option)", gt=0)
    on_fault: str = documented("drop", "drop (finish the round with the nodes that answered) | stop",
                               "ours (harness option)", choices=FAULT_POLICIES)
    simulate_fault: str = documented("", "in-process only: node@round makes that node stop answering",
                                     "ours (test option)")

    def validate(self) -> None:
        self.faults()

    def faults(self) -> dict[int, int]:
        if not self.simulate_fault:
            return {}
        out = {}
        for item in self.simulate_fault.split(","):
            node, _, rnd = item.partition("@")
            ok = node.strip().isdigit() and rnd.strip().isdigit() and int(node) < self.n_nodes
            require(ok, f"simulate_fault={self.simulate_fault!r} is not node@round[,node@round] with node < n_nodes",
                    "write e.g. simulate_fault=2@3")
            out[int(node)] = int(rnd)
        require(self.backend == "inprocess", "simulate_fault works with the inprocess backend only",
                 "drop simulate_fault or use backend=inprocess")
        return out


def round_schedule(rounds: int, local_epochs: float, epochs: int, free_budget: bool) -> float:
    """E, the local epochs per round: ``local_epochs`` or, when it is 0, epochs / rounds.

    Raises a UserError when R·E differs from the protocol's epochs and ``free_budget`` is off."""
    e = float(local_epochs) if local_epochs else epochs / rounds
    if not free_budget and not math.isclose(rounds * e, epochs, rel_tol=1e-9):
        raise UserError(
            f"rounds x local_epochs = {rounds} x {local_epochs:g} = {rounds * e:g} passes per task, but the "
            f"protocol's budget is epochs={epochs}",
            f"leave local_epochs=0 (= epochs / rounds), set rounds x local_epochs = {epochs}, "
            "or free_budget=true for an off-budget run")
    return e


def round_batch_counts(total_batches: int, rounds: int) -> list[int]:
    """Split ``total_batches`` into ``rounds`` consecutive pieces whose sizes differ by at most one."""
    return [(r + 1) * total_batches // rounds - r * total_batches // rounds for r in range(rounds)]


def check_node_count(n_nodes: int, ctx: RunContext) -> None:
    """Before anything is allocated: no more nodes than the smallest task has training samples (a
    node without data learns nothing), and the nodes' models (weights, gradients and optimiser
    state) and the n x n topology fit the memory of the run's device."""
    fewest = min(len(t.train_idx) for t in ctx.scenario.tasks)
    if n_nodes > fewest:
        raise UserError(f"n_nodes={n_nodes} is more nodes than the {fewest:,} training samples of the smallest "
                        "task; each node needs samples of its own", f"use n_nodes <= {fewest}, e.g. 4")
    model = ctx._model_factory()  # on the CPU, the RNG untouched
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    check_allocation(f"n_nodes={n_nodes} ({n_nodes:,} models of {model_bytes:,} bytes with gradients and "
                     "optimiser state, and the topology)", 3 * n_nodes * model_bytes + n_nodes**2, ctx.device,
                     "use fewer nodes, e.g. n_nodes=4")


class NodesMethod(Method):
    """Shared machinery of methods on the nodes API (not registered itself)."""

    hp: NodesParams

    def __init__(self, hp: NodesParams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        check_node_count(hp.n_nodes, ctx)
        self.nodes: Nodes = ctx.nodes if ctx.nodes is not None else make_nodes(
            hp.backend, hp.n_nodes, hp.topology, round_timeout_s=hp.round_timeout_s, on_fault=hp.on_fault,
            faults=hp.faults())
        require(self.nodes.n_nodes == hp.n_nodes, f"the run's nodes have {self.nodes.n_nodes} nodes, n_nodes is "
                f"{hp.n_nodes}", "make n_nodes match the number of processes")
        self.gens = {i: node_generator(ctx.seed, i) for i in self.nodes.local_ids}
        self.shards: dict[int, torch.Tensor] = {}
        self.class_order = task_class_order([t.classes for t in ctx.scenario.tasks])
        ctx.artifacts["node_events"] = self.nodes.events
        ctx.artifacts.setdefault("partition", {})
        rounds, local_epochs = hp.rounds, hp.local_epochs
        self.local_epochs = round_schedule(rounds, local_epochs, ctx.protocol.epochs, getattr(hp, "free_budget", False))
        self._streams: dict[int, tuple[Iterator, list[int]]] = {}
        self._round_of: dict[int, int] = {}

    def before_task(self, task: Task) -> None:
        """Partition the task over the nodes (same seed on every rank) and log its statistics."""
        labels = task.source.targets[task.train_idx]
        part = partition_indices(task.train_idx, labels, self.hp.n_nodes, self.hp.partition, seed=self.ctx.seed,
                                 task_id=task.id, alpha=self.hp.dirichlet_alpha, class_order=self.class_order)
        self.shards = dict(enumerate(part.shards))
        self.ctx.artifacts["partition"][str(task.id)] = partition_stats(part, task.source.targets,
                                                                        self.ctx.num_classes)
        self._streams, self._round_of = {}, {}

    def round_batches(self, task: Task, node: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The node's batches of its next round: the next of R equal pieces of its task stream.

        The stream is R·E passes over the node's shard through ``ctx.train_batches`` (counted), drawn
        with the node's own generator; call it inside ``using_generator(ctx, gens[node])``."""
        if node not in self._streams:
            per_pass = math.ceil(len(self.shards[node]) / self.ctx.protocol.batch_size)
            total = round(self.hp.rounds * self.local_epochs * per_pass)
            passes = max(1, math.ceil(total / max(per_pass, 1)))
            stream = self.ctx.train_batches(task, indices={task.id: self.shards[node]}, epochs=passes)
            self._streams[node] = (stream, round_batch_counts(total, self.hp.rounds))
            self._round_of[node] = 0
        stream, counts = self._streams[node]
        r = self._round_of[node]
        self._round_of[node] = r + 1
        return itertools.islice(stream, counts[r] if r < len(counts) else 0)

    def local_train(self, model: nn.Module, task: Task, node: int) -> None:
        """One round of local training: E local epochs (this round's piece of the node's task stream,
        see :meth:`round_batches`) of cross-entropy, fresh optimiser from the protocol."""
        shard = self.shards[node]
        if len(shard) == 0:
            return
        model.train()
        opt = self.ctx.make_optimizer([p for p in model.parameters() if p.requires_grad])
        with using_generator(self.ctx, self.gens[node]):
            for x, y in self.round_batches(task, node):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                self.ctx.backward(loss)
                self.ctx.step(opt)

    def record_communication(self) -> None:
        nbytes, rounds = self.nodes.meter.take()
        self.ctx.add_communication(nbytes, rounds)

    def extra_state(self) -> dict[str, Any]:
        return {"gens": {i: g.get_state() for i, g in self.gens.items()}, "round": self.nodes.round}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for i, s in state.get("gens", {}).items():
            if i in self.gens:
                self.gens[i].set_state(s)
        self.nodes.round = state.get("round", 0)
