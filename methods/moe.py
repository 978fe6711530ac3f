"""Simple MoE (docs/methods.md §3): DMKD's experts and learned router with KD, preservation and
specialization all off; the router still has its load-balance term."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.config import require
from harness.core.method import register
from methods.dmkd.hparams import DMKDParams, redeclared
from methods.dmkd.method import DMKD


@dataclass
class MoEParams(DMKDParams):
    """DMKD's fields with KD, preservation and specialization off and the proposal's learned router
    (``dmkd list --method moe``); every other field keeps DMKD's documented default."""

    routing: str = redeclared(
        DMKDParams, "routing", "learned",
        "docs/methods.md §3 (Simple MoE: DMKD's experts and router) and §4 (the learned router "
        "g(x) = softmax(W f_enc(x) + b))")
    combine: str = redeclared(
        DMKDParams, "combine", "logits",
        "docs/methods.md §4 (y = Σ g̃_i M_i(x), the classic gate-weighted sum of expert outputs); configs/dmkd.yaml: "
        "better than probs for a learned router on validation (task-IL 0.944 vs 0.889)")
    top_k: int = redeclared(
        DMKDParams, "top_k", 2,
        "ours: with K=1 the renormalised gate is always 1 and the router would learn only from the balance "
        "term; search 1..3 as DMKD")
    kd: str = redeclared(DMKDParams, "kd", "none", "docs/methods.md §3 (Simple MoE: KD off)")
    preservation: str = redeclared(DMKDParams, "preservation", "none",
                                   "docs/methods.md §3 (Simple MoE: preservation off)")
    log_specialization: bool = redeclared(DMKDParams, "log_specialization", False,
                                          "docs/methods.md §3 (Simple MoE: specialization off)")

    def validate(self) -> None:
        super().validate()
        require(self.training == "centralized", "moe is a centralized baseline (training=decentralized is DMKD's)",
                "use --method dmkd --set training=decentralized for the decentralized mixture")


@register
class SimpleMoE(DMKD):
    NAME = "moe"
    HParams = MoEParams
    DESCRIPTION = "Simple mixture of experts: DMKD's experts and router without KD, preservation, specialization"
