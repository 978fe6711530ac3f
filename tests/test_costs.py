"""FLOP counting: the total-only counter against torch's FlopCounterMode, and the step meter's
boundary work (inside train_task, before the first batch and after a batch stream's end)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness.core.backbones import build_backbone
from harness.core.context import RunContext
from harness.core.data import Scenario, Task, TensorSource
from harness.core.flops import FlopCounter
from harness.core.method import HParams
from harness.core.protocol import Protocol
from harness.engine.costs import StepFlopMeter
from methods.common import batch_mean_fisher, diagonal_fisher
from tests.conftest import TINY, needs_fmnist


def _both(fn):
    """(FlopCounterMode's total, FlopCounter's total) of fn(), each on a fresh call."""
    with FlopCounterMode(display=False) as ref:
        fn()
    with FlopCounter() as new:
        fn()
    return ref.get_total_flops(), new.get_total_flops()


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def test_counter_equals_flopcountermode_on_an_mlp_step():
    torch.manual_seed(0)
    model = build_backbone("mlp", (1, 28, 28), 10)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    ref, new = _both(_train_step(model, x, y))
    macs = 784 * 400 + 400 * 400 + 400 * 10
    assert ref == new == 32 * (2 * macs + 2 * macs + 2 * (400 * 400 + 400 * 10))


def test_counter_equals_flopcountermode_on_a_small_resnet_step():
    torch.manual_seed(0)
    model = build_backbone("resnet18-reduced", (3, 16, 16), 10)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    ref, new = _both(_train_step(model, x, y))
    assert ref == new > 0
    model.eval()
    with torch.no_grad():
        ref, new = _both(lambda: model(x))
    assert ref == new > 0


@pytest.mark.parametrize("per_sample", ["vmap", "linear"])
def test_counter_equals_flopcountermode_on_per_sample_fisher_passes(per_sample):
    """EWC's per-sample gradients (torch.func vmap(grad) or the closed form for Linear layers)."""
    torch.manual_seed(0)
    model = build_backbone("mlp", (1, 28, 28), 10)
    batches = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    ref, new = _both(lambda: diagonal_fisher(model, batches, per_sample=per_sample))
    assert ref == new > 0
    ref, new = _both(lambda: batch_mean_fisher(model, batches))
    assert ref == new > 0


def test_counter_equals_flopcountermode_on_decomposed_ops_and_cond():
    """Operators that reach the mode only through their decomposition (matmul of 3-D tensors,
    einsum, F.linear on 3-D input) and torch.cond, whose count follows FlopCounterMode's rule
    (the larger branch while nothing was counted yet, both branches after)."""
    torch.manual_seed(0)
    a, b, w = torch.randn(4, 5, 6), torch.randn(6, 7), torch.randn(3, 6)

    def ops():
        torch.matmul(a, b)
        torch.einsum("bij,jk->bik", a, b)
        F.linear(a, w)
        F.scaled_dot_product_attention(a, a, a)

    ref, new = _both(ops)
    assert ref == new > 0

    def true_fn(x):
        return (x @ x.T) @ x

    def false_fn(x):
        return x @ x.T @ x @ x.T @ x

    x = torch.randn(4, 4)
    for prefix in (False, True):
        def with_cond(prefix=prefix):
            if prefix:
                x @ x
            torch.cond(x.sum() > 0, true_fn, false_fn, (x,))
        ref, new = _both(with_cond)
        assert ref == new > 0


def test_counter_accumulates_when_entered_again():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    c = FlopCounter()
    with c:
        a @ b
    a @ b  # not counted
    with c:
        a @ b
    assert c.get_total_flops() == 2 * (2 * 3 * 4 * 5)
    with pytest.raises(RuntimeError, match="already entered"), c, c:
        pass


# ---- the step meter: work in train_task outside its steps -----------------------------------
def _toy_scenario(n: int = 10, d: int = 8, n_tasks: int = 2) -> Scenario:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n * n_tasks, d, generator=g), torch.arange(n * n_tasks) % 2
    src = TensorSource(x, y)
    tasks = [Task(t, [0, 1], src, torch.arange(t * n, (t + 1) * n), torch.arange(0), torch.arange(0))
             for t in range(n_tasks)]
    return Scenario("toy", "class", tasks, 2, (d,), "mlp")


