"""Simple MoE (METHODS.md §3): DMKD's experts and learned router with KD, preservation and
specialization all off; the router still has its load-balance term."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.config import require
from harness.core.method import register
from methods.dmkd.hparams import DMKDParams
from methods.dmkd.method import DMKD


@dataclass
class MoEParams(DMKDParams):
    """DMKD's fields with kd=none, preservation=none, routing=learned, log_specialization=False,
    top_k=2 (with K=1 the renormalised gate is always 1 and the router would learn only from the
    balance term), combine=logits (the classic gate-weighted sum of expert outputs); every other
    field keeps DMKD's documented default."""

    routing: str = "learned"
    combine: str = "logits"
    top_k: int = 2
    kd: str = "none"
    preservation: str = "none"
    log_specialization: bool = False

    def validate(self) -> None:
        super().validate()
        require(self.training == "centralized", "moe is a centralized baseline (training=decentralized is DMKD's)",
                "use --method dmkd --set training=decentralized for the decentralized mixture")


@register
class SimpleMoE(DMKD):
    NAME = "moe"
    HParams = MoEParams
    DESCRIPTION = "Simple mixture of experts: DMKD's experts and router without KD, preservation, specialization"
