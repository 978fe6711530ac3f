"""EWC (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018), docs/methods.md §3.

L = L_t + (λ/2) Σ_i F_i (θ_i − θ*_i)², F a diagonal Fisher of log p(y|x) on the task's training
data (empirical labels by default, sampled y ~ p_θ as an option). ``separate`` keeps one (F, θ*) pair
per past task; ``online`` keeps one running F ← γF + F_t with the latest anchor. Cross-entropy runs
over the whole head, as FT.

Two normalisations of F, named so that a λ quoted from the literature means what it meant there
(``fisher_norm``): ``per_sample`` is the definition (mean of squared per-sample gradients,
``methods.common.diagonal_fisher``); ``batch_mean`` is FACIL's and Avalanche's (squared gradient of
the batch-mean loss, ``methods.common.batch_mean_fisher``), roughly batch-size times smaller. The
default, λ=5000 with batch_mean at the protocol's batch size, is FACIL's. Avalanche's penalty has no
1/2: its λ equals our λ/2 under batch_mean.

Cost: separate mode does not sum T penalties per step. Σ_t F_t (θ − θ*_t)² is one quadratic in θ,
A (θ − m)² + K per entry, with A = Σ_t F_t, m = Σ_t F_t θ*_t / A (the Fisher-weighted anchor; any
value where A = 0) and K = Σ_t F_t (θ*_t − m)². They are folded in once per task boundary
(:meth:`EWC.consolidate`, a numerically stable update that never forms Σ F θ*²), so a step costs one
quadratic whatever the number of past tasks, the state is two parameter-sized maps, and the loss
value and gradient λ A (θ − m) = λ Σ_t F_t (θ − θ*_t) equal the per-task sum up to float rounding
(exactly after the first task). Online mode is the same quadratic with A ← γA + F_t, m ← θ*_t, K = 0.

Cost against FT (bench/method_cost.py, full Split Fashion-MNIST, one thread): the algorithm needs one
more forward and backward pass over every training sample of the task (FACIL's default Fisher,
fisher_samples=0), so EWC's training costs about 2x FT's (measured on one 12,000-sample task of the
MLP: an FT epoch 0.74 s, the Fisher pass 0.72 s of thread CPU time). The Fisher pass's FLOPs are
measured once per batch shape (``ctx.counted``) rather than under the FLOP counter's per-operation
dispatch, which cost another 0.35-0.58 s per task (50-80% of the pass); the counted FLOPs are the same.
``fisher_samples`` caps the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.core.data import Task
from harness.core.defaults import Search, documented
from harness.core.method import HParams, Method, register, tensor_bytes
from methods.common import batch_mean_fisher, diagonal_fisher

FISHER_NORMS = ("batch_mean", "per_sample")


@dataclass
class EWCParams(HParams):
    """EWC options; each field documents its default and source (``dmkd list --method ewc``)."""

    ewc_lambda: float = documented(
        5000.0, "penalty strength λ in (λ/2) Σ F (θ−θ*)²; its scale depends on fisher_norm",
        "FACIL (Masana et al. 2022, src/approach/ewc.py: lamb=5000, λ/2 penalty, batch-mean Fisher) for its "
        "class-IL CIFAR-100 benchmark; van de Ven et al. 2019 search 1..1e9: tune it", ge=0,
        search=Search.log(1.0, 1e6))  # FACIL's grid 1e2..1e4
    mode: str = documented(
        "separate", "separate (one penalty per past task) | online (one running Fisher, latest anchor)",
        "Kirkpatrick et al. 2017 (separate); online: Schwarz et al. 2018", choices=("separate", "online"))
    gamma: float = documented(
        1.0, "online mode: decay γ of the running Fisher F ← γF + F_t", "van de Ven et al. 2019 (γ=1, no decay)", ge=0, le=1)
    fisher_samples: int = documented(
        0, "training samples of the task used for the Fisher (0 = all)",
        "FACIL (num_samples=-1: all) and Avalanche EWCPlugin (whole experience)", ge=0)
    fisher_labels: str = documented(
        "empirical", "empirical (true y) | sampled (y ~ p_θ, the true Fisher)",
        "Avalanche EWCPlugin (true labels); FACIL's default uses the predicted label instead",
        choices=("empirical", "sampled"))
    fisher_norm: str = documented(
        "batch_mean", "batch_mean (squared gradient of the batch-mean loss, averaged over batches weighted by "
        "batch size; ~batch-size times smaller) | per_sample (mean of squared per-sample gradients, the "
        "definition of docs/methods.md §3)", "batch_mean: FACIL and Avalanche; per_sample: Kirkpatrick et al. 2017",
        choices=FISHER_NORMS)
    fisher_batch: int = documented(
        0, "batch size of the Fisher pass (0 = the protocol's batch_size); sets the scale under batch_mean, "
        "only memory under per_sample", "FACIL and Avalanche: the training batch size", ge=0)


@register
class EWC(Method):
    NAME = "ewc"
    STATE = ("coef", "center", "offset", "n_consolidated")  # checkpointed by the base class
    STATE_KINDS = {"coef": "importance", "center": "snapshot", "offset": "importance"}
    HParams = EWCParams
    DESCRIPTION = "Elastic Weight Consolidation (separate or online), diagonal Fisher penalty"

    def __init__(self, hp: EWCParams, ctx) -> None:
        super().__init__(hp, ctx)
        # The accumulated penalty Σ_n [A_n (θ_n − m_n)²] + K (see the module docstring).
        self.coef: dict[str, Tensor] = {}  # A
        self.center: dict[str, Tensor] = {}  # m
        self.offset = torch.zeros((), device=ctx.device)  # K, summed over every entry
        self.n_consolidated = 0

    def _params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def penalty(self) -> Tensor:
        """(λ/2) Σ_tasks Σ_i F_i (θ_i − θ*_i)² (zero before the first boundary), as (λ/2)(Σ A (θ − m)² + K)."""
        total = torch.zeros((), device=self.ctx.device)
        for n, p in self._params().items():
            if n in self.coef:
                total = total + (self.coef[n] * (p - self.center[n]).pow(2)).sum()
        return 0.5 * self.hp.ewc_lambda * (total + self.offset)

    def consolidate(self, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Fold one task's (F_t, θ*_t) into the quadratic's coefficients (A, m, K)."""
        with torch.no_grad():
            if self.hp.mode == "online" or not self.coef:
                gamma = self.hp.gamma if self.coef else 0.0
                self.coef = {n: gamma * self.coef[n] + f if n in self.coef else f.clone() for n, f in fisher.items()}
                self.center = {n: a.clone() for n, a in anchor.items()}
                self.offset = torch.zeros((), device=self.ctx.device)
            else:
                offset = self.offset.clone()
                for n, f in fisher.items():
                    a_old, m_old, a = self.coef[n], self.center[n], anchor[n]
                    coef = a_old + f
                    # m = m_old + (F_t / A)(θ*_t − m_old); where A = 0 the entry has no penalty: keep θ*_t.
                    m = torch.where(a_old > 0, m_old + f / coef.clamp_min(1e-38) * (a - m_old), a)
                    # Σ_{s<t} F_s (θ*_s − m)² = K_old + A_old (m_old − m)², plus the new task's own term.
                    offset = offset + (a_old * (m_old - m).pow(2)).sum() + (f * (a - m).pow(2)).sum()
                    self.coef[n], self.center[n] = coef, m
                self.offset = offset
        self.n_consolidated += 1

    def training_loss(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        loss = nn.functional.cross_entropy(self.model(x), y)
        if self.coef:
            loss = loss + self.penalty()
        return loss

    def training_step(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        """Cross-entropy by autograd; the penalty's gradient λ A (θ − m) is added to .grad directly
        (no graph through the quadratic: two passes over the parameters instead of a dozen)."""
        if not self.coef:
            return super().training_step(x, y, task)
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.ctx.backward(loss, self.optimizer)  # fp16: scaled, then unscaled before the penalty is added
        loss = loss.detach() + self.add_penalty_grad()
        self.ctx.step(self.optimizer)
        return loss

    @torch.no_grad()
    def add_penalty_grad(self) -> Tensor:
        """Add ∂penalty/∂θ = λ A (θ − m) to every parameter's .grad; return the penalty's value."""
        total = torch.zeros((), device=self.ctx.device)
        lam = self.hp.ewc_lambda
        for n, p in self._params().items():
            if n not in self.coef:
                continue
            diff = p - self.center[n]
            scaled = self.coef[n] * diff
            total = total + torch.dot(scaled.reshape(-1), diff.reshape(-1))
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(scaled, alpha=lam)
        return 0.5 * lam * (total + self.offset)

    def after_task(self, task: Task) -> None:
        gen = torch.Generator().manual_seed(self.ctx.seed * 1000 + task.id)
        bs = self.hp.fisher_batch or self.ctx.protocol.batch_size
        batches = task.batches("train", bs, shuffle=True, generator=gen, device=self.ctx.device)
        if self.hp.fisher_norm == "batch_mean":  # each batch's FLOPs measured once per batch shape
            fisher = batch_mean_fisher(self.model, batches, labels=self.hp.fisher_labels,
                                       max_samples=self.hp.fisher_samples or None, generator=gen,
                                       run=self.ctx.counted)
        else:
            fisher = diagonal_fisher(self.model, batches, labels=self.hp.fisher_labels,
                                     max_samples=self.hp.fisher_samples or None, generator=gen)
        self.consolidate(fisher, {n: p.detach().clone() for n, p in self._params().items()})

    def state_bytes(self) -> int:
        return tensor_bytes(self.coef, self.center, self.offset)
