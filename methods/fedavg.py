"""FedAvg, continual (McMahan et al. 2017; docs/methods.md §3), on the nodes API.

Each task's training data is split over P clients (``partition``: iid | dirichlet | round_robin).
Per task, R rounds; per round a seeded sample of max(1, round(C·P)) clients trains E local epochs
(R·E = the protocol's epochs, so every sample is seen as often as under FT; E may be a fraction of an
epoch, see :class:`harness.core.nodes_method.NodesParams`) from the server weights (fresh optimiser
from the protocol each round) and the server averages the floating state (parameters and BatchNorm statistics) weighted by client sample counts.
``predict`` evaluates the server model. Bytes = 2 x |θ| x 4 per participating client per round.

:class:`harness.core.nodes_method.NodesMethod` holds what every method on the nodes API shares
(options, the nodes object, per-task partitions, one random stream per node, the local training loop).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from harness.core.context import RunContext
from harness.core.data import Task
from harness.core.defaults import documented
from harness.core.method import register
from harness.core.nodes_method import NodesMethod, NodesParams


@dataclass
class FedAvgParams(NodesParams):
    """FedAvg options (see :class:`NodesParams`); client_fraction C: share of clients per round."""

    topology: str = documented("star", "the server-client topology", "McMahan et al. 2017: a central server")
    client_fraction: float = documented(1.0, "C, share of clients sampled per round",
                                        "McMahan et al. 2017: C = 1.0 is one of their settings (Table 1)", gt=0, le=1)


@register
class FedAvg(NodesMethod):
    NAME = "fedavg"
    HParams = FedAvgParams
    DESCRIPTION = "FedAvg (continual): R rounds per task, E local epochs, sample-weighted server averaging"

    def __init__(self, hp: FedAvgParams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        self.worker = copy.deepcopy(self.model)  # scratch client model, reloaded from the server each time

    def budget_passes(self, task: Task) -> float:
        """epochs x the sampled share of clients: with C < 1 a round trains only m of the P shards."""
        P = self.hp.n_nodes
        return self.ctx.protocol.epochs * (len(self.sampled_clients(task.id, 0)) / P if P else 1.0)

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
