"""Persistent memory and memory budgets: hand counts, the probe against the measured runs, ER's fill,
capacity searched inside the budget, and refused budgets."""

import subprocess
import sys

import pytest
import torch

from harness.core.errors import UserError
from harness.core.memory import parse_bytes, persistent_by_kind
from harness.engine.budget import capacity_cap, fit_to_budget, probe, total
from harness.engine.runner import RunSpec, run
from tests.conftest import TINY, needs_fmnist

pytestmark = needs_fmnist

# MLP 784-400-400-10 in float32: (784·400 + 400) + (400·400 + 400) + (400·10 + 10) parameters.
MLP = (784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10) * 4
assert MLP == 1_913_640
SAMPLE = 28 * 28 * 1 + 8  # a stored Fashion-MNIST image as uint8 plus its int64 label
RNG = torch.Generator().get_state().numel()  # ER's sampling generator (a CPU generator's state)

HAND = {  # what each method carries to the next task, by hand
    "ft": {"model": MLP},
    "ewc": {"model": MLP, "importance": MLP + 4, "snapshot": MLP},  # Fisher A, anchor m, the scalar K
    "si": {"model": MLP, "importance": 2 * MLP, "snapshot": MLP},  # Ω and the running ω, anchor θ*
    "lwf": {"model": MLP, "snapshot": MLP},  # the frozen teacher
    "er": {"model": MLP, "replay": 100 * SAMPLE, "other": RNG},
}


def _spec(method, **mset):
    return RunSpec(method, "split-fmnist", 0, dict(mset), dict(TINY))


@pytest.mark.parametrize("method", sorted(HAND))
def test_recorded_persistent_memory_equals_the_hand_count(method):
    mset = {"buffer_size": 100} if method == "er" else {}
    rec = run(_spec(method, **mset))
    assert rec["costs"]["persistent_by_kind"] == HAND[method]
    assert rec["costs"]["persistent_bytes"] == sum(HAND[method].values())
    assert probe(_spec(method, **mset)) == HAND[method]  # the plan before training is the measurement


def test_dmkd_hand_count_and_probe_equal_the_run():
    rec = run(_spec("dmkd"))
    kinds = rec["costs"]["persistent_by_kind"]
    # Model: parameters (the report's params_total) plus buffers; a snapshot teacher is a second copy of it.
    assert kinds["model"] >= rec["costs"]["params_total"] * 4
    assert kinds["snapshot"] == kinds["model"]
    assert probe(_spec("dmkd")) == kinds


def test_each_storage_counts_once_and_kinds_are_checked():
    w = torch.zeros(10)
    state = {"model": {"w": w}, "extra": {"a": w, "b": torch.zeros(3, dtype=torch.uint8)}}
    assert persistent_by_kind(state, {"a": "snapshot", "b": "replay"}) == {"model": 40, "replay": 3}
    with pytest.raises(ValueError):
        persistent_by_kind({"extra": {"a": torch.zeros(1)}}, {"a": "bogus"})


def test_er_stores_uint8_images_and_replays_them_bit_identically():
    rec = run(_spec("er", buffer_size=50))
    assert rec["artifacts"]["er"]["stored_as"] == "uint8"
    rot = run(RunSpec("er", "rotated-fmnist", 0, {"buffer_size": 50}, {**TINY, "n_tasks": 2}))
    assert rot["artifacts"]["er"]["stored_as"] == "float"  # rotations interpolate: not uint8 images
    assert rot["costs"]["persistent_by_kind"]["replay"] == 50 * (28 * 28 * 4 + 8)


def test_er_buffer_is_filled_to_the_budget():
    budget = MLP + RNG + 123 * SAMPLE + SAMPLE // 2
    fitted = fit_to_budget(_spec("er"), budget)
    assert fitted.method_set["buffer_size"] == 123  # (budget − model − state) ÷ bytes per sample
    assert fitted.budget_bytes == budget
    rec = run(fitted)
    assert rec["costs"]["persistent_bytes"] <= budget < rec["costs"]["persistent_bytes"] + SAMPLE
    assert rec["costs"]["budget_bytes"] == budget


def test_a_method_with_nothing_to_spend_stays_under_and_says_so():
    fitted = fit_to_budget(_spec("ewc"), 8 << 20)
    assert fitted.method_set == {} and "nothing to spend" in fitted.budget_note


def test_a_row_that_cannot_fit_is_refused():
    with pytest.raises(UserError, match="does not fit the memory budget"):
        fit_to_budget(_spec("si"), 4 << 20)  # four copies of a 1.8 MiB model
    with pytest.raises(UserError, match="no room for one stored sample"):
        fit_to_budget(_spec("er"), MLP)
    with pytest.raises(UserError, match="set by hand"):
        fit_to_budget(_spec("er", buffer_size=10), 8 << 20, {"buffer_size": 10})


