"""The runner: evaluation masks, determinism, measured costs against analytic counts."""

import numpy as np
import pytest
import torch

from harness.core.accuracy import seen_classes_accuracy
from harness.core.context import RunContext
from harness.core.data import Scenario, Task, TensorSource
from harness.core.errors import UserError
from harness.core.protocol import Protocol
from harness.engine import metrics
from harness.engine.evaluation import evaluate
from harness.engine.runner import RunSpec, run
from tests.conftest import TINY, needs_fmnist


class _FixedLogits:
    """Stand-in method: class 9 scores 10, the true class (encoded in x) scores 5."""

    def eval_mode(self):
        pass

    def predict(self, x):
        y = x[:, 0].long()
        logits = torch.zeros(len(x), 10)
        logits[torch.arange(len(x)), y] = 5.0
        logits[:, 9] += 10.0
        return logits


def _toy_scenario():
    y = torch.arange(10).repeat_interleave(4)  # 4 samples per class
    x = y.float().unsqueeze(1)
    src = TensorSource(x, y)
    tasks = []
    for t in range(5):
        idx = torch.nonzero((y == 2 * t) | (y == 2 * t + 1)).flatten()
        tasks.append(Task(t, [2 * t, 2 * t + 1], src, idx, idx[:0], idx))
    return Scenario("toy", "class", tasks, 10, (1,), "mlp")


def test_class_il_and_task_il_masks_hand_computed():
    sc = _toy_scenario()
    ctx = RunContext(sc, Protocol(), torch.device("cpu"), 0, lambda: None)
    m = _FixedLogits()
    # After task 1 (classes 0..3 seen) class 9 is masked out for tasks 0, 1: the true class wins.
    after1 = evaluate(m, sc, 1, "test", ctx)
    assert after1["class_il"][:2] == [1.0, 1.0]
    # Task 4 (not yet trained) is evaluated over classes up to its own: 9 wins -> half right.
    assert after1["class_il"][4] == 0.5
    # After the last task class 9 is always predicted: only task 4's class-9 samples are right.
    after4 = evaluate(m, sc, 4, "test", ctx)
    assert after4["class_il"] == [0.0, 0.0, 0.0, 0.0, 0.5]
    # Task-IL restricts to the task's own two classes: class 9 matters only for task 4.
    assert after4["task_il"] == [1.0, 1.0, 1.0, 1.0, 0.5]


def test_seen_classes_accuracy_pools_models_and_tasks_hand_computed():
    sc = _toy_scenario()
    for t in sc.tasks:
        t.val_idx = t.test_idx  # the helper reads the validation split
    ctx = RunContext(sc, Protocol(), torch.device("cpu"), 0, lambda: None)
    favours_9 = _FixedLogits().predict  # class 9 scores 10, the true class 5
    always_0 = lambda x: torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()
    right = lambda x: torch.nn.functional.one_hot(x[:, 0].long(), 10).float()
    # After task 1 (classes 0..3 seen, 16 samples): class 9 is masked, favours_9 is always right (16);
    # always_0 is right on the 4 class-0 samples: (16 + 4) / 32.
    assert seen_classes_accuracy(ctx, [favours_9, always_0], sc.tasks[1]) == 20 / 32
    # After task 4 (every class, 40 samples): favours_9 is right only on class 9 (4), right on all 40.
    assert seen_classes_accuracy(ctx, [favours_9, right], sc.tasks[4]) == 44 / 80


@needs_fmnist
def test_same_seed_same_numbers_and_metrics_match_matrix():
    spec = lambda: RunSpec("ft", "split-fmnist", 3, scenario_set=TINY)
    a, b = run(spec()), run(spec())
    assert a["acc"] == b["acc"]
    assert a["random_init_acc"] == b["random_init_acc"]
    R = np.array(a["acc"]["class_il"])
    assert R.shape == (5, 5)
    assert a["metrics"]["class_il"]["forgetting"] == pytest.approx(metrics.forgetting(R))
    assert a["metrics"]["class_il"]["bwt"] == pytest.approx(metrics.backward_transfer(R))
    assert a["metrics"]["class_il"]["fwt"] == pytest.approx(
        metrics.forward_transfer(R, a["random_init_acc"]["class_il"]))
    # A different seed changes the initialisation and the data order.
    c = run(RunSpec("ft", "split-fmnist", 4, scenario_set=TINY))
    assert c["acc"] != a["acc"]


