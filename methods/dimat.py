"""DIMAT, continual (Saadati et al. 2024; docs/methods.md §3), and WA, its ablation without permutation.

P agents on a topology with mixing weights π_ij (uniform over self and neighbours: fully connected
1/P, ring 1/3). Per round, each agent: (1) resets BatchNorm statistics on its own data; (2) gets
its neighbours' parameters and collects per-layer activations of itself and of each neighbour on
its OWN data (the official code uses the global train set; we use local data only), as correlation
matrices; (3) per neighbour, ``scipy.optimize.linear_sum_assignment(corr, maximize=True)`` gives a
permutation of the neighbour's hidden units into the agent's order, applied to the producing layer
(rows, bias, BatchNorm) and to the consuming layer's inputs; (4) θ_i <- Σ_j π_ij P_ij θ_j;
(5) resets BatchNorm statistics; (6) trains E local epochs.

Activations are the pre-activations of each hidden layer (its output, after BatchNorm when there is
one; conv channels pooled over positions). The official code observes post-ReLU features; units that
are dead on the agent's data have zero variance there and cannot be matched, pre-activations always
can (a known permutation is recovered exactly, see the tests). Permutation is supported for the ``mlp`` and ``cnn`` backbones (sequential feature
stacks of Linear/Conv2d, BatchNorm, ReLU, pooling, Flatten); WA works with any backbone.
Agents start from distinct initialisations, as in the official code (github nsaadati/DIMAT,
train.py: agent i is built with seed + i unless ``--init_seed``): agent i's weights are the run's
model initialised from seed + i (agent 0 is the run's usual initial model). ``init=shared`` gives every
agent the same initial weights; then every assignment is the identity and DIMAT equals WA. Every merge
logs ``moved_fraction`` (step = the global round): the share of hidden units, over all neighbours and
unit groups of all agents of the round, that the permutations moved (0 = identity). Nodes without
training data of some task cannot compute statistics on their own data: DIMAT refuses such a
partition before training (a UserError naming the node and task); WA does not need the statistics.
``predict`` evaluates agent 0 (under torchrun: rank 0's agent, which is the one recorded); the mean
validation accuracy over the agents is logged as ``agents_mean_val_acc``. Only parameters travel
(BatchNorm statistics are recomputed locally); the activation statistics are computed by the receiver,
so bytes = |θ| x 4 per directed edge per round. The forward passes of steps (1), (2) and (5) use
``stat_batches`` batches of the agent's shard read directly from the task; they are training FLOPs
(``ctx.counted``) but not training passes: they are no optimisation steps, so the measured passes per
task (docs/methods.md §6) count only the local training batches.

Cost: DIMAT needs more than 2x FT's time per training sample, by its algorithm: every round each agent
solves one linear assignment (Hungarian, O(units³), scipy) per hidden layer and neighbour (MLP: two
400 x 400 problems per neighbour, 3 neighbours, 4 agents, R rounds per task), and runs each
neighbour's model on its statistics batches. The agent's own activations are computed once per round
and reused for every neighbour.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from harness.core.accuracy import seen_classes_accuracy
from harness.core.backbones import Backbone
from harness.core.context import RunContext
from harness.core.data import Task
from harness.core.defaults import documented
from harness.core.errors import UserError
from harness.core.method import register
from harness.core.nodes import State
from harness.core.nodes_method import NodesMethod, NodesParams
from harness.core.partition import partition_indices

_SPATIAL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class UnitGroup:
    """Hidden units permuted together: layers producing them, the layer consuming them, where to observe."""

    producers: list[str]  # module names: the Linear/Conv2d and any BatchNorm after it
    consumer: str  # the next Linear/Conv2d (its input dimension is permuted)
    block: int  # consumer inputs per unit (spatial positions flattened after a conv, else 1)
    observe: str  # module whose output is observed: the layer, or the BatchNorm after it (pre-activation)
    size: int


def permutation_spec(model: nn.Module, input_shape: tuple[int, ...]) -> list[UnitGroup]:
    """Unit groups of a Backbone whose ``features`` is a plain sequential stack (mlp, cnn)."""
    if not isinstance(model, Backbone) or not isinstance(model.features, nn.Sequential):
        raise UserError("DIMAT's permutation matching supports the mlp and cnn backbones",
                        "use --set backbone=mlp or cnn, or permute=false (WA) for other backbones")
    flat_shapes = _flatten_input_shapes(model, input_shape)
    chain = [(f"features.{n}", m) for n, m in model.features.named_children()] + [("head", model.head)]
    groups: list[UnitGroup] = []
    open_group: UnitGroup | None = None
    for name, m in chain:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if open_group is not None:
                open_group.consumer = name
                groups.append(open_group)
            size = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            open_group = None if name == "head" else UnitGroup([name], "", 1, name, size)
        elif isinstance(m, _BN) and open_group is not None:
            open_group.producers.append(name)
            open_group.observe = name
        elif isinstance(m, nn.Flatten) and open_group is not None:
            shape = flat_shapes[name]
            open_group.block = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        elif any(True for _ in m.parameters(recurse=True)) or not (
            isinstance(m, (*_SPATIAL, nn.Flatten, nn.ReLU, nn.Identity, nn.Dropout)) or type(m).__name__ == "_Unflatten"
        ):
            raise UserError(f"DIMAT cannot permute through {type(m).__name__} ({name})",
                            "use the mlp or cnn backbone, or permute=false (WA)")
    return groups


def _flatten_input_shapes(model: Backbone, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Input shape of every Flatten in ``features`` (a probe forward pass on zeros)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for n, m in model.features.named_children():
        if isinstance(m, nn.Flatten):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, n=n: shapes.__setitem__(f"features.{n}", tuple(inp[0].shape))))
    first = next(model.parameters())
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=first.device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return shapes


def permute_state(state: State, groups: list[UnitGroup], perms: list[Tensor]) -> State:
    """Reorder hidden units: producer rows (and BN entries) by ``perm``, consumer inputs to match.

    Unit a of the result is unit ``perm[a]`` of the input; the network computes the same function.
    """
    out = dict(state)
    for g, p in zip(groups, perms):
        for name in g.producers:
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                key = f"{name}.{suffix}"
                if key in out:
                    out[key] = out[key].index_select(0, p.to(out[key].device))
        key = f"{g.consumer}.weight"
        w = out[key]
        p_dev = p.to(w.device)
        cols = p_dev if g.block == 1 else (p_dev[:, None] * g.block + torch.arange(g.block, device=w.device)).reshape(-1)
        out[key] = w.index_select(1, cols)
    return out


class _Correlation:
    """Streaming Pearson correlation between the units of two activation matrices (rows = samples)."""

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = None  # type: ignore[assignment]

    def add(self, x: Tensor, y: Tensor) -> None:
        x, y = x.double(), y.double()
        if self.sx is None:
            self.sx, self.sy = x.sum(0), y.sum(0)
            self.sxx, self.syy, self.sxy = (x * x).sum(0), (y * y).sum(0), x.T @ y
        else:
            self.sx += x.sum(0)
            self.sy += y.sum(0)
            self.sxx += (x * x).sum(0)
            self.syy += (y * y).sum(0)
            self.sxy += x.T @ y
        self.n += x.shape[0]

    def matrix(self) -> Tensor:
        n = self.n
        mx, my = self.sx / n, self.sy / n
        cov = self.sxy / n - mx[:, None] * my[None, :]
        sdx = (self.sxx / n - mx * mx).clamp(min=0).sqrt()
        sdy = (self.syy / n - my * my).clamp(min=0).sqrt()
        return cov / (sdx[:, None] * sdy[None, :] + 1e-12)


def _units(a: Tensor) -> Tensor:
    """(batch, units) or (batch, C, H, W) -> (samples, units)."""
    return a if a.dim() == 2 else a.movedim(1, -1).reshape(-1, a.shape[1])


def _record(model: nn.Module, names: list[str], store: dict[str, Tensor]) -> list[Any]:
    mods = dict(model.named_modules())
    return [mods[n].register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o)) for n in names]


@torch.no_grad()
def observed_activations(model: nn.Module, batches: list[Tensor], groups: list[UnitGroup]) -> list[dict[str, Tensor]]:
    """Per batch, the observed activations (samples x units) of every unit group of ``model``."""
    names = [g.observe for g in groups]
    out: list[dict[str, Tensor]] = []
    acts: dict[str, Tensor] = {}
    handles = _record(model, names, acts)
    try:
        for x in batches:
            model(x)
            out.append({n: _units(acts[n]) for n in names})
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def match_units(model_a: nn.Module, model_b: nn.Module, batches: list[Tensor],
                groups: list[UnitGroup], acts_a: list[dict[str, Tensor]] | None = None) -> list[Tensor]:
    """Per unit group, the permutation of ``model_b``'s units that best matches ``model_a``'s.

    ``perm[a]`` is b's unit paired with a's unit a (maximum total activation correlation, solved
    exactly by linear_sum_assignment), ready for :func:`permute_state` on b's state. ``acts_a``:
    model_a's :func:`observed_activations` on ``batches`` when the caller already has them (an agent
    matches every neighbour against the same activations of its own).
    """
    from scipy.optimize import linear_sum_assignment  # scipy.optimize costs seconds to import

    names = [g.observe for g in groups]
    corr = {n: _Correlation() for n in names}
    if acts_a is None:
        acts_a = observed_activations(model_a, batches, groups)
    for a, b in zip(acts_a, observed_activations(model_b, batches, groups)):
        for n in names:
            corr[n].add(a[n], b[n])
    perms = []
    for n in names:
        _, cols = linear_sum_assignment(corr[n].matrix().cpu().numpy(), maximize=True)
        perms.append(torch.as_tensor(cols, dtype=torch.long))
    return perms


@torch.no_grad()
def reset_bn(model: nn.Module, batches: list[Tensor]) -> None:
    """Recompute BatchNorm running statistics as the plain average over ``batches``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    model.train()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    for x in batches:
        model(x)
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    model.train(was)


