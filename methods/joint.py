"""Joint: the upper bound, trained cumulatively (docs/methods.md §3).

At task t the model trains on the union of tasks 0..t, so the accuracy matrix is complete and its
last row is joint training on all data. Budget: the stated exception of docs/methods.md §6 (``BUDGET =
"cumulative"``): task t spends epochs passes over the union, epochs x |D_0..D_t| / |D_t| passes of D_t.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.data import Task
from harness.core.defaults import documented
from harness.core.method import HParams, Method, register


@dataclass
class JointParams(HParams):
    """Joint options; each field documents its default and source (``dmkd list --method joint``)."""

    reinit: bool = documented(False, "start every task from the random initialisation (True) instead of "
                              "continuing from the previous task's weights", "Avalanche's Cumulative strategy "
                              "(continues the weights)")


@register
class Joint(Method):
    NAME = "joint"
    HParams = JointParams
    DESCRIPTION = "Cumulative joint training on all tasks so far (upper bound)"
    BUDGET = "cumulative"  # the one stated exception to the budget of docs/methods.md §6

    def before_task(self, task: Task) -> None:
        if self.hp.reinit:
            self.model = self.ctx.make_model()
        super().before_task(task)

    def train_task(self, task: Task) -> None:
        self.model.train()
        seen = self.ctx.scenario.tasks[: task.id + 1]
        for x, y in self.ctx.train_batches(seen):
            self.training_step(x, y, task)