def test_capacity_is_suggested_only_inside_the_budget():
    sizes = {n: total(probe(_spec("dmkd", n_experts=n))) for n in (4, 5, 6)}
    assert sizes[4] < sizes[5] < sizes[6]
    cap = capacity_cap(_spec("dmkd"), sizes[5])
    assert cap("n_experts", {}) == 5  # the largest that fits
    import optuna

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    from harness.core.method import METHODS

    seen = set()
    for _ in range(6):
        trial = study.ask()
        params = METHODS["dmkd"].search_space(trial, cap)
        seen.add(params["n_experts"])
        study.tell(trial, 0.0)
    assert seen and max(seen) <= 5  # the search range itself ends at the budget (4..8 -> 4..5)
    with pytest.raises(UserError, match="does not fit"):
        capacity_cap(_spec("dmkd"), sizes[4] - 1)("n_experts", {})


def test_sizes_parse():
    assert parse_bytes("4 MiB") == 4 << 20 and parse_bytes("512KiB") == 512 << 10 and parse_bytes(2000) == 2000
    for bad in ("-1 MiB", "nan", "4 parsecs", True, 0):
        with pytest.raises(UserError):
            parse_bytes(bad)


def test_an_impossible_suite_budget_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\nbudget: {memory: 1 MiB}\nscenarios: [{name: split-fmnist, options: "
                   "{max_train_per_task: 600, max_test_per_task: 300}}]\nmethods: [ft]\n")
    p = subprocess.run([sys.executable, "-m", "harness.cli.dmkd", "suite", str(cfg), "--results", str(tmp_path / "r"),
                        "--tracking-uri", "none", "--defaults"], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "row ft does not fit the memory budget 1.00 MiB" in lines[0]
    assert not (tmp_path / "r" / "s" / "runs").exists() or not any((tmp_path / "r" / "s" / "runs").iterdir())


def test_aligned_budget_is_the_largest_row_and_fills_er(tmp_path):
    from harness.orchestration.suite import load_suite

    cfg = tmp_path / "a.yaml"
    cfg.write_text("name: a\nbudget: {memory: aligned}\nscenarios: [{name: split-fmnist, options: "
                   "{max_train_per_task: 600, max_test_per_task: 300}}]\nmethods: [ft, si, er]\n")
    specs = load_suite(cfg).specs()
    si_bytes = sum(HAND["si"].values())
    assert {s.budget_bytes for s in specs} == {si_bytes}
    er = next(s for s in specs if s.method == "er")
    assert er.method_set["buffer_size"] == min((si_bytes - MLP - RNG) // SAMPLE, 5 * 540)
    unb = load_suite(cfg, budget="none").specs()
    assert {s.budget_bytes for s in unb} == {None}
    assert load_suite(cfg, budget="none").experiment == "a-budget-none"


def test_compute_budget_gives_a_costlier_step_fewer_steps():
    from harness.engine.budget import plain_step_flops_per_sample

    per_sample = plain_step_flops_per_sample(_spec("ft"))
    budget = {"per_sample": per_sample}
    ft = run(RunSpec("ft", "split-fmnist", 0, {}, dict(TINY), compute_budget=budget))
    # Fine-tuning's step is the unit: it spends exactly its budget and takes every step.
    assert all(p["compute_budget_cut"] is False for p in ft["per_task"])
    assert ft["costs"]["passes_per_task"] == 1
    total_budget = sum(p["compute_budget_flops"] for p in ft["per_task"])
    assert abs(ft["costs"]["train_flops_total"] - total_budget) <= 1e-9 * total_budget
    # LwF adds a teacher forward to every step from task 1 on: fewer steps, within the budget.
    lwf = run(RunSpec("lwf", "split-fmnist", 0, {}, dict(TINY), compute_budget=budget))
    later = lwf["per_task"][1:]
    assert all(p["compute_budget_cut"] for p in later) and all(p["passes"] < 1 for p in later)
    for p in lwf["per_task"]:
        n = p["train_samples"]
        assert p["train_flops_per_sample"] * n <= p["compute_budget_flops"] * (1 + 1e-9)
    # Joint, the upper bound, is not held to it.
    joint = run(RunSpec("joint", "split-fmnist", 0, {}, dict(TINY), compute_budget=budget))
    assert all(p["compute_budget_flops"] is None for p in joint["per_task"])


def test_probe_results_are_shared_through_the_cache_file_and_keyed_by_the_code(tmp_path, monkeypatch):
    import json

    from harness.engine import budget

    cache = tmp_path / "budget_probes.json"
    budget.use_probe_cache(cache)
    try:
        spec = _spec("lwf", temperature=4.0)
        first = budget.probe(spec)
        budget._PROBES.clear()
        monkeypatch.setattr(budget, "miniature", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed")))
        assert budget.probe(spec) == first  # another process reads the plan instead of probing again
        data = json.loads(cache.read_text())
        assert list(data) == [budget.code_digest()]
        cache.write_text(json.dumps({"0123456789ab": data[budget.code_digest()]}))  # plans of other code
        budget._PROBES.clear()
        with pytest.raises(AssertionError, match="probed"):
            budget.probe(spec)
    finally:
        budget.use_probe_cache(None)
        budget._PROBES.clear()
