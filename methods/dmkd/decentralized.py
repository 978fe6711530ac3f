"""DMKD, decentralized mode (docs/methods.md §4 "Decentralized mode"), on the nodes API.

P nodes, each a full DMKD learner (encoder, experts, router, autoencoders, its own teacher, importance
maps and optimisers) trained with the normal DMKD loss on its shard of every task (``partition`` iid |
dirichlet | round_robin, via :class:`harness.core.nodes_method.NodesMethod`). Per task, ``rounds`` times: every node
trains ``local_epochs`` epochs (E; R·E = the protocol's epochs by default) through ``ctx.train_batches`` (samples and FLOPs counted), then the
nodes synchronise:

- What travels. c_i[m] = samples node i routed to expert m since the last sync. The network first sums
  c (an average of an N-vector, counted). Only modules someone routed to travel: expert m together with
  its autoencoder m, and the router and the encoder when they are trainable and someone trained. A
  module no node routed to is not sent; every node keeps its own copy. Only parameters travel: buffers
  (ae_scale, owned, spec_bias, BatchNorm statistics of a backbone encoder) stay local.
- communication=full: module-wise weighted average. Expert m and autoencoder m weigh node i by c_i[m];
  router and encoder by the samples node i trained on since the last sync. topology=full takes the
  network average (``nodes.weighted_average``: an all-reduce, 2 x payload per node plus the per-tensor
  weights); ring takes one gossip step over self and the two neighbours (``nodes.neighbour_average``).
- communication=salient: per travelling module (expert_m, ae_m, router, encoder, each flattened to one
  vector) a node sends the ceil(salient_p·n) entries with the largest exchange importance as fp32 values
  plus int32 indices (``nodes.sparse_exchange``), and its per-module weights (``neighbour_exchange``).
  Receiver i sets entry e of module m to (w_i θ_i[e] + Σ_j w_j v_j[e]) / (w_i + Σ_j w_j) over the
  neighbours j whose message covers e; entries nobody sent, or with zero total weight, stay as they are.
  Exchange importance (``salient_by``): ``update`` (default) = |θ − θ at the last sync|, what the node
  learned since it last synchronised; ``importance`` = the preservation map Ω of the module (Fisher or
  magnitude) where it exists and is non-zero, else the update (first task, fresh experts, autoencoders).

Teacher: ``snapshot``: each node's own model at the boundary (after the task's last sync). ``aggregate``:
at each boundary every node receives its neighbours' models (parameters and float buffers,
``neighbour_exchange``, one extra counted round) and distils from their uniform average, the averaged
model of the OTHER nodes (its own snapshot when no neighbour answered).

Boundary work of a node (autoencoder calibration, Fisher, the routing probe) reads only its shard;
specialization is measured on the scenario's validation data and logged for the reported node only.
Reported model: node 0 (under torchrun each rank evaluates its own node; rank 0's record is kept),
as for DIMAT/WA; the mean validation accuracy (class-IL) over the hosted nodes is logged as
``nodes_mean_val_acc``. Growth (autoencoder routing only) is consistent across nodes because the set of
owned experts is; pruning is not available here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from harness.core.accuracy import seen_classes_accuracy
from harness.core.context import RunContext, check_finite
from harness.core.data import Task
from harness.core.method import tensor_bytes
from harness.core.nodes import using_generator
from harness.core.nodes_method import NodesMethod
from methods.common import frozen_copy
from methods.dmkd.hparams import DMKDParams
from methods.dmkd.method import DMKD
from methods.dmkd.model import DMKDModel


class QuietContext:
    """The run context seen by a node that is not reported: same data and optimisers, no logs or artifacts."""

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self.artifacts: dict[str, Any] = {}
        self.metrics: list[tuple[str, float, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def log_metric(self, name: str, value: float, step: int) -> None:
        """Dropped: only the reported node logs."""


class NodeLearner(DMKD):
    """One node's DMKD learner; its boundary statistics read only its own shard."""

    def __init__(self, hp: DMKDParams, ctx: RunContext | QuietContext, node: int) -> None:
        super().__init__(hp, ctx)  # type: ignore[arg-type]
        self.node = node
        self.shard = torch.empty(0, dtype=torch.long)

    def train_data(self, task: Task, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        yield from task.samples(self.shard, batch_size, shuffle=False, generator=None, device=self.ctx.device,
                                train=True)

    @torch.no_grad()
    def _probe_gates(self, task: Task, n: int = 1024) -> Tensor:
        if len(self.shard) == 0:  # no local data: no preference
            return torch.full((1, self.model.n_experts), 1.0 / self.model.n_experts, device=self.ctx.device)
        return super()._probe_gates(task, n)

    @torch.no_grad()
    def _calibrate_autoencoder(self, task: Task) -> None:
        if len(self.shard) == 0:  # the expert arrived through the sync; its error scale stays as it was
            self.model.owned[self.home] = True
            return
        super()._calibrate_autoencoder(task)

    def _update_importance(self, task: Task, spec: Any) -> None:
        if len(self.shard) == 0 and self.hp.preservation == "fisher":
            return  # nothing to estimate a Fisher from: keep the maps of earlier tasks
        super()._update_importance(task, spec)


def module_keys(model: DMKDModel, active: list[int], shared: bool) -> dict[str, list[str]]:
    """Module name -> parameter names that travel: expert_m and ae_m for active m; router/encoder if shared."""
    names = [n for n, _ in model.named_parameters()]
    out: dict[str, list[str]] = {}
    for m in active:
        out[f"expert_{m}"] = [n for n in names if n.startswith(f"experts.{m}.")]
        out[f"ae_{m}"] = [n for n in names if n.startswith(f"autoencoders.{m}.")]
    if shared:
        out["router"] = [n for n in names if n.startswith("router.")] if model.routing in ("learned", "entropy") \
            else []
        out["encoder"] = [n for n in names if n.startswith("encoder.")]
    return {k: v for k, v in out.items() if v}


def module_weight(module: str, counts: list[float], samples: float) -> float:
    """Weight of a node for a module: samples routed to expert m (expert_m, ae_m) or trained on (shared)."""
    if module.startswith(("expert_", "ae_")):
        return counts[int(module.split("_")[1])]
    return samples


def merge_weighted_sparse(own: Tensor, own_weight: float, received: list[tuple[Tensor, Tensor, float]]) -> Tensor:
    """Entry-wise (w_own θ + Σ_j w_j v_j) / (w_own + Σ_j w_j) over the messages (indices, values, w_j)
    that cover the entry; entries with zero total weight keep their own value."""
    acc = own * own_weight
    wsum = torch.full_like(own, own_weight)
    covered = torch.zeros_like(own, dtype=torch.bool)
    for idx, val, w in received:
        ix = idx.long()
        acc = acc.index_add(0, ix, val * w)
        wsum = wsum.index_add(0, ix, torch.full_like(val, w))
        covered[ix] = True
    return torch.where(covered & (wsum > 0), acc / wsum.clamp_min(1e-30), own)


class DecentralizedDMKD(NodesMethod, DMKD):
    """DMKD on P nodes: local DMKD training, module-wise (full or salient) synchronisation every R epochs."""

    STATE_KINDS = {"learners": "nodes"}  # every node's model and state

    hp: DMKDParams  # type: ignore[assignment]

    def __init__(self, hp: DMKDParams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)  # type: ignore[arg-type]  # NodesMethod -> DMKD: nodes, gens, options
        self.reported = self.nodes.local_ids[0]
        self.learners: dict[int, NodeLearner] = {
            i: NodeLearner(hp, ctx if i == self.reported else QuietContext(ctx), i) for i in self.nodes.local_ids}
        self.model = self.learners[self.reported].model  # evaluated and counted
        self.synced: dict[int, dict[str, Tensor]] = {}  # parameters right after the last sync
        self.counts_at_sync: dict[int, Tensor] = {}
        self.samples: dict[int, int] = {}

    # ---- task loop ---------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        NodesMethod.before_task(self, task)  # shards of this task (same on every rank), logged
        for i, learner in self.learners.items():
            learner.shard = self.shards[i]
            learner.before_task(task)
            self._mark_synced(i)

    def _mark_synced(self, i: int) -> None:
        model = self.learners[i].model
        self.synced[i] = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.counts_at_sync[i] = model.routed_counts.detach().clone()
        self.samples[i] = 0

    def train_task(self, task: Task) -> None:
        for _ in range(self.hp.rounds):
            self.nodes.next_round()
            failed = self.nodes.failed()
            for i in self.nodes.local_ids:
                if i not in failed:
                    self.local_train_dmkd(i, task)
            self.synchronise()
            self.record_communication()

    def local_train_dmkd(self, i: int, task: Task) -> None:
        """E local epochs (this round's share of the budget) of node i's DMKD loss on its shard."""
        learner, shard = self.learners[i], self.shards[i]
        if len(shard) == 0:
            return
        learner.model.train()
        loss_sum = torch.zeros((), device=self.ctx.device)
        with using_generator(self.ctx, self.gens[i]):
            for x, y in self.round_batches(task, i):  # this round's piece of the node's R·E-pass stream
                loss_sum = loss_sum + learner.training_step(x, y, task).detach()
                self.samples[i] += len(y)
        check_finite(loss_sum, self.NAME, task.id)

    # ---- synchronisation ---------------------------------------------------------------------------
    def synchronise(self) -> None:
        """Agree on the travelling modules, exchange them (full or salient), load the results."""
        ids = self.nodes.local_ids
        counts = {i: self.learners[i].model.routed_counts.detach() - self.counts_at_sync[i] for i in ids}
        probe = {i: {"routed": counts[i].float(), "samples": counts[i].new_full((1,), float(self.samples[i]))} for i in ids}
        total = self.nodes.weighted_average(probe, {i: 1.0 for i in ids})
        active = [m for m, c in enumerate(total["routed"].tolist()) if c > 0]
        shared = float(total["samples"]) > 0
        model0 = self.learners[ids[0]].model
        modules = module_keys(model0, active, shared)
        if modules:
            counts_l = {i: counts[i].tolist() for i in ids}
            if self.hp.communication == "full":
                self._sync_full(modules, counts_l)
            else:
                self._sync_salient(modules, counts_l)
        failed = self.nodes.failed()
        for i in ids:
            if i not in failed:
                self._mark_synced(i)

    def _sync_full(self, modules: dict[str, list[str]], counts: dict[int, list[float]]) -> None:
        ids = self.nodes.local_ids
        states, weights = {}, {}
        for i in ids:
            params = dict(self.learners[i].model.named_parameters())
            states[i] = {n: params[n].detach() for names in modules.values() for n in names}
            weights[i] = {n: module_weight(mod, counts[i], self.samples[i]) for mod, names in modules.items()
                          for n in names}
        if self.hp.topology == "full":
            avg = self.nodes.weighted_average(states, weights)
            new = {i: avg for i in ids}
        else:
            new = self.nodes.neighbour_average(states, weights)
        failed = self.nodes.failed()
        for i in ids:
            if i not in failed:
                self.learners[i].model.load_state_dict(new[i], strict=False)

    def exchange_importance(self, i: int, module: str, names: list[str]) -> Tensor:
        """Flat importance of a module's entries for the salient exchange (see the module docstring)."""
        params = dict(self.learners[i].model.named_parameters())
        update = torch.cat([(params[n].detach() - self.synced[i][n]).abs().reshape(-1) for n in names])
        if self.hp.salient_by == "importance":
            omega = self.learners[i].pres.importance
            if all(n in omega and omega[n].shape == params[n].shape for n in names):
                flat = torch.cat([omega[n].reshape(-1) for n in names])
                if bool(flat.gt(0).any()):
                    return flat
        return update

    def _sync_salient(self, modules: dict[str, list[str]], counts: dict[int, list[float]]) -> None:
        ids = self.nodes.local_ids
        order = list(modules)
        packed, importance, wvec = {}, {}, {}
        for i in ids:
            params = dict(self.learners[i].model.named_parameters())
            packed[i] = {mod: torch.cat([params[n].detach().reshape(-1) for n in modules[mod]]) for mod in order}
            importance[i] = {mod: self.exchange_importance(i, mod, modules[mod]) for mod in order}
            wvec[i] = {"w": torch.tensor([module_weight(mod, counts[i], self.samples[i]) for mod in order])}
        got = self.nodes.sparse_exchange(packed, importance, self.hp.salient_p)
        got_w = self.nodes.neighbour_exchange(wvec)
        failed = self.nodes.failed()
        for i in ids:
            if i in failed:
                continue
            own_w = wvec[i]["w"].tolist()
            their_w = {j: s["w"].tolist() for j, s in got_w[i].items()}
            params = dict(self.learners[i].model.named_parameters())
            with torch.no_grad():
                for k, mod in enumerate(order):
                    received = [(msg.indices[mod], msg.values[mod], their_w[j][k])
                                for j, msg in sorted(got[i].items()) if j in their_w]
                    merged = merge_weighted_sparse(packed[i][mod], own_w[k], received)
                    pos = 0
                    for n in modules[mod]:
                        p = params[n]
                        p.copy_(merged[pos : pos + p.numel()].view_as(p))
                        pos += p.numel()

    # ---- boundary ----------------------------------------------------------------------------------
    def after_task(self, task: Task) -> None:
        for i, learner in self.learners.items():
            if i != self.reported:
                learner.after_task(task)
        self.learners[self.reported].after_task(task)  # last: its artifacts are the ones kept
        if self.hp.teacher == "aggregate" and self.hp.kd != "none":
            self.aggregate_teachers()

    def after_evaluation(self, task: Task) -> None:
        self._log_nodes_accuracy(task)  # a diagnostic: outside the counted training work

    def aggregate_teachers(self) -> None:
        """Each node's teacher := uniform average of its neighbours' models (one counted round)."""
        self.nodes.next_round()
        ids = self.nodes.local_ids
        states = {i: {k: v.detach().clone() for k, v in self.learners[i].model.state_dict().items()
                      if v.is_floating_point() and k != "routed_counts"} for i in ids}
        got = self.nodes.neighbour_exchange(states)
        for i in ids:
            teacher = frozen_copy(self.learners[i].model)
            inbox = got[i]
            if inbox:
                avg = {k: torch.stack([inbox[j][k] for j in sorted(inbox)]).mean(0) for k in states[i]}
                teacher.load_state_dict(avg, strict=False)
            self.learners[i].teacher = teacher
        self.record_communication()

    def _log_nodes_accuracy(self, task: Task) -> None:
        """Mean class-IL validation accuracy of the hosted nodes over the tasks so far."""
        models = [learner.model for learner in self.learners.values()]
        for m in models:
            m.eval()
        self.ctx.log_metric("nodes_mean_val_acc", seen_classes_accuracy(self.ctx, models, task), task.id)
        for m in models:
            m.train()

    # ---- accounting and checkpoints ----------------------------------------------------------------
    def state_bytes(self) -> int:
        """The reported node's state plus its parameters at the last sync (what the update is measured from)."""
        return self.learners[self.reported].state_bytes() + tensor_bytes(self.synced.get(self.reported))

    def state_dict(self) -> dict[str, Any]:
        return {"learners": {i: lr.state_dict() for i, lr in self.learners.items()},
                "nodes": NodesMethod.extra_state(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, s in state.get("learners", {}).items():
            if i in self.learners:
                self.learners[i].load_state_dict(s)
        NodesMethod.load_extra_state(self, state.get("nodes", {}))


DMKD.VARIANTS["decentralized"] = DecentralizedDMKD
