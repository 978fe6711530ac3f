"""DMKD routing="gaussian" (SEED-like): log-density, fit statistics, routing, resume, training-data-only fit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harness.core.backbones import build_backbone
from harness.core.config import hparams_from
from harness.core.context import RunContext
from harness.core.data import Scenario, Task
from harness.core.errors import UserError
from harness.core.protocol import Protocol
from methods.dmkd import DMKD, DMKDModel, DMKDParams
from methods.dmkd.model import diag_gaussian_log_density
from tests.test_dmkd import synthetic_scenario, train_tasks

D_IN, C = 16, 4


def two_task_scenario(seed: int = 0) -> Scenario:
    """Tasks {0,1} and {2,3} on separate input blocks, less noisy than test_dmkd's default."""
    return synthetic_scenario(seed, n_train=80, n_val=20, n_test=20, noise=0.5)


def make_method(**overrides: object) -> DMKD:
    sc = two_task_scenario()
    ctx = RunContext(sc, Protocol(epochs=2, batch_size=32, lr=0.05), torch.device("cpu"), 0,
                     lambda: build_backbone("mlp", sc.input_shape, sc.num_classes))
    base = {"routing": "gaussian", "encoder": "none", "expert_hidden": 16, "n_experts": 3, "top_k": 1,
            "kd": "none", "preservation": "none", "log_specialization": False}
    torch.manual_seed(0)
    return DMKD(hparams_from(DMKDParams, base | overrides), ctx)


@pytest.fixture(scope="module")
def trained() -> DMKD:
    m = make_method()
    train_tasks(m)
    return m


def test_log_density_matches_torch_normal():
    g = torch.Generator().manual_seed(1)
    f, mean = torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)
    var = torch.rand(3, 6, generator=g) + 0.1
    ref = torch.distributions.Normal(mean.unsqueeze(0), var.sqrt().unsqueeze(0)).log_prob(f.unsqueeze(1)).sum(2)
    assert torch.allclose(diag_gaussian_log_density(f, mean, var), ref, atol=1e-5)
    # Hand value: one dimension, f=1, mean=0, var=4 -> -0.5 (1/4 + log 4 + log 2 pi).
    hand = -0.5 * (0.25 + math.log(4.0) + math.log(2 * math.pi))
    out = diag_gaussian_log_density(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[4.0]]))
    assert out.item() == pytest.approx(hand, rel=1e-6)