@dataclass
class DimatParams(NodesParams):
    """DIMAT options (see NodesParams). permute: match units before merging (false = WA).
    stat_batches: batches of the agent's own shard used for BatchNorm resets and activation statistics.
    init: distinct (agent i initialised from seed + i, the official code's default) | shared (every
    agent starts from the run's initial weights; DIMAT then reduces to WA)."""

    permute: bool = documented(True, "match units before merging (false = WA)",
                               "Saadati et al. 2024 (DIMAT): activation matching before the merge")
    stat_batches: int = documented(
        8, "batches of the agent's own shard for BatchNorm resets and activation statistics",
        "ours: the official code uses the global train set; we use local data only (docs/methods.md §3)", ge=1)
    init: str = documented("distinct", "distinct (agent i initialised from seed + i) | shared (one init)",
                           "official DIMAT code (github nsaadati/DIMAT, train.py: seed = i + random_seed)",
                           choices=("distinct", "shared"))


@register
class Dimat(NodesMethod):
    NAME = "dimat"
    STATE_KINDS = {"agents": "nodes"}
    HParams = DimatParams
    DESCRIPTION = "DIMAT (continual): activation matching + π-weighted merge over a topology, E local epochs"

    def __init__(self, hp: DimatParams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        self.groups = permutation_spec(self.model, tuple(ctx.scenario.input_shape)) if hp.permute else []
        if hp.permute:
            self._check_shards()
        first = self.nodes.local_ids[0]
        self.agents: dict[int, nn.Module] = {}
        for i in self.nodes.local_ids:
            agent = self.model if i == first else copy.deepcopy(self.model)
            if hp.init == "distinct" and i != 0:
                agent.load_state_dict(ctx.make_model(seed=ctx.seed + i).state_dict())
            self.agents[i] = agent
        self._scratch: list[nn.Module] = []
        self._moved: list[tuple[int, int]] = []  # (units moved, units) of every matching this round

    def _check_shards(self) -> None:
        """Refuse, before training, a partition that leaves some node without data of some task."""
        hp = self.hp
        for task in self.ctx.scenario.tasks:
            labels = task.source.targets[task.train_idx]
            part = partition_indices(task.train_idx, labels, hp.n_nodes, hp.partition, seed=self.ctx.seed,
                                     task_id=task.id, alpha=hp.dirichlet_alpha, class_order=self.class_order)
            empty = [i for i, sh in enumerate(part.shards) if len(sh) == 0]
            if empty:
                raise UserError(
                    f"partition={hp.partition} leaves node(s) {empty} without training data of task {task.id} "
                    f"({hp.n_nodes} nodes, {len(task.classes)} classes): DIMAT matches units on each node's own "
                    "data", f"use n_nodes <= {len(task.classes)} with round_robin, partition=iid, or wa (no matching)")

    def _stat_batches(self, task: Task, node: int) -> list[Tensor]:
        shard = self.shards[node][: self.hp.stat_batches * self.ctx.protocol.batch_size]
        if len(shard) == 0:
            return []
        it = task.samples(shard, self.ctx.protocol.batch_size, shuffle=False, generator=None,
                          device=self.ctx.device, train=True)
        return [x for x, _ in it]

    def _scratch_models(self, k: int) -> list[nn.Module]:
        while len(self._scratch) < k:
            self._scratch.append(copy.deepcopy(self.model))
        return self._scratch[:k]

    def merge(self, i: int, own: State, received: dict[int, State], batches: list[Tensor]) -> State:
        """θ_i <- Σ_j π_ij P_ij θ_j over i and the neighbours that answered (π renormalised)."""
        pi = {j: w for j, w in self.nodes.topology.mixing_weights(i).items() if j == i or j in received}
        total = sum(pi.values())
        aligned: dict[int, State] = {i: own}
        if self.hp.permute and received:
            agent = self.agents[i]
            agent.eval()
            own_acts = observed_activations(agent, batches, self.groups)  # the same for every neighbour
            for scratch, (j, theta) in zip(self._scratch_models(len(received)), sorted(received.items())):
                scratch.load_state_dict(theta, strict=False)
                reset_bn(scratch, batches)
                scratch.eval()
                perms = match_units(agent, scratch, batches, self.groups, acts_a=own_acts)
                moved = getattr(self, "_moved", None)  # (units moved, units) per matching, logged per round
                if moved is not None:
                    moved.append((sum(int((p != torch.arange(len(p))).sum()) for p in perms),
                                  sum(len(p) for p in perms)))
                aligned[j] = permute_state(theta, self.groups, perms)
        else:
            aligned.update(received)
        return {k: sum((pi[j] / total) * aligned[j][k] for j in sorted(aligned)) for k in own}

    def train_task(self, task: Task) -> None:
        for _ in range(self.hp.rounds):
            self.nodes.next_round()
            failed = self.nodes.failed()
            live = [i for i in self.nodes.local_ids if i not in failed]
            batches = {i: self._stat_batches(task, i) for i in live}
            for i in live:  # (1)
                self.ctx.counted(reset_bn, self.agents[i], batches[i])
            states = {i: {k: p.detach().clone() for k, p in a.named_parameters()} for i, a in self.agents.items()}
            got = self.nodes.neighbour_exchange(states)  # (2) parameters of the neighbours that answered
            # (2)-(4); matching passes and BN resets count as training FLOPs
            merged = {i: self.ctx.counted(self.merge, i, states[i], got[i], batches[i]) for i in live}
            for i in live:
                self.agents[i].load_state_dict(merged[i], strict=False)
                self.ctx.counted(reset_bn, self.agents[i], batches[i])  # (5)
                self.local_train(self.agents[i], task, i)  # (6)
            self.record_communication()
            if self._moved:
                moved, units = map(sum, zip(*self._moved))
                self.ctx.log_metric("moved_fraction", moved / max(units, 1), self.nodes.round)
                self._moved = []

    def after_evaluation(self, task: Task) -> None:
        """Log the agents' mean accuracy (class-IL over the classes seen, validation split)."""
        for a in self.agents.values():
            a.eval()
        self.ctx.log_metric("agents_mean_val_acc", seen_classes_accuracy(self.ctx, self.agents.values(), task),
                            task.id)

    def extra_state(self) -> dict[str, Any]:
        return super().extra_state() | {"agents": {i: a.state_dict() for i, a in self.agents.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        for i, s in state.get("agents", {}).items():
            if i in self.agents:
                self.agents[i].load_state_dict(s)


@dataclass
class WAParams(DimatParams):
    """WA: DIMAT's merge without permutation (plain π-weighted averaging of neighbours)."""

    permute: bool = documented(False, "no matching: plain π-weighted averaging", "Saadati et al. 2024: the WA baseline")


@register
class WeightAveraging(Dimat):
    NAME = "wa"
    HParams = WAParams
    DESCRIPTION = "WA: DIMAT without unit matching (π-weighted neighbour averaging), E local epochs"
