"""FT: plain fine-tuning, task after task; the lower bound of every leaderboard."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.method import HParams, Method, register


@dataclass
class FTParams(HParams):
    """FT has no hyperparameters of its own (the protocol sets lr, epochs, batch size)."""


@register
class FineTuning(Method):
    NAME = "ft"
    HParams = FTParams
    DESCRIPTION = "Fine-tuning: cross-entropy on the current task only (lower bound)"
