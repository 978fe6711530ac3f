"""LwF (Li & Hoiem 2016), docs/methods.md §3.

L = CE(z, y) over the whole head + α · T² · KL(σ(z_old/T) ‖ σ(z/T)) on the logits of the old
classes (classes of tasks before the current one), z_old from a frozen copy of the model taken at
the previous task boundary. The KD term is the shared ``methods.common.kd_loss`` (batchmean, T²).
Avalanche's LwF has no T² factor: its ``alpha`` equals our α·T².
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from harness.core.data import Task
from harness.core.defaults import Search, documented
from harness.core.method import HParams, Method, register, tensor_bytes
from methods.common import frozen_copy, kd_loss


@dataclass
class LwFParams(HParams):
    """LwF options; each field documents its default and source (``dmkd list --method lwf``)."""

    alpha: float = documented(1.0, "weight α of the distillation term α·T²·KL on the old classes",
                              "Li & Hoiem 2016: λ_o = 1 (all their experiments)", ge=0,
                              search=Search.log(0.1, 10.0))  # FACIL's grid 0.5..10
    temperature: float = documented(2.0, "KD temperature T",
                                    "Li & Hoiem 2016: T = 2 (following Hinton et al. 2015)", gt=0,
                                    search=Search.categorical(1.0, 2.0, 4.0))


@register
class LwF(Method):
    NAME = "lwf"
    STATE_KINDS = {"teacher": "snapshot"}
    HParams = LwFParams
    DESCRIPTION = "Learning without Forgetting: distil the previous model on the old classes"

    def __init__(self, hp: LwFParams, ctx) -> None:
        super().__init__(hp, ctx)
        self.teacher: nn.Module | None = None
        self.old_classes: list[int] = []
        self._old_idx: Tensor | None = None

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.old_classes = sorted({c for t in self.ctx.scenario.tasks[: task.id] for c in t.classes})
        self._old_idx = torch.tensor(self.old_classes, dtype=torch.long, device=self.ctx.device)

    def training_loss(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits, y)
        if self.teacher is not None and self.old_classes and self.hp.alpha > 0:
            with torch.no_grad():
                old = self.teacher(x)
            loss = loss + self.hp.alpha * kd_loss(logits, old, self.hp.temperature, self._old_idx)
        return loss

    def after_task(self, task: Task) -> None:
        self.teacher = frozen_copy(self.model)

    def state_bytes(self) -> int:
        return tensor_bytes(self.teacher)

    def extra_state(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else self.teacher.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        sd = state.get("teacher")
        if sd is None:
            self.teacher = None
            return
        teacher = self.ctx.make_model()
        teacher.load_state_dict(sd)
        self.teacher = frozen_copy(teacher)