@needs_fmnist
def test_costs_match_analytic_mlp_counts():
    rec = run(RunSpec("ft", "split-fmnist", 0, scenario_set=TINY))
    macs = 784 * 400 + 400 * 400 + 400 * 10
    c = rec["costs"]
    assert c["params_total"] == macs + 400 + 400 + 10
    assert c["inference_flops_per_sample"] == 2 * macs
    # forward (2 MACs) + weight gradients (2 MACs) + input gradients of all but the first layer
    per_sample = 2 * macs + 2 * macs + 2 * (400 * 400 + 400 * 10)
    assert c["train_flops_per_sample"] == pytest.approx(per_sample, rel=1e-9)
    assert c["train_flops_total"] == pytest.approx(per_sample * c["train_samples"], rel=1e-9)
    assert c["train_samples"] == sum(t["n_train"] for t in rec["tasks"])
    assert c["comm_bytes"] == 0 and c["peak_memory_bytes"] > 0


@needs_fmnist
def test_joint_trains_on_the_union_and_beats_ft():
    ft = run(RunSpec("ft", "split-fmnist", 0, scenario_set=TINY))
    jt = run(RunSpec("joint", "split-fmnist", 0, scenario_set=TINY))
    n = [t["n_train"] for t in jt["tasks"]]
    assert [p["train_samples"] for p in jt["per_task"]] == list(np.cumsum(n))
    assert jt["metrics"]["class_il"]["final_avg_acc"] > ft["metrics"]["class_il"]["final_avg_acc"] + 0.2


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match="unknown method"):
        run(RunSpec("nope", "split-fmnist", 0))
    with pytest.raises(UserError, match="unknown scenario"):
        run(RunSpec("ft", "nope", 0))
    with pytest.raises(UserError, match="unknown option"):
        run(RunSpec("ft", "split-fmnist", 0, method_set={"bogus": 1}))
    with pytest.raises(UserError, match="lr must be"):
        run(RunSpec("ft", "split-fmnist", 0, protocol=Protocol(lr=-1.0)))


def test_counted_work_between_steps_adds_exact_flops_once():
    from harness.engine.costs import StepFlopMeter

    sc = _toy_scenario()
    ctx = RunContext(sc, Protocol(), torch.device("cpu"), 0, lambda: None)
    meter = StepFlopMeter(every=1)
    ctx.step_hook = meter
    lin = torch.nn.Linear(8, 3)
    meter(4)  # a step counter is open, as right after a batch was handed out
    with torch.no_grad():
        ctx.counted(lin, torch.randn(5, 8))
    meter.finish_task()
    assert ctx.extra_flops == 2 * 5 * 8 * 3
    assert meter.total == 0  # the open step counter was closed first: no double count


@needs_fmnist
def test_a_custom_schedule_that_never_checks_its_losses_is_caught_by_the_runner():
    """The runner checks every loss that went through ctx.backward after each train_task: a method
    with its own loop and no check of its own still fails as diverged, at the task it diverged."""
    from harness.core import Method, register
    from harness.core.context import TrainingDiverged
    from harness.core.method import METHODS

    @register
    class _NanAtTask1(Method):
        NAME = "_test_nan_at_task1"

        def train_task(self, task):
            self.model.train()
            for x, y in self.ctx.train_batches(task):
                self.optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(self.model(x), y)
                if task.id == 1:
                    loss = loss * float("nan")
                self.ctx.backward(loss, self.optimizer)
                self.ctx.step(self.optimizer)

    try:
        with pytest.raises(TrainingDiverged, match="task 1"):
            run(RunSpec("_test_nan_at_task1", "split-fmnist", 0, scenario_set=TINY))
    finally:
        METHODS.pop("_test_nan_at_task1", None)
