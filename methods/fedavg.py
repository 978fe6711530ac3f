"""FedAvg, continual (McMahan et al. 2017; METHODS.md §3), on the nodes API.

Each task's training data is split over P clients (``partition``: iid | dirichlet | round_robin).
Per task, R rounds; per round a seeded sample of max(1, round(C·P)) clients trains E local epochs
from the server weights (fresh optimiser from the protocol each round) and the server averages the
floating state (parameters and BatchNorm statistics) weighted by client sample counts.
``predict`` evaluates the server model. Bytes = 2 x |θ| x 4 per participating client per round.

:class:`NodesMethod` holds what every method on the nodes API shares (DIMAT imports it): options,
the nodes object, per-task partitions, one random stream per node and the local training loop.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.api import HParams, Method, RunContext, Task, check_finite, choice, register, require
from harness.nodes import BACKENDS, FAULT_POLICIES, Nodes, make_nodes, node_generator, using_generator
from harness.partition import SCHEMES, partition_indices, partition_stats, task_class_order


@dataclass
class NodesParams(HParams):
    """Options of a method that trains on P nodes.

    n_nodes: P. topology: full | ring | star | adj:0-1,1-2 (explicit edges).
    partition: iid | dirichlet | round_robin; alpha: Dirichlet concentration (small = non-IID).
    rounds: R communication rounds per task; local_epochs: E epochs of local data per round.
    backend: inprocess (one process, deterministic) | distributed (torchrun, one rank per node).
    round_timeout_s: how long a round waits for a node; on_fault: drop (finish the round with the
    nodes that answered) | stop (one-line error, resume from the last task checkpoint).
    simulate_fault: in-process only, ``node@round`` makes that node stop answering from that round.
    """

    n_nodes: int = 4
    topology: str = "full"
    partition: str = "iid"
    alpha: float = 0.5
    rounds: int = 3
    local_epochs: int = 1
    backend: str = "inprocess"
    round_timeout_s: float = 300.0
    on_fault: str = "drop"
    simulate_fault: str = ""

    def validate(self) -> None:
        require(self.n_nodes >= 1, f"n_nodes must be >= 1, got {self.n_nodes}", "use n_nodes=4 for example")
        require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}", "use rounds=3 for example")
        require(self.local_epochs >= 1, f"local_epochs must be >= 1, got {self.local_epochs}", "use local_epochs=1")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}", "use alpha=0.5 for example")
        require(self.round_timeout_s > 0, "round_timeout_s must be > 0", "use round_timeout_s=300 for example")
        choice(self.partition, SCHEMES, "partition")
        choice(self.backend, BACKENDS, "backend")
        choice(self.on_fault, FAULT_POLICIES, "on_fault")
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


class NodesMethod(Method):
    """Shared machinery of methods on the nodes API (not registered itself)."""

    hp: NodesParams

    def __init__(self, hp: NodesParams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
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

    def before_task(self, task: Task) -> None:
        """Partition the task over the nodes (same seed on every rank) and log its statistics."""
        labels = task.source.targets[task.train_idx]
        part = partition_indices(task.train_idx, labels, self.hp.n_nodes, self.hp.partition, seed=self.ctx.seed,
                                 task_id=task.id, alpha=self.hp.alpha, class_order=self.class_order)
        self.shards = dict(enumerate(part.shards))
        self.ctx.artifacts["partition"][str(task.id)] = partition_stats(part, task.source.targets,
                                                                        self.ctx.num_classes)

    def local_train(self, model: nn.Module, task: Task, node: int) -> None:
        """E local epochs of cross-entropy on the node's shard, drawn through the run context."""
        shard = self.shards[node]
        if len(shard) == 0:
            return
        model.train()
        opt = self.ctx.make_optimizer([p for p in model.parameters() if p.requires_grad])
        loss_sum = torch.zeros((), device=self.ctx.device)
        with using_generator(self.ctx, self.gens[node]):
            for x, y in self.ctx.train_batches(task, indices={task.id: shard}, epochs=self.hp.local_epochs):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                self.ctx.backward(loss)
                self.ctx.step(opt)
                loss_sum = loss_sum + loss.detach()
        check_finite(loss_sum, self.NAME, task.id)

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


@dataclass
class FedAvgParams(NodesParams):
    """FedAvg options (see :class:`NodesParams`); client_fraction C: share of clients per round."""

    topology: str = "star"
    client_fraction: float = 1.0

    def validate(self) -> None:
        super().validate()
        require(0 < self.client_fraction <= 1, f"client_fraction must be in (0, 1], got {self.client_fraction}",
                "use client_fraction=1.0 (every client) or e.g. 0.5")


@register
class FedAvg(NodesMethod):
    NAME = "fedavg"
    HParams = FedAvgParams
    DESCRIPTION = "FedAvg (continual): R rounds per task, E local epochs, sample-weighted server averaging"

    def __init__(self, hp: FedAvgParams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        self.worker = copy.deepcopy(self.model)  # scratch client model, reloaded from the server each time

    def sampled_clients(self, task_id: int, round_idx: int) -> list[int]:
        """Seeded by (seed, task, round): every rank draws the same clients."""
        P = self.hp.n_nodes
        m = max(1, round(self.hp.client_fraction * P))
        if m >= P:
            return list(range(P))
        g = torch.Generator().manual_seed(self.ctx.seed * 7_919 + task_id * 1_009 + round_idx)
        return sorted(torch.randperm(P, generator=g)[:m].tolist())

    def train_task(self, task: Task) -> None:
        for r in range(self.hp.rounds):
            self.nodes.next_round()
            sampled = set(self.sampled_clients(task.id, r))
            failed = self.nodes.failed()
            server = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            states, weights = {}, {}
            for i in self.nodes.local_ids:
                weights[i] = float(len(self.shards[i])) if i in sampled else 0.0
                if i in sampled and i not in failed and len(self.shards[i]) > 0:
                    self.worker.load_state_dict(server)
                    self.local_train(self.worker, task, i)
                    states[i] = {k: v.detach().clone() for k, v in self.worker.state_dict().items()}
                else:
                    states[i] = server  # not sampled, or its answer never arrives
            avg = self.nodes.weighted_average(states, weights)
            self.model.load_state_dict(avg, strict=False)
            self.record_communication()
