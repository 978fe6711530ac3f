"""Class masks of the evaluation settings, shared by the engine's evaluation and by methods that log
the accuracy of models other than the reported one (DIMAT's agents, decentralized DMKD's nodes).

A mask is additive over the logits: 0 keeps a class, -inf removes it, so ``(logits + mask).argmax(1)``
is the argmax over the kept classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from harness.core.context import RunContext
from harness.core.data import Scenario, Task


def class_masks(scenario: Scenario, device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """Additive masks: seen[k] keeps classes of tasks 0..k; own[j] keeps task j's classes."""
    C = scenario.num_classes
    seen, own = [], []
    acc = torch.full((C,), float("-inf"))
    for t in scenario.tasks:
        m = torch.full((C,), float("-inf"))
        m[t.classes] = 0.0
        acc = torch.maximum(acc, m)
        seen.append(acc.clone().to(device))
        own.append(m.to(device))
    return seen, own


@torch.no_grad()
def seen_classes_accuracy(ctx: RunContext, models: Iterable[Callable[[Tensor], Tensor]], task: Task,
                          split: str = "val") -> float:
    """Class-IL accuracy pooled over ``models`` and the samples of tasks 0..``task.id``'s ``split``: argmax
    over every class seen so far. The models are called as they are (the caller sets eval mode)."""
    mask = class_masks(ctx.scenario, ctx.device)[0][task.id]
    correct = torch.zeros((), device=ctx.device)
    n = 0
    for model in models:
        for t in ctx.scenario.tasks[: task.id + 1]:
            for x, y in ctx.eval_batches(t, split):
                correct += ((model(x) + mask).argmax(1) == y).sum()
                n += len(y)
    return float(correct) / max(n, 1)
