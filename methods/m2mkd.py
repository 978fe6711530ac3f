"""m2mKD adapted for continual learning (Lo et al. 2024; docs/methods.md §3).

The backbone is cut into a sequence of modules T_1..T_N (one per Linear/Conv stage, the head last).
At a task boundary the model becomes the frozen teacher. At the next task:
Phase 1, for each i: the hybrid z_S = T_{>i}(S_i(T_{<i}(x))) trains only S_i (a copy of module i) with
(1−α)·CE(z_S, y) + α·τ²·KL(σ(z_T/τ) ‖ σ(z_S/τ)), z_T the full teacher's logits; the trained S_i are
then assembled. Phase 2: the assembled student trains end to end with CE + α·τ²·KL (same KD term).
KL reduction: batchmean (sum over classes, mean over samples; methods.common.kd_loss), restricted to
the classes the teacher has seen (the CL adaptation; new classes have no teacher signal). The official
code divides by batch×classes instead. Task 0 has no teacher: plain CE.

Budget (docs/methods.md §6): both phases share the protocol's ``epochs`` passes over the task. The task's
training stream (epochs passes, reshuffled every pass) is cut into consecutive pieces: the first
``phase1_share`` of its batches go to phase 1, split equally over the N modules, the rest to phase 2.
Task 0 (no teacher) spends the whole stream on plain CE.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core.context import RunContext
from harness.core.data import Task
from harness.core.defaults import Search, documented
from harness.core.method import HParams, Method, register, tensor_bytes
from methods.common import frozen_copy, kd_loss


@dataclass
class M2MKDParams(HParams):
    """m2mKD options; each field documents its default and source (``dmkd list --method m2mkd``)."""

    alpha: float = documented(0.5, "KD weight α: (1−α)·CE + α·τ²·KL in phase 1, CE + α·τ²·KL in phase 2",
                              "Lo et al. 2024 (m2mKD): α = 0.5", ge=0, le=1, search=Search.uniform(0.1, 0.9))
    temperature: float = documented(1.0, "KD temperature τ", "Lo et al. 2024 (m2mKD): τ = 1", gt=0,
                                    search=Search.categorical(1.0, 2.0, 4.0))
    phase1_share: float = documented(
        0.5, "share of the task's training batches spent on phase 1 (split equally over the modules; 0 skips "
        "it), the rest on phase 2", "ours: the paper gives each phase its own schedule; under one budget "
        "(docs/methods.md §6) the split is a choice, half and half, to be tuned", ge=0, lt=1)


def split_modules(backbone: nn.Module) -> nn.Sequential:
    """The backbone as a sequence of modules: a new module starts at every Linear/Conv of a
    Sequential feature extractor (leading shape-only layers join the first); the head is last."""
    feats, head = backbone.features, backbone.head
    if not isinstance(feats, nn.Sequential):
        return nn.Sequential(feats, head)
    blocks: list[list[nn.Module]] = [[]]
    for layer in feats:
        starts = isinstance(layer, (nn.Linear, nn.Conv2d))
        if starts and any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in blocks[-1]):
            blocks.append([])
        blocks[-1].append(layer)
    return nn.Sequential(*[nn.Sequential(*b) for b in blocks], head)


def hybrid_forward(teacher: nn.Sequential, student_module: nn.Module, i: int, x: Tensor, start: int = 0) -> Tensor:
    """z_S = T_{>i}(S_i(T_{<i}(x))): only the student module carries gradients. ``start=i`` when x is
    already T_{<i}(x) (the caller ran the teacher's prefix)."""
    with torch.no_grad():
        for j in range(start, i):
            x = teacher[j](x)
    x = student_module(x)
    for j in range(i + 1, len(teacher)):
        x = teacher[j](x)
    return x


@register
class M2MKD(Method):
    NAME = "m2mkd"
    STATE_KINDS = {"teacher": "snapshot"}
    HParams = M2MKDParams
    DESCRIPTION = "m2mKD (CL): module-wise hybrid distillation from the previous task's snapshot, then end to end"

    def __init__(self, hp: M2MKDParams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        self.model = split_modules(self.model)
        self.teacher: nn.Sequential | None = None
        self.teacher_classes: list[int] = []

    def _loss(self, z: Tensor, y: Tensor, z_t: Tensor | None, phase1: bool) -> Tensor:
        ce = F.cross_entropy(z, y)
        if z_t is None:
            return ce
        kd = kd_loss(z, z_t, self.hp.temperature, self.teacher_classes)
        return ((1 - self.hp.alpha) * ce if phase1 else ce) + self.hp.alpha * kd

    def phase_batches(self, n_train: int) -> tuple[list[int], int]:
        """Batches of each module's phase 1 and of phase 2, out of epochs x ceil(n / batch) in all."""
        total = self.ctx.protocol.epochs * math.ceil(n_train / self.ctx.protocol.batch_size)
        if self.teacher is None or self.hp.phase1_share <= 0:
            return [], total
        p1 = round(self.hp.phase1_share * total)
        n = len(self.model)
        return [(i + 1) * p1 // n - i * p1 // n for i in range(n)], total - p1

    def train_task(self, task: Task) -> None:
        teacher = self.teacher
        phase1, phase2 = self.phase_batches(len(task.train_idx))
        stream = self.ctx.train_batches(task)  # the task's whole budget, cut into the phases' pieces
        if teacher is not None and phase1:
            students = []
            for i, n_batches in enumerate(phase1):
                s_i = copy.deepcopy(teacher[i]).train()
                s_i.requires_grad_(True)
                opt = self.ctx.make_optimizer(s_i.parameters())
                for x, y in itertools.islice(stream, n_batches):
                    opt.zero_grad(set_to_none=True)
                    with torch.no_grad():  # one teacher pass gives both T_{<i}(x) and z_T
                        prefix = x
                        for j in range(i):
                            prefix = teacher[j](prefix)
                        z_t = prefix
                        for j in range(i, len(teacher)):
                            z_t = teacher[j](z_t)
                    loss = self._loss(hybrid_forward(teacher, s_i, i, prefix, start=i), y, z_t, phase1=True)
                    self.ctx.backward(loss)
                    self.ctx.step(opt)
                students.append(s_i)
            with torch.no_grad():
                for module, s_i in zip(self.model, students):
                    module.load_state_dict(s_i.state_dict())
        assert self.optimizer is not None
        self.model.train()
        for x, y in itertools.islice(stream, phase2):
            self.optimizer.zero_grad(set_to_none=True)
            z_t = None
            if teacher is not None:
                with torch.no_grad():
                    z_t = teacher(x)
            loss = self._loss(self.model(x), y, z_t, phase1=False)
            self.ctx.backward(loss)
            self.ctx.step(self.optimizer)

    def after_task(self, task: Task) -> None:
        self.teacher = frozen_copy(self.model)
        self.teacher_classes = sorted(set(self.teacher_classes) | set(task.classes))

    def state_bytes(self) -> int:
        return tensor_bytes(self.teacher)

    def extra_state(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else self.teacher.state_dict(),
                "teacher_classes": self.teacher_classes}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("teacher") is not None:
            self.teacher = frozen_copy(self.model)
            self.teacher.load_state_dict(state["teacher"])
        self.teacher_classes = list(state.get("teacher_classes", []))
