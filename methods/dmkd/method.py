"""DMKD, centralized mode (docs/methods.md §4, with the autoencoder and Gaussian routers of §5 as extensions).

Per batch: L = CE + λ_KD·L_KD + λ_balance·CV²(importance) + λ_diversity·D + λ_pres·penalty.
At every boundary: specialization on the validation data of the tasks so far (logged), optional
entropy-guided bias, pruning/merging, importance (Fisher or magnitude) and salient sets, then the
teacher snapshot. Under routing=autoencoder each task trains one "home" expert (hard-routed: the task
id is known during training, never at test) and its autoencoder; at test the autoencoders pick
the top-K experts. routing=gaussian (SEED-like) trains home experts the same way and, after each task,
fits per-class Gaussians of the home expert's hidden features on the task's training data; at test
the likelihoods pick the top-K experts. ``training=decentralized`` (and ``teacher=aggregate``) runs the
P-node version in methods/dmkd/decentralized.py: constructing DMKD with it returns a DecentralizedDMKD.

Cost (bench/method_cost.py): the per-step work beyond FT's is the home expert's autoencoder, module-wise
KD of every old expert (one stacked matmul per layer for the student's and the teacher's old experts;
the teacher's stacked weights are built once per snapshot) and the preservation penalty, whose value
and gradient are computed on the salient entries only and added to .grad without an autograd graph.
The autoencoder router runs only the autoencoders of experts that own data. At a boundary the Fisher
comes in closed form for Linear layers (one forward/backward instead of a per-sample vmap). All of it
is exact up to float rounding; nothing is approximated. Measured on Split Fashion-MNIST (one thread):
the training loop costs about 1.6x FT's per sample; the boundary work its algorithm needs (autoencoder
calibration, Fisher and salient sets, the specialization statistics on validation data) brings the
training time to about 2.3x FT's (2.6x with the quick suite's tuned 4 experts on Permuted).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core.context import RunContext
from harness.core.data import Task
from harness.core.errors import UserError
from harness.core.method import Method, register, tensor_bytes
from methods.common import frozen_copy, kd_loss
from methods.dmkd.hparams import DMKDParams
from methods.dmkd.model import (
    DMKDModel,
    build_encoder,
    stacked_expert_logits,
    stacked_expert_parameters,
    top_k_gates,
)
from methods.dmkd.preservation import (
    Preservation,
    fisher_importance,
    importance_histograms,
    magnitude_importance,
)
from methods.dmkd.specialization import Specialization, measure, specialization_scores


def load_external_teacher(path: str | None, device: torch.device, make_backbone) -> nn.Module:
    """The teacher at ``path``: a state dict of the run's backbone (``torch.save(model.state_dict())``),
    mapping inputs to logits over every class, read with ``weights_only=True``. Pickled modules (and
    TorchScript/export archives, whose loaders fall back to unpickling) are refused: unpickling a
    file can run any code."""
    p = Path(path or "")
    fix = "save the teacher's weights with torch.save(model.state_dict(), path) (same backbone as the run)"
    if not p.is_file():
        raise UserError(f"teacher_path {p} does not exist", fix)
    try:
        state = torch.load(p, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module or any unreadable file
        state = None
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UserError(f"teacher {p} is not a state dict of tensors (pickled modules are refused)", fix)
    teacher = make_backbone()
    try:
        teacher.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"teacher {p} is not a state dict of this run's backbone ({str(e).splitlines()[0]})",
                        fix) from None
    return frozen_copy(teacher)


def balance_loss(gates: Tensor) -> Tensor:
    """Coefficient of variation squared of expert importance Σ_x g_i(x) (Shazeer et al. 2017)."""
    imp = gates.sum(dim=0)
    return imp.var(unbiased=False) / imp.mean().pow(2).clamp_min(1e-12)


def diversity_loss(gates: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Mean pairwise cosine similarity of the experts' in-batch class profiles Σ_{x:y=c} g_i(x)."""
    n = gates.shape[1]
    if n < 2:
        return gates.new_zeros(())
    prof = F.normalize(torch.zeros(num_classes, n, device=gates.device, dtype=gates.dtype).index_add(0, y, gates),
                       dim=0)
    sim = prof.t() @ prof
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))


