"""EWC (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018), METHODS.md §3.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from harness.api import HParams, Method, Task, choice, register, require, tensor_bytes
from harness.defaults import documented
from methods.common import batch_mean_fisher, diagonal_fisher

FISHER_NORMS = ("batch_mean", "per_sample")


@dataclass
class EWCParams(HParams):
    """EWC options; each field documents its default and source (``dmkd list --method ewc``)."""

    ewc_lambda: float = documented(
        5000.0, "penalty strength λ in (λ/2) Σ F (θ−θ*)²; its scale depends on fisher_norm",
        "FACIL (Masana et al. 2022, src/approach/ewc.py: lamb=5000, λ/2 penalty, batch-mean Fisher) for its "
        "class-IL CIFAR-100 benchmark; van de Ven et al. 2019 search 1..1e9: tune it")
    mode: str = documented(
        "separate", "separate (one penalty per past task) | online (one running Fisher, latest anchor)",
        "Kirkpatrick et al. 2017 (separate); online: Schwarz et al. 2018")
    gamma: float = documented(
        1.0, "online mode: decay γ of the running Fisher F ← γF + F_t", "van de Ven et al. 2019 (γ=1, no decay)")
    fisher_samples: int = documented(
        0, "training samples of the task used for the Fisher (0 = all)",
        "FACIL (num_samples=-1: all) and Avalanche EWCPlugin (whole experience)")
    fisher_labels: str = documented(
        "empirical", "empirical (true y) | sampled (y ~ p_θ, the true Fisher)",
        "Avalanche EWCPlugin (true labels); FACIL's default uses the predicted label instead")
    fisher_norm: str = documented(
        "batch_mean", "batch_mean (squared gradient of the batch-mean loss, averaged over batches weighted by "
        "batch size; ~batch-size times smaller) | per_sample (mean of squared per-sample gradients, the "
        "definition of METHODS.md §3)", "batch_mean: FACIL and Avalanche; per_sample: Kirkpatrick et al. 2017")
    fisher_batch: int = documented(
        0, "batch size of the Fisher pass (0 = the protocol's batch_size); sets the scale under batch_mean, "
        "only memory under per_sample", "FACIL and Avalanche: the training batch size")

    def validate(self) -> None:
        require(self.ewc_lambda >= 0, f"ewc_lambda must be >= 0, got {self.ewc_lambda}", "use e.g. ewc_lambda=5000")
        choice(self.mode, ("separate", "online"), "mode")
        choice(self.fisher_labels, ("empirical", "sampled"), "fisher_labels")
        choice(self.fisher_norm, FISHER_NORMS, "fisher_norm")
        require(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}", "use gamma=1.0")
        require(self.fisher_samples >= 0, "fisher_samples must be >= 0", "use 0 for all samples")
        require(self.fisher_batch >= 0, "fisher_batch must be >= 0", "use 0 for the protocol's batch size")


@register
class EWC(Method):
    NAME = "ewc"
    HParams = EWCParams
    DESCRIPTION = "Elastic Weight Consolidation (separate or online), diagonal Fisher penalty"

    def __init__(self, hp: EWCParams, ctx) -> None:
        super().__init__(hp, ctx)
        self.fishers: list[dict[str, Tensor]] = []  # separate: one per task; online: one
        self.anchors: list[dict[str, Tensor]] = []

    def _params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def penalty(self) -> Tensor:
        """(λ/2) Σ_tasks Σ_i F_i (θ_i − θ*_i)² (zero before the first boundary)."""
        total = torch.zeros((), device=self.ctx.device)
        params = self._params()
        for fisher, anchor in zip(self.fishers, self.anchors):
            for n, p in params.items():
                total = total + (fisher[n] * (p - anchor[n]).pow(2)).sum()
        return 0.5 * self.hp.ewc_lambda * total

    def training_loss(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        loss = nn.functional.cross_entropy(self.model(x), y)
        if self.fishers:
            loss = loss + self.penalty()
        return loss

    def after_task(self, task: Task) -> None:
        gen = torch.Generator().manual_seed(self.ctx.seed * 1000 + task.id)
        bs = self.hp.fisher_batch or self.ctx.protocol.batch_size
        batches = task.batches("train", bs, shuffle=True, generator=gen, device=self.ctx.device)
        estimate = batch_mean_fisher if self.hp.fisher_norm == "batch_mean" else diagonal_fisher
        fisher = estimate(self.model, batches, labels=self.hp.fisher_labels,
                          max_samples=self.hp.fisher_samples or None, generator=gen)
        anchor = {n: p.detach().clone() for n, p in self._params().items()}
        if self.hp.mode == "online" and self.fishers:
            fisher = {n: self.hp.gamma * self.fishers[0][n] + f for n, f in fisher.items()}
            self.fishers, self.anchors = [fisher], [anchor]
        else:
            self.fishers.append(fisher)
            self.anchors.append(anchor)

    def state_bytes(self) -> int:
        return tensor_bytes(self.fishers, self.anchors)

    def extra_state(self) -> dict[str, Any]:
        return {"fishers": self.fishers, "anchors": self.anchors}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        dev = self.ctx.device
        self.fishers = [{n: t.to(dev) for n, t in f.items()} for f in state.get("fishers", [])]
        self.anchors = [{n: t.to(dev) for n, t in a.items()} for a in state.get("anchors", [])]

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        """λ log-uniform over 1..1e6 (van de Ven 2019 searched 1..1e9; FACIL's grid 1e2..1e4)."""
        return {**super().search_space(trial), "ewc_lambda": trial.suggest_float("ewc_lambda", 1.0, 1e6, log=True)}