def test_hand_built_gates_are_softmax_of_max_class_log_density():
    torch.manual_seed(0)
    model = DMKDModel(nn.Flatten(), 2, 2, 3, n_experts=3, expert_hidden=2, top_k=1, routing="gaussian",
                      gauss_temperature=0.5).eval()
    with torch.no_grad():
        for e in model.experts:  # feature space = relu(identity): the input itself for positive inputs
            e[0].weight.copy_(torch.eye(2))
            e[0].bias.zero_()
        model.gauss_mean[0, 0] = torch.tensor([1.0, 1.0])
        model.gauss_mean[0, 1] = torch.tensor([5.0, 5.0])
        model.gauss_mean[1, 2] = torch.tensor([3.0, 1.0])
        model.gauss_var[1, 2] = torch.tensor([2.0, 0.5])
        model.gauss_owned[0, :2] = True
        model.gauss_owned[1, 2] = True
        model.owned[:2] = True
    x = torch.tensor([[1.2, 0.9], [3.1, 1.0], [4.0, 4.5]])
    _, g = model.gates(x)

    def logn(v: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> float:
        return float(-0.5 * (((v - mu) ** 2 / var).sum() + var.log().sum() + 2 * math.log(2 * math.pi)))

    for b in range(3):
        s0 = max(logn(x[b], model.gauss_mean[0, c], model.gauss_var[0, c]) for c in (0, 1))
        s1 = logn(x[b], model.gauss_mean[1, 2], model.gauss_var[1, 2])
        expect = torch.softmax(torch.tensor([s0, s1]) / (0.5 * 2), dim=0)
        assert torch.allclose(g[b, :2], expect, atol=1e-5)
        assert g[b, 2] == 0.0  # expert 2 owns no Gaussians: never routed to
    assert g.argmax(1).tolist() == [0, 1, 0]


def test_fitted_means_and_variances_are_the_training_feature_statistics(trained: DMKD):
    m = trained
    model = m.model
    assert model.owned.tolist() == [True, True, False]
    assert model.gauss_owned.tolist() == [[True, True, False, False], [False, False, True, True],
                                          [False] * 4]
    for t, task in enumerate(m.ctx.scenario.tasks):  # task t's home expert is expert t
        x, y = next(task.batches("train", 10_000))
        with torch.no_grad():
            f = model.expert_features(t, model.encoder(x)).double()
        within = torch.zeros(f.shape[1], dtype=torch.float64)
        for c in task.classes:
            fc = f[y == c]
            assert torch.allclose(model.gauss_mean[t, c].double(), fc.mean(0), atol=1e-5)
            within += ((fc - fc.mean(0)) ** 2).sum(0)
        var = (within / len(f)).clamp_min(m.hp.gauss_var_floor).float()
        for c in task.classes:
            assert torch.allclose(model.gauss_var[t, c], var, rtol=1e-4, atol=1e-6)
        assert (model.gauss_var[t] >= m.hp.gauss_var_floor).all()


def test_routing_sends_each_task_to_the_expert_whose_gaussians_fit_it(trained: DMKD):
    m = trained
    for t, task in enumerate(m.ctx.scenario.tasks):
        x, _ = next(task.batches("test", 10_000))
        _, g = m.model.gates(x)
        assert (g.argmax(1) == t).all()
        assert (g[:, 2] == 0).all()  # the free expert holds no Gaussians
    # Class-IL on this separable stream: routing right, each expert right within its task.
    correct = sum(int((m.predict(x).argmax(1) == y).sum()) for t in m.ctx.scenario.tasks
                  for x, y in t.batches("test", 10_000))
    assert correct / 80 >= 0.95


def test_resume_round_trip_of_the_gaussian_state(trained: DMKD):
    m = trained
    state = m.state_dict()
    fresh = make_method()
    assert not fresh.model.gauss_owned.any()
    fresh.load_state_dict(state)
    for name in ("gauss_mean", "gauss_var", "gauss_owned", "owned"):
        assert torch.equal(getattr(fresh.model, name), getattr(m.model, name))
    x = torch.randn(7, D_IN) + 3.0
    assert torch.equal(fresh.predict(x), m.predict(x))
    gauss_bytes = sum(b.numel() * b.element_size() for b in (m.model.gauss_mean, m.model.gauss_var,
                                                             m.model.gauss_owned))
    assert gauss_bytes == 3 * C * 16 * 4 * 2 + 3 * C
    assert m.state_bytes() >= gauss_bytes


def test_fit_reads_training_data_only(monkeypatch):
    m = make_method()
    calls: list[str] = []
    orig = Task.split_indices

    def spy(self: Task, split: str) -> torch.Tensor:
        calls.append(split)
        return orig(self, split)

    task = m.ctx.scenario.tasks[0]
    m.ctx.current_task = task
    m.before_task(task)
    monkeypatch.setattr(Task, "split_indices", spy)
    m._fit_gaussians(task)
    assert calls and set(calls) == {"train"}
    assert m.model.gauss_owned[0, :2].all()


def test_growth_and_removal_keep_gaussian_buffers_aligned():
    model = DMKDModel(nn.Flatten(), 4, 4, 3, n_experts=2, expert_hidden=5, top_k=1, routing="gaussian")
    model.gauss_mean[1].fill_(2.0)
    model.gauss_owned[1, 0] = True
    model.add_expert()
    assert model.gauss_mean.shape == (3, 3, 5) and model.gauss_var.shape == (3, 3, 5)
    assert not model.gauss_owned[2].any() and (model.gauss_var[2] == 1).all()
    model.remove_expert(0)
    assert model.gauss_owned.tolist() == [[True, False, False], [False] * 3]
    assert (model.gauss_mean[0] == 2.0).all()
    # Other routers carry empty Gaussian buffers (no state cost).
    plain = DMKDModel(nn.Flatten(), 4, 4, 3, n_experts=2, expert_hidden=5, top_k=1, routing="autoencoder")
    assert plain.gauss_mean.numel() == 0


def test_bad_options_are_user_errors():
    with pytest.raises(UserError):
        hparams_from(DMKDParams, {"routing": "gaussian", "gauss_temperature": 0.0})
    with pytest.raises(UserError):
        hparams_from(DMKDParams, {"routing": "gaussian", "gauss_var_floor": -1.0})
    with pytest.raises(UserError):
        hparams_from(DMKDParams, {"routing": "gaussian", "training": "decentralized", "n_nodes": 2})


def test_a_reused_expert_keeps_old_class_gaussians_and_adds_the_new_ones():
    m = make_method(n_experts=1)
    train_tasks(m, 1)
    mean0 = m.model.gauss_mean[0, :2].clone()
    train_tasks_from = m.ctx.scenario.tasks[1]
    m.ctx.current_task = train_tasks_from
    m.before_task(train_tasks_from)
    assert m.home == 0  # no free expert: the only one is reused
    m.train_task(train_tasks_from)
    m.after_task(train_tasks_from)
    assert m.model.gauss_owned[0].all()
    assert torch.equal(m.model.gauss_mean[0, :2], mean0)  # task 0's class Gaussians are kept as fitted