@register
class DMKD(Method):
    NAME = "dmkd"
    STATE_KINDS = {"teacher": "snapshot", "pres": "importance", "frozen": "snapshot"}
    HParams = DMKDParams
    DESCRIPTION = "DMKD: modular experts, top-K router, KD from snapshots, salient-parameter preservation"

    # training mode -> the subclass that trains that way; filled by the subclass's module when the
    # package is imported (methods/dmkd/__init__.py), so this module never imports it back.
    VARIANTS: ClassVar[dict[str, type]] = {}

    def __new__(cls, hp: DMKDParams | None = None, *args: Any, **kwargs: Any) -> Self:
        """training=decentralized: the registered name builds the P-node method (same options)."""
        if cls is DMKD and hp is not None and hp.training in DMKD.VARIANTS:
            return super().__new__(DMKD.VARIANTS[hp.training])
        return super().__new__(cls)

    def __init__(self, hp: DMKDParams, ctx: RunContext) -> None:
        self.hp, self.ctx = hp, ctx
        self.optimizer: torch.optim.Optimizer | None = None
        self.ae_optimizer: torch.optim.Optimizer | None = None
        self.model = self.build_model(hp, ctx)
        self.teacher: nn.Module | None = None
        if hp.teacher == "external":
            if hp.kd == "module":
                raise UserError("kd=module needs a snapshot teacher with the same experts",
                                "use kd=logits with teacher=external")
            self.teacher = load_external_teacher(hp.teacher_path, ctx.device, ctx.make_model)
        self.teacher_classes: list[int] = []
        self.seen_classes: list[int] = []
        self.pres = Preservation()
        self.frozen: dict[str, tuple[Tensor, Tensor]] = {}  # inject: param name -> (mask, fixed values)
        self.home = 0
        self._teacher_stack: tuple[Any, tuple[Tensor, ...]] | None = None  # (key, stacked teacher experts)
        self._skip_penalty = False  # training_step adds the preservation penalty's gradient directly
        self.history: dict[str, list[list[float]]] = {"entropy_per_task": [], "usage_per_task": []}

    @staticmethod
    def build_model(hp: DMKDParams, ctx: RunContext) -> DMKDModel:
        sc = ctx.scenario
        backbone = ctx.make_model() if hp.encoder == "backbone" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            encoder, d_enc = build_encoder(hp.encoder, sc.input_shape, hp.encoder_dim, backbone)
            model = DMKDModel(encoder, d_enc, math.prod(sc.input_shape), sc.num_classes, hp.n_experts,
                              hp.expert_hidden, hp.top_k, hp.routing, hp.ae_hidden, hp.ae_temperature,
                              hp.ae_relative, hp.combine, hp.gauss_temperature)
        if hp.routing == "static":
            model.router.requires_grad_(False)
        return model.to(ctx.device)

    @property
    def ae_routing(self) -> bool:
        return self.hp.routing == "autoencoder"

    @property
    def owner_routing(self) -> bool:
        """Routers that gate by what each expert keeps about its own data: one home expert per task."""
        return self.hp.routing in ("autoencoder", "gaussian")

    # ---- task boundaries -------------------------------------------------------------------------
    def train_data(self, task: Task, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Unshuffled training batches for boundary work (probe, calibration, Fisher); a node: its shard."""
        return task.batches("train", batch_size, device=self.ctx.device)

    @torch.no_grad()
    def _probe_gates(self, task: Task, n: int = 1024) -> Tensor:
        """Full gates of up to n training samples of the task (mean over samples, N)."""
        x, _ = next(self.train_data(task, n))
        self.model.eval()
        _, g = self.model.gates(x)
        self.model.train()
        return g

    def before_task(self, task: Task) -> None:
        hp, model = self.hp, self.model
        new_expert: int | None = None
        has_owner = bool(model.owned.any()) if self.owner_routing else task.id > 0
        g = self._probe_gates(task) if has_owner else None
        if self.owner_routing:
            free = (~model.owned).nonzero().flatten().tolist()
            if free:
                self.home = new_expert = free[0]
            elif hp.growth and model.n_experts < hp.n_max:
                self.home = new_expert = self._grow()
            else:  # every expert owns data: reuse the one that reconstructs (or fits) this task best
                assert g is not None
                self.home = int(g.mean(0).argmax())
        elif hp.growth and g is not None and model.n_experts < hp.n_max:
            h_norm = float(-(g * g.clamp_min(1e-30).log()).sum(1).mean()) / math.log(max(model.n_experts, 2))
            if h_norm > hp.growth_threshold:
                new_expert = self._grow()
        if new_expert is not None and g is not None and hp.transfer in ("init", "inject"):
            donor = int(g.mean(0)[: g.shape[1]].argmax())
            if donor != new_expert:
                self._transfer(donor, new_expert)
        params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("autoencoders")]
        self.optimizer = self.ctx.make_optimizer(params)
        if self.ae_routing:
            self.ae_optimizer = torch.optim.Adam(model.autoencoders[self.home].parameters(), lr=hp.ae_lr)
        model.routed_counts.zero_()

    def _grow(self) -> int:
        j = self.model.add_expert()
        self.pres.on_expert_added(self.model)
        return j

    def _transfer(self, donor: int, target: int) -> None:
        """init: copy the donor expert; inject: copy its salient parameters and keep them fixed."""
        src, dst = self.model.experts[donor], self.model.experts[target]
        if self.hp.transfer == "init":
            dst.load_state_dict(src.state_dict())
            return
        with torch.no_grad():
            for (name, p_dst), p_src in zip(dst.named_parameters(), src.parameters()):
                mask = self.pres.masks.get(f"experts.{donor}.{name}")
                if mask is None:
                    continue
                p_dst.copy_(torch.where(mask, p_src, p_dst))
                self.frozen[f"experts.{target}.{name}"] = (mask.clone(), p_src.detach().clone())

    # ---- training --------------------------------------------------------------------------------
    def training_step(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        if self.ae_optimizer is not None:
            self.ae_optimizer.zero_grad(set_to_none=True)
        direct = self._penalty_on()
        self._skip_penalty = direct
        try:
            loss = self.training_loss(x, y, task)
        finally:
            self._skip_penalty = False
        opts = [o for o in (self.optimizer, self.ae_optimizer) if o is not None]
        self.ctx.backward(loss, *opts)  # fp16: scaled, then unscaled for the hooks
        if direct:  # λ_pres Σ w (θ − θ*)²: its value and gradient without an autograd graph
            loss = loss.detach() + self.hp.lambda_pres * self.pres.add_penalty_grad(self.model, self.hp.lambda_pres)
        self.after_backward(x, y, task)
        self.ctx.step(*opts)
        self.after_step(x, y, task)
        return loss

    def training_loss(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        hp, model = self.hp, self.model
        if self.owner_routing:
            h = model.encoder(x)
            # Every row goes to the home expert with gate 1: combine() reduces to that expert alone.
            logits = model._finish(model._output(model.experts[self.home](h)))
            model.routed_counts[self.home] += len(y)
            loss = F.cross_entropy(logits, y)
            if self.ae_routing:
                flat = x.reshape(len(y), -1)
                loss = loss + F.mse_loss(model.autoencoders[self.home](flat), flat)
        else:
            h, g = model.gates(x)
            w, idx = top_k_gates(g, model.top_k)
            logits = model.combine(h, w, idx)
            with torch.no_grad():
                model.routed_counts += F.one_hot(idx, model.n_experts).sum(dim=(0, 1)).to(model.routed_counts)
            loss = F.cross_entropy(logits, y)
            if hp.lambda_balance > 0 and hp.routing != "static":
                loss = loss + hp.lambda_balance * balance_loss(g)
            if hp.lambda_diversity > 0:
                loss = loss + hp.lambda_diversity * diversity_loss(g, y, model.num_classes)
        if self.teacher is not None and hp.kd != "none" and hp.lambda_kd > 0 and self.teacher_classes:
            loss = loss + hp.lambda_kd * self._kd(x, h, logits)
        if self._penalty_on() and not self._skip_penalty:
            loss = loss + hp.lambda_pres * self.pres.penalty(model)
        return loss

    def _penalty_on(self) -> bool:
        hp = self.hp
        return hp.preservation != "none" and hp.transfer == "regularize" and bool(self.pres.weights) \
            and hp.lambda_pres > 0

    def _kd(self, x: Tensor, h: Tensor, logits: Tensor) -> Tensor:
        """L_KD: logits (combined output vs teacher) or module (each expert and the router vs its snapshot)."""
        teacher, classes, temperature = self.teacher, self.teacher_classes, self.hp.temperature
        assert teacher is not None
        if self.hp.kd == "logits":
            with torch.no_grad():
                t_out = teacher(x)
            return kd_loss(logits, t_out, temperature, classes)
        assert isinstance(teacher, DMKDModel)
        old = [i for i in range(min(teacher.n_experts, self.model.n_experts))
               if not self.owner_routing or bool(teacher.owned[i])]
        # Every old expert at once (one matmul per layer); the teacher's stacked weights are built once
        # per snapshot. The mean over experts of batch-mean KL terms is the batch mean over all rows.
        key = (id(teacher), tuple(old))
        if self._teacher_stack is None or self._teacher_stack[0] != key:
            with torch.no_grad():
                self._teacher_stack = (key, stacked_expert_parameters([teacher.experts[i] for i in old])
                                       if old else ())
        with torch.no_grad():
            h_t = teacher.encoder(x)
            t_logits = stacked_expert_logits(self._teacher_stack[1], h_t) if old else None  # type: ignore[arg-type]
            t_router = teacher.router(h_t) if not self.owner_routing and self.hp.routing != "static" else None
        terms, weights = [], []
        if t_logits is not None:
            s_logits = stacked_expert_logits(stacked_expert_parameters([self.model.experts[i] for i in old]), h)
            C = s_logits.shape[2]
            terms.append(kd_loss(s_logits.reshape(-1, C), t_logits.reshape(-1, C), temperature, classes))
            weights.append(float(len(old)))
        if t_router is not None and t_router.shape[1] == self.model.n_experts:
            terms.append(kd_loss(self.model.router(h), t_router, temperature))
            weights.append(1.0)
        if not terms:
            return logits.new_zeros(())
        if len(terms) == 1:
            return terms[0]
        return sum(w * t for w, t in zip(weights, terms)) / sum(weights)

    def after_backward(self, x: Tensor, y: Tensor, task: Task) -> None:
        if self.frozen:
            params = dict(self.model.named_parameters())
            for n, (mask, _) in self.frozen.items():
                if n in params and params[n].grad is not None:
                    params[n].grad.masked_fill_(mask, 0.0)

    def after_step(self, x: Tensor, y: Tensor, task: Task) -> None:
        if self.frozen:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, (mask, value) in self.frozen.items():
                    if n in params:
                        params[n].copy_(torch.where(mask, value, params[n]))

    # ---- after a task ------------------------------------------------------------------------------
    def after_task(self, task: Task) -> None:
        hp, model = self.hp, self.model
        self.seen_classes = sorted(set(self.seen_classes) | set(task.classes))
        model.eval()
        if self.ae_routing:
            self._calibrate_autoencoder(task)
        elif self.hp.routing == "gaussian":
            self._fit_gaussians(task)
        spec: Specialization | None = None
        need_spec = hp.log_specialization or hp.routing == "entropy" or hp.scale_by_specialization \
            or hp.prune != "off"
        if need_spec:
            spec = self._specialization(task)
        if spec is not None and hp.routing == "entropy":
            model.spec_bias.copy_(hp.beta * specialization_scores(spec.expert_entropy, model.num_classes).float())
        if spec is not None and hp.prune != "off":
            spec = self._prune(spec)
        if hp.preservation != "none":
            self._update_importance(task, spec)
        if hp.teacher == "snapshot" and hp.kd != "none":
            self.teacher = frozen_copy(model)
        self.teacher_classes = list(self.seen_classes)
        model.train()

    @torch.no_grad()
    def _calibrate_autoencoder(self, task: Task) -> None:
        """Mark the home expert as owning data; store its autoencoder's mean training error."""
        ae = self.model.autoencoders[self.home]
        err_sum, n = torch.zeros((), device=self.ctx.device), 0
        for x, _ in self.train_data(task, self.ctx.protocol.eval_batch_size):
            flat = x.reshape(len(x), -1)
            err_sum += (ae(flat) - flat).pow(2).mean(1).sum()
            n += len(x)
        self.model.ae_scale[self.home] = err_sum / max(n, 1)
        self.model.owned[self.home] = True

    @torch.no_grad()
    def _fit_gaussians(self, task: Task) -> None:
        """Per class of the task, the mean of the home expert's hidden features on the task's training data
        and the expert's pooled within-class (biased) diagonal variance, clamped at gauss_var_floor."""
        model, home, classes = self.model, self.home, list(task.classes)
        hdim, dev = model.expert_hidden, self.ctx.device
        total = torch.zeros(model.num_classes, hdim, dtype=torch.float64, device=dev)
        total_sq = torch.zeros_like(total)
        count = torch.zeros(model.num_classes, dtype=torch.float64, device=dev)
        for x, y in self.train_data(task, self.ctx.protocol.eval_batch_size):
            f = model.expert_features(home, model.encoder(x)).double()
            total.index_add_(0, y, f)
            total_sq.index_add_(0, y, f * f)
            count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        idx = torch.tensor([c for c in classes if float(count[c]) > 0], dtype=torch.long, device=dev)
        if len(idx) == 0:
            return
        n = count[idx].unsqueeze(1)
        mean = total[idx] / n
        within = (total_sq[idx] - n * mean.pow(2)).sum(dim=0) / n.sum()
        var = within.clamp_min(self.hp.gauss_var_floor)
        model.gauss_mean[home, idx] = mean.to(model.gauss_mean)
        model.gauss_var[home, idx] = var.to(model.gauss_var).expand(len(idx), hdim)
        model.gauss_owned[home, idx] = True
        model.owned[home] = True

    def _specialization(self, task: Task) -> Specialization:
        ctx, model = self.ctx, self.model
        tasks = ctx.scenario.tasks[: task.id + 1]
        spec = measure(model, (b for t in tasks for b in ctx.eval_batches(t, "val")), model.num_classes)
        for i in range(model.n_experts):
            ctx.log_metric(f"dmkd/expert_{i}_entropy", float(spec.expert_entropy[i]), step=task.id)
            ctx.log_metric(f"dmkd/expert_{i}_usage", float(spec.usage[i]), step=task.id)
        ctx.log_metric("dmkd/gate_entropy", spec.gate_entropy, step=task.id)
        ctx.log_metric("dmkd/n_experts", model.n_experts, step=task.id)
        self.history["entropy_per_task"].append(spec.expert_entropy.tolist())
        self.history["usage_per_task"].append(spec.usage.tolist())
        art = ctx.artifacts.setdefault("dmkd", {})
        art.update(self.history)
        art["routing_matrix"] = spec.routing_matrix()
        art["routing_matrix_kind"] = "p(expert|class) from softmax gate mass on the validation data of tasks so far"
        art["class_names"] = list(ctx.scenario.class_names) or [str(c) for c in range(model.num_classes)]
        return spec

    def _prune(self, spec: Specialization) -> Specialization:
        """Remove (or merge into the most similar expert) experts that are rarely used and unspecialised."""
        hp, model = self.hp, self.model
        h_norm = spec.expert_entropy / math.log(model.num_classes)
        cands = [i for i in range(model.n_experts)
                 if float(spec.usage[i]) < hp.prune_usage and float(h_norm[i]) > hp.prune_entropy
                 and (not self.owner_routing or bool(model.owned[i]))]
        mass = spec.mass.clone()
        for i in sorted(cands, reverse=True):
            if model.n_experts <= max(hp.top_k, 1):
                break
            target = None
            if hp.prune == "merge":
                prof = F.normalize(mass, dim=0)
                sim = (prof.t() @ prof[:, i]).masked_fill(torch.arange(mass.shape[1]) == i, -2.0)
                target = int(sim.argmax())
                total = float(spec.usage[i] + spec.usage[target])
                w = float(spec.usage[i]) / total if total > 0 else 0.5
                model.remove_expert(i, merge_into=target, weight=w)
            else:
                model.remove_expert(i)
            self.pres.on_expert_removed(i)
            keep = [j for j in range(mass.shape[1]) if j != i]
            mass = mass[:, keep]
            spec = Specialization(mass, spec.counts[:, keep], spec.expert_entropy[keep], spec.usage[keep],
                                  spec.gate_entropy, spec.n_samples)
            self.frozen = {}
        self.home = min(self.home, model.n_experts - 1)
        return spec

    def _update_importance(self, task: Task, spec: Specialization | None) -> None:
        hp, model = self.hp, self.model
        if hp.preservation == "fisher":
            mask = torch.full((model.num_classes,), -1e4, device=self.ctx.device)
            mask[self.seen_classes] = 0.0
            batches = self.train_data(task, 64)
            omega = fisher_importance(model, batches, hp.fisher_samples, class_mask=mask)
        else:
            omega = magnitude_importance(model)
        scale = None
        if hp.scale_by_specialization and spec is not None:
            s = specialization_scores(spec.expert_entropy, model.num_classes)
            scale = {f"expert_{i}": float(s[i]) for i in range(model.n_experts)}
        self.pres.update(model, omega, accumulate=hp.preservation == "fisher", p=hp.salient_p, module_scale=scale)
        self.ctx.artifacts.setdefault("dmkd", {})["importance_hist"] = importance_histograms(self.pres.importance)

    # ---- inference and accounting ----------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)

    def state_bytes(self) -> int:
        teacher = tensor_bytes(self.teacher) if self.hp.teacher in ("snapshot", "aggregate") else 0
        aes = tensor_bytes(self.model.autoencoders)
        m = self.model
        gauss = tensor_bytes([m.gauss_mean, m.gauss_var, m.gauss_owned]) if self.hp.routing == "gaussian" else 0
        return teacher + aes + gauss + self.pres.nbytes() + tensor_bytes([v for pair in self.frozen.values() for v in pair])

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "n_experts": self.model.n_experts, "extra": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.resize(int(state.get("n_experts", self.model.n_experts)))
        self.model.load_state_dict(state["model"])
        self.load_extra_state(state.get("extra", {}))

    def extra_state(self) -> dict[str, Any]:
        own = self.hp.teacher in ("snapshot", "aggregate")
        snap = self.teacher if own and isinstance(self.teacher, DMKDModel) else None
        return {
            "teacher": None if snap is None else snap.state_dict(),
            "teacher_n": None if snap is None else snap.n_experts,
            "teacher_classes": self.teacher_classes,
            "seen_classes": self.seen_classes,
            "pres": self.pres.state(),
            "frozen": self.frozen,
            "home": self.home,
            "history": self.history,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("teacher") is not None:
            snap = frozen_copy(self.model)
            snap.resize(int(state["teacher_n"]))
            snap.load_state_dict(state["teacher"])
            self.teacher = frozen_copy(snap)
        self.teacher_classes = list(state.get("teacher_classes", []))
        self.seen_classes = list(state.get("seen_classes", []))
        self.pres.load(state.get("pres", {}))
        self.frozen = dict(state.get("frozen", {}))
        self.home = int(state.get("home", 0))
        self.history = state.get("history", self.history)
