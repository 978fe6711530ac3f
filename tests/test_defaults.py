"""Documented defaults (docs/defaults.md cannot drift), EWC's batch-mean Fisher by hand, SI's official
per-setting values and its clamp of Ω at 0."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import methods  # noqa: F401
from harness.cli.defaults import DOCUMENTED, render
from harness.core.defaults import rows, undocumented
from harness.engine.runner import resolve_method
from methods.common import batch_mean_fisher, diagonal_fisher
from methods.ewc import EWC
from methods.si import SETTING_DEFAULTS, SI
from tests.test_baselines import make, synthetic_ctx, train

ROOT = Path(__file__).resolve().parent.parent


def test_docs_defaults_file_equals_the_generator_output():
    assert (ROOT / "docs" / "defaults.md").read_text() == render(), "run: python -m harness.cli.defaults > docs/defaults.md"


@pytest.mark.parametrize("name", DOCUMENTED)
def test_every_documented_field_has_a_meaning_a_source_and_the_code_default(name):
    cls = resolve_method(name).HParams
    assert undocumented(cls) == []
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for r in rows(cls):  # the table shows the object the code uses
        assert r["default"] == repr(defaults[r["name"]]) or (defaults[r["name"]] == "" and r["default"] == "''")


def test_dmkd_list_method_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "harness.cli", "list", "--method", "si"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "| `xi` | `None` |" in out and "ganguli-lab/pathint" in out and "| `clamp_omega` | `True` |" in out


# ---------------------------------------------------------------- EWC Fisher normalisations
def _softmax_linear():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    y = torch.tensor([0, 1, 1, 0, 1])
    return model, x, y


def test_batch_mean_fisher_by_hand():
    """Linear softmax model: ∇_W mean CE over a batch = (1/|b|) Σ (p − onehot(y)) xᵀ, squared, weighted by |b|."""
    model, x, y = _softmax_linear()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    fisher = batch_mean_fisher(model, batches)
    with torch.no_grad():
        W, b = model.weight, model.bias
        fw, fb = torch.zeros_like(W), torch.zeros_like(b)
        for xb, yb in batches:
            err = torch.softmax(xb @ W.T + b, 1) - nn.functional.one_hot(yb, 2).float()
            gw, gb = err.T @ xb / len(yb), err.mean(0)
            fw += len(yb) * gw**2
            fb += len(yb) * gb**2
    torch.testing.assert_close(fisher["weight"], fw / 5)
    torch.testing.assert_close(fisher["bias"], fb / 5)
    # with batches of one sample both normalisations are the same number
    ones = [(x[i : i + 1], y[i : i + 1]) for i in range(5)]
    per = diagonal_fisher(model, ones)
    one = batch_mean_fisher(model, ones)
    for n in per:
        torch.testing.assert_close(per[n], one[n])


def test_ewc_fisher_norm_selects_the_estimate():
    ctx = synthetic_ctx()
    t0 = ctx.scenario.tasks[0]
    m = make(EWC, ctx, fisher_norm="batch_mean", fisher_batch=0)  # the protocol's batch size: 10
    train(m, [t0])
    gen = torch.Generator().manual_seed(ctx.seed * 1000 + t0.id)  # EWC's own shuffle of the Fisher batches
    ref = batch_mean_fisher(m.model, t0.batches("train", 10, shuffle=True, generator=gen))
    for n in ref:  # after one task the accumulated quadratic's coefficient A is that task's Fisher
        torch.testing.assert_close(m.coef[n], ref[n])
    per = diagonal_fisher(m.model, t0.batches("train", 10))
    total_m = sum(float(f.sum()) for f in m.coef.values())
    assert total_m < sum(float(f.sum()) for f in per.values())  # batch-mean gradients partly cancel


# ---------------------------------------------------------------- SI
def test_si_defaults_follow_the_official_code_per_setting():
    ctx = synthetic_ctx()  # a class-IL scenario
    m = make(SI, ctx)
    assert (m.hp.c, m.hp.xi) == SETTING_DEFAULTS["class"] == (1.0, 1e-3)
    ctx.scenario.setting = "domain"
    m = make(SI, ctx)
    assert (m.hp.c, m.hp.xi) == SETTING_DEFAULTS["domain"] == (0.1, 0.1)
    assert (make(SI, ctx, c=2.0, xi=0.5).hp.c, make(SI, ctx, xi=0.5).hp.xi) == (2.0, 0.5)


@pytest.mark.parametrize("clamp", [True, False])
def test_si_clamps_omega_at_zero(clamp):
    ctx = synthetic_ctx()
    m = make(SI, ctx, xi=0.5, clamp_omega=clamp)
    t0 = ctx.scenario.tasks[0]
    params = dict(m.model.named_parameters())
    m.omega = {n: torch.full_like(p, 0.2) for n, p in params.items()}
    signs = {n: torch.where(torch.arange(p.numel()).reshape(p.shape) % 2 == 0, -1.0, 1.0) for n, p in params.items()}
    m.w = {n: s.clone() for n, s in signs.items()}  # a negative path integral on every other parameter
    start = {n: a.clone() for n, a in m.anchor.items()}
    m.after_task(t0)  # parameters unchanged since the anchor: Ω = 0.2 + ω / ξ = 0.2 ± 2
    for n in params:
        raw = 0.2 + signs[n] / 0.5
        expect = raw.clamp(min=0) if clamp else raw
        torch.testing.assert_close(m.omega[n], expect)
        torch.testing.assert_close(m.anchor[n], start[n])
    assert bool((torch.cat([o.flatten() for o in m.omega.values()]) < 0).any()) is not clamp
