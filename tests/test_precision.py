"""Protocol precision (fp32 | bf16 | fp16), channels_last and compile: validated, recorded, applied centrally.

bf16 autocast runs on the CPU, so these tests run the real autocast path: every hook and the
evaluation run inside one autocast region, fp16 goes through torch.amp's GradScaler, FLOP counts do
not depend on the precision (they count shapes), and every registered method trains under bf16.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from torch import nn

import methods  # noqa: F401  (registers every method)
from harness.core.context import RunContext
from harness.core.data import Scenario
from harness.core.errors import UserError
from harness.core.method import METHODS
from harness.core.protocol import Protocol
from harness.engine.runner import RunSpec, run
from tests.conftest import TINY, needs_fmnist

pytestmark = needs_fmnist

# bf16 keeps 8 bits of mantissa: on this scenario (5 tasks, 600 training samples each) the final
# average accuracies of fp32 and bf16 training agree to within this tolerance.
BF16_TOLERANCE = 0.05
COMPILE_TOLERANCE = 0.02  # compiled vs eager fp32 accuracies (inductor fuses and reorders float sums)


def _run(method: str = "ft", scenario: str = "split-fmnist", **proto) -> dict:
    spec = RunSpec(method, scenario, 0, scenario_set=dict(TINY), protocol=Protocol(**proto))
    return run(spec)


def test_precision_is_validated_and_recorded():
    with pytest.raises(UserError, match="precision='fp8' is not one of fp32, bf16, fp16"):
        Protocol(precision="fp8").validate()
    rec = _run(precision="bf16", epochs=1)
    p = rec["config"]["protocol"]
    assert (p["precision"], p["channels_last"], p["compile"]) == ("bf16", False, False)


def test_bf16_accuracy_within_tolerance_of_fp32_and_flops_unchanged():
    recs = {prec: _run(precision=prec) for prec in ("fp32", "bf16", "fp16")}
    for prec in ("bf16", "fp16"):
        for s in ("class_il", "task_il"):
            a32 = recs["fp32"]["metrics"][s]["final_avg_acc"]
            a = recs[prec]["metrics"][s]["final_avg_acc"]
            assert abs(a - a32) <= BF16_TOLERANCE, (prec, s, a, a32)
        # FLOPs count shapes, not dtypes: identical whatever the precision
        for k in ("train_flops_total", "inference_flops_per_sample", "train_samples"):
            assert recs[prec]["costs"][k] == recs["fp32"]["costs"][k], (prec, k)
    assert recs["bf16"]["metrics"]["task_il"]["final_avg_acc"] > 0.8  # it learns (chance is 0.5)


def test_training_and_evaluation_run_under_autocast():
    seen: list[torch.dtype] = []

    class Probe(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            out = self.m(x)
            seen.append(out.dtype)
            return out

    from harness.engine import runner

    orig = runner.build_context

    def ctx_with_probe(spec, scenario, device):
        ctx = orig(spec, scenario, device)
        base = ctx._model_factory
        ctx._model_factory = lambda: Probe(base())
        return ctx

    runner.build_context = ctx_with_probe
    try:
        _run(precision="bf16")
    finally:
        runner.build_context = orig
    assert seen and set(seen) == {torch.bfloat16}  # training steps and every evaluation


def _ctx(precision: str) -> RunContext:
    sc = Scenario("s", "class", [], 2, (4,), "mlp")
    return RunContext(sc, Protocol(precision=precision, lr=0.1, momentum=0.0), torch.device("cpu"), 0,
                      lambda: nn.Linear(4, 2))


def test_fp16_scales_the_loss_unscales_for_hooks_and_skips_inf_steps():
    ctx = _ctx("fp16")
    assert ctx.scaler is not None and _ctx("bf16").scaler is None
    model = ctx.make_model()
    opt = ctx.make_optimizer(model.parameters())
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    ref = torch.autograd.grad(loss, model.weight, retain_graph=True)[0]
    ctx.backward(loss, opt)  # scaled by 2**16, then unscaled: hooks see the true gradient
    assert torch.allclose(model.weight.grad, ref, rtol=1e-5)
    w0 = model.weight.detach().clone()
    ctx.step(opt)
    assert torch.allclose(model.weight, w0 - 0.1 * ref, rtol=1e-5)
    # an inf gradient: the step is skipped and the scale lowered
    scale = ctx.scaler.get_scale()
    opt.zero_grad()
    (model(x).sum() * float("inf")).backward()
    w1 = model.weight.detach().clone()
    ctx.step(opt)
    assert torch.equal(model.weight, w1) and ctx.scaler.get_scale() < scale


def test_channels_last_model_and_batches():
    spec = RunSpec("ft", "split-fmnist", 0, scenario_set=dict(TINY),
                   protocol=Protocol(backbone="cnn", channels_last=True))
    from harness.engine.runner import build_context, get_scenario

    sc = get_scenario(spec)
    ctx = build_context(spec, sc, torch.device("cpu"))
    model = ctx.make_model()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    cl = run(spec)
    ref = run(dataclasses.replace(spec, protocol=Protocol(backbone="cnn")))
    for s in ("class_il", "task_il"):  # the same arithmetic in another layout
        assert abs(cl["metrics"][s]["final_avg_acc"] - ref["metrics"][s]["final_avg_acc"]) <= 0.02


def test_compile_keeps_the_module_and_its_state_dict_keys():
    ctx = _ctx("fp32")
    ctx.protocol.compile = True
    model = ctx.make_model()
    assert type(model) is nn.Linear and set(model.state_dict()) == {"weight", "bias"}
    assert getattr(model, "_compiled_call_impl", None) is not None



@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C/C++ compiler (inductor)")
def test_compile_gives_the_eager_run_s_accuracies_and_flops():
    """compile=true runs forward and backward through torch.compile (inductor on the CPU): the FLOP
    counts are the eager run's, and the accuracies agree within the float reordering of fused kernels
    (here they were equal; COMPILE_TOLERANCE allows a few test samples)."""
    eager, compiled = _run("ft"), _run("ft", compile=True)
    assert compiled["status"] == "finished" and compiled["config"]["protocol"]["compile"] is True
    for setting, rows in eager["acc"].items():
        for row_e, row_c in zip(rows, compiled["acc"][setting], strict=True):
            assert all(abs(a - b) <= COMPILE_TOLERANCE for a, b in zip(row_e, row_c, strict=True)), setting
    for key in ("train_flops_total", "train_flops_boundary", "inference_flops_per_sample", "params_total"):
        assert compiled["costs"][key] == eager["costs"][key], key


# fp16 (gradient scaler) for the methods with their own backward/step or gradient hooks
FP16_METHODS = ("dmkd", "er", "ewc", "fedavg", "ft", "lwf", "m2mkd", "si")


@pytest.mark.parametrize("name, precision", [(n, "bf16") for n in sorted(METHODS)]
                         + [(n, "fp16") for n in FP16_METHODS])
def test_every_method_runs_under_bf16(name, precision):
    sc = "permuted-fmnist" if name in ("avl-joint",) else "split-fmnist"
    spec = RunSpec(name, sc, 0, scenario_set={"max_train_per_task": 96, "max_test_per_task": 32,
                                              **({"n_tasks": 2} if sc == "permuted-fmnist" else {})},
                   protocol=Protocol(precision=precision, batch_size=32))
    rec = run(spec)
    assert rec["status"] == "finished" and rec["config"]["protocol"]["precision"] == precision
    for s, m in rec["metrics"].items():
        assert 0.0 <= m["final_avg_acc"] <= 1.0, s
