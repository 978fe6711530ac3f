"""Accuracy of a method on every task's split after a task, in each setting of the scenario.

Class-IL: argmax over the classes seen so far; task-IL: over the task's own classes; domain-IL: over
all classes. The runner calls :func:`evaluate` after every task (and once before training).
"""

from __future__ import annotations

import torch

from harness.core.accuracy import class_masks
from harness.core.context import RunContext
from harness.core.data import CLASS_IL, DOMAIN_IL, TASK_IL, Scenario
from harness.core.method import Method


@torch.no_grad()
def evaluate(
    method: Method, scenario: Scenario, after_task: int, split: str, ctx: RunContext
) -> dict[str, list[float]]:
    """Accuracy on every task's split after training task ``after_task``.

    Class-IL: argmax over the classes of tasks 0..max(after_task, j) (every class seen so far;
    for a task not yet trained, the classes up to it, so FWT's entries are defined).
    Task-IL: argmax over task j's own classes. Domain-IL: plain argmax over all classes.
    """
    with ctx.autocast():  # the protocol's precision, as in training
        return _evaluate(method, scenario, after_task, split, ctx)


def _evaluate(
    method: Method, scenario: Scenario, after_task: int, split: str, ctx: RunContext
) -> dict[str, list[float]]:
    method.eval_mode()
    seen, own = class_masks(scenario, ctx.device)
    out: dict[str, list[float]] = {s: [] for s in scenario.settings}
    for j, task in enumerate(scenario.tasks):
        correct = {s: torch.zeros((), dtype=torch.long, device=ctx.device) for s in scenario.settings}
        n = 0
        for x, y in ctx.eval_batches(task, split):
            logits = method.predict(x)
            n += len(y)
            if scenario.setting == "class":
                correct[CLASS_IL] += (( logits + seen[max(after_task, j)]).argmax(1) == y).sum()
                correct[TASK_IL] += ((logits + own[j]).argmax(1) == y).sum()
            else:
                correct[DOMAIN_IL] += (logits.argmax(1) == y).sum()
        for s in scenario.settings:
            out[s].append(float(correct[s]) / max(n, 1))
    return out
