"""m2mKD (module split, hybrid forward, loss, phases) and the simple MoE (DMKD with KD/preservation off)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from harness.core.backbones import build_backbone
from harness.core.config import hparams_from
from harness.core.errors import UserError
from harness.core.method import METHODS
from methods.dmkd import DMKDParams
from methods.m2mkd import M2MKD, M2MKDParams, hybrid_forward, split_modules
from methods.moe import MoEParams, SimpleMoE
from tests.conftest import TINY, needs_fmnist
from tests.test_dmkd import D_IN, C, make_ctx, train_tasks


def test_split_modules_cuts_the_mlp_into_three_modules_with_the_same_function():
    torch.manual_seed(0)
    backbone = build_backbone("mlp", (1, 28, 28), 10)
    seq = split_modules(backbone)
    assert len(seq) == 3
    assert [type(m[1]).__name__ for m in seq[:2]] == ["Linear", "ReLU"]
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(seq(x), backbone(x))
    assert sum(p.numel() for p in seq.parameters()) == 478_410


def test_hybrid_forward_trains_only_the_student_module():
    torch.manual_seed(0)
    teacher = split_modules(build_backbone("mlp", (D_IN,), C))
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = torch.nn.Linear(400, 400)
    with torch.no_grad():
        student.weight.copy_(teacher[1][0].weight)
        student.bias.copy_(teacher[1][0].bias)
    x = torch.randn(6, D_IN)
    block = torch.nn.Sequential(student, torch.nn.ReLU())
    z = hybrid_forward(teacher, block, 1, x)
    assert torch.allclose(z, teacher(x), atol=1e-6)  # S_i = T_i gives the teacher's output
    z.sum().backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_m2mkd_loss_against_hand_computed_value():
    hp = M2MKDParams(alpha=0.5, temperature=1.0)
    m = M2MKD(hp, make_ctx())
    m.teacher_classes = [0, 1]
    z = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    z_t = torch.tensor([[0.0, 2.0, 5.0, 5.0]])
    y = torch.tensor([2])
    ce = -math.log(math.exp(1.0) / (math.exp(2.0) + 1 + math.exp(1.0) + math.exp(-1.0)))
    pt = [1 / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))]
    ps = [math.exp(2) / (1 + math.exp(2)), 1 / (1 + math.exp(2))]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert m._loss(z, y, z_t, phase1=True).item() == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-5)
    assert m._loss(z, y, z_t, phase1=False).item() == pytest.approx(ce + 0.5 * kl, rel=1e-5)
    assert m._loss(z, y, None, phase1=False).item() == pytest.approx(ce, rel=1e-5)


def test_m2mkd_phases_use_the_snapshot_and_count_their_batches():
    ctx = make_ctx(epochs=1)
    m = M2MKD(M2MKDParams(phase1_share=0.5), ctx)
    train_tasks(m, 1)
    assert m.teacher is not None and m.teacher_classes == [0, 1]
    n0 = ctx.samples_seen
    snapshot = [p.detach().clone() for p in m.teacher.parameters()]
    task = ctx.scenario.tasks[1]
    m.before_task(task)
    m.train_task(task)
    # both phases share the budget: one pass over task 1 in all, half of its batches in phase 1
    assert ctx.samples_seen - n0 == len(task.train_idx)
    phase1, phase2 = m.phase_batches(len(task.train_idx))
    assert len(phase1) == 3 and sum(phase1) + phase2 == -(-len(task.train_idx) // ctx.protocol.batch_size)
    assert abs(sum(phase1) - phase2) <= 1
    assert all(torch.equal(a, b) for a, b in zip(snapshot, m.teacher.parameters()))  # the teacher stays frozen
    assert not all(torch.equal(a, b) for a, b in zip(snapshot, m.model.parameters()))
    assert m.state_bytes() == sum(p.numel() * 4 for p in m.model.parameters())
    fresh = M2MKD(M2MKDParams(), make_ctx())
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(4, D_IN)
    assert torch.equal(fresh.teacher(x), m.teacher(x)) and torch.equal(fresh.predict(x), m.predict(x))


def test_m2mkd_validation():
    with pytest.raises(UserError):
        hparams_from(M2MKDParams, {"alpha": 1.5})
    with pytest.raises(UserError):
        hparams_from(M2MKDParams, {"temperature": 0})


def test_moe_is_dmkd_with_kd_preservation_and_specialization_off():
    assert METHODS["moe"] is SimpleMoE and METHODS["m2mkd"] is M2MKD
    hp = MoEParams()
    assert (hp.kd, hp.preservation, hp.routing, hp.log_specialization, hp.combine) == (
        "none", "none", "learned", False, "logits")
    shared = {f.name for f in dataclasses.fields(DMKDParams)}
    assert shared == {f.name for f in dataclasses.fields(MoEParams)}  # every DMKD switch still available
    m = SimpleMoE(hparams_from(MoEParams, {"encoder": "linear", "encoder_dim": 12, "expert_hidden": 8,
                                           "n_experts": 4}), make_ctx())
    train_tasks(m, 2)
    assert m.teacher is None and not m.pres.weights and not m.ctx.metrics and "dmkd" not in m.ctx.artifacts
    assert m.state_bytes() == 0
    n = m.ctx.protocol.epochs * len(m.ctx.scenario.tasks[1].train_idx)
    assert float(m.model.routed_counts.sum()) == 2 * n  # K=2 selections per sample of the last task



@needs_fmnist
def test_dmkd_autoencoder_routing_beats_ft_in_class_il_on_tiny_split_fmnist():
    from harness.engine.runner import RunSpec, run

    caps = dict(TINY)
    ft = run(RunSpec("ft", "split-fmnist", 0, scenario_set=caps, eval_split="val"))
    dm = run(RunSpec("dmkd", "split-fmnist", 0, method_set={"kd": "none", "preservation": "none"},
                     scenario_set=caps, eval_split="val"))
    assert dm["metrics"]["class_il"]["final_avg_acc"] > ft["metrics"]["class_il"]["final_avg_acc"] + 0.2
    assert dm["costs"]["params_total"] <= 1.5 * 478_410