@pytest.mark.parametrize("every", [1, 2, 100])
def test_meter_counts_work_before_the_first_batch_and_after_the_stream_exactly(every):
    """A linear step over 10 samples in batches of 4 (4, 4, 2) with a known matmul before the
    first batch, another between two streams and a third after the last: the steps are charged as
    before (at every sampling rate: every step counted, some, only the first), the three matmuls
    land in the boundary FLOPs exactly, and ctx.counted work inside them is counted once."""
    sc = _toy_scenario()
    ctx = RunContext(sc, Protocol(batch_size=4), torch.device("cpu"), 0, lambda: None)
    lin = nn.Linear(8, 3, bias=False)
    pre, mid, post = (torch.randn(5, 6), torch.randn(6, 7)), (torch.randn(2, 3), torch.randn(3, 4)), \
        (torch.randn(7, 2), torch.randn(2, 9))
    mm = lambda ab: ab[0] @ ab[1]
    flops = lambda ab: 2 * ab[0].shape[0] * ab[0].shape[1] * ab[1].shape[1]

    def run_task(extra: bool):
        meter = StepFlopMeter(every=every)
        ctx.step_hook = meter
        ctx.extra_flops = 0
        meter.begin_task()
        if extra:
            mm(pre)
            ctx.counted(mm, pre)  # counted work inside the boundary region: in extra_flops only
        for x, _ in ctx.train_batches(sc.tasks[0]):
            lin(x)
        if extra:
            mm(mid)
        for x, _ in ctx.train_batches(sc.tasks[0]):
            lin(x)
        if extra:
            mm(post)
        meter.finish_task()
        return meter, meter.take_boundary(), ctx.extra_flops

    plain, plain_boundary, plain_extra = run_task(False)
    work, boundary, extra = run_task(True)
    assert plain_boundary == plain_extra == 0
    assert boundary == flops(pre) + flops(mid) + flops(post)
    assert extra == flops(pre)
    assert work.total == plain.total == pytest.approx(2 * 8 * 3 * 20)  # 20 samples, linear in the batch
    assert work.counted_steps == plain.counted_steps == len(range(0, 6, every))
    assert work.per_sample == plain.per_sample == 2 * 8 * 3
    assert not torch._C._len_torch_dispatch_stack()  # no counter left open


def test_meter_closes_its_counter_when_train_task_raises():
    meter = StepFlopMeter()
    meter.begin_task()
    try:
        raise RuntimeError
    except RuntimeError:
        meter.finish_task()
    assert not torch._C._len_torch_dispatch_stack()


@dataclass
class _EdgeParams(HParams):
    edges: bool = False


M, N, K = 64, 48, 32  # the known matmul: 2*M*N*K FLOPs


@needs_fmnist
def test_train_task_work_before_the_first_batch_and_after_the_last_is_in_the_record():
    """A custom train_task with a known matmul before its first batch and after its last batch:
    the recorded training FLOPs grow by exactly 2*M*N*K per matmul (as boundary FLOPs) against the
    same method without them, and the step rate is unchanged."""
    from harness.core import Method, register
    from harness.core.method import METHODS
    from harness.engine.runner import RunSpec, run

    @register
    class _Edges(Method):
        NAME = "_test_train_task_edges"
        HParams = _EdgeParams

        def train_task(self, task):
            a, b = torch.ones(M, K), torch.ones(K, N)
            if self.hp.edges:
                a @ b  # e.g. a teacher or set-up pass before the first batch
            super().train_task(task)
            if self.hp.edges:
                a @ b  # e.g. a consolidation pass after the last batch

    try:
        plain = run(RunSpec("_test_train_task_edges", "split-fmnist", 0, scenario_set=TINY))
        edges = run(RunSpec("_test_train_task_edges", "split-fmnist", 0, method_set={"edges": True},
                            scenario_set=TINY))
    finally:
        METHODS.pop("_test_train_task_edges", None)
    T = plain["n_tasks"]
    added = T * 2 * (2 * M * N * K)
    p, e = plain["costs"], edges["costs"]
    assert e["train_flops_total"] - p["train_flops_total"] == added
    assert e["train_flops_boundary"] - p["train_flops_boundary"] == added
    assert [t["train_flops_per_sample"] for t in edges["per_task"]] == \
        [t["train_flops_per_sample"] for t in plain["per_task"]]
    assert edges["acc"] == plain["acc"]
