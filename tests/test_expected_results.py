"""Checked-in expected results of the quick grid, and a drift test on a cheap subset of it.

Regenerate results/expected/quick_targets.json (after an intended change of a method or the
harness) with:

    OMP_NUM_THREADS=1 python -m tests.test_expected_results --regenerate

Tolerance: 0.02 absolute on final average accuracy and forgetting. On one thread the same code,
seed and torch build reproduce the numbers exactly; other BLAS builds or thread counts change
float rounding, which SGD amplifies over ~30 steps per task; with 300 test samples per task a
single test sample moves a task's accuracy by 0.0033. A real bug (a broken penalty, a buffer that
stops replaying, a wrong mask) moves these numbers by 0.05 or more (compare ft with er or lwf).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harness.core.protocol import Protocol
from tests.conftest import needs_fmnist

TARGETS = Path(__file__).resolve().parent.parent / "results" / "expected" / "quick_targets.json"
TOL = 0.02
GRID_METHODS = ["ft", "joint", "ewc", "lwf", "si", "er"]
SCENARIOS = {
    "split-fmnist": {"max_train_per_task": 1000, "max_test_per_task": 300},
    "permuted-fmnist": {"max_train_per_task": 1000, "max_test_per_task": 300, "n_tasks": 3},
}
CHECKED = [("ft", "split-fmnist"), ("lwf", "split-fmnist"), ("er", "split-fmnist")]


def run_cell(method: str, scenario: str) -> dict[str, dict[str, float]]:
    from harness.engine.runner import RunSpec, run

    r = run(RunSpec(method, scenario, 0, scenario_set=SCENARIOS[scenario], protocol=Protocol(epochs=1)))
    return {s: {k: round(m[k], 4) for k in ("final_avg_acc", "forgetting", "bwt")} for s, m in r["metrics"].items()}


def regenerate() -> None:
    table = {"_generated_by": "OMP_NUM_THREADS=1 python -m tests.test_expected_results --regenerate",
             "_protocol": "seed 0, 1 epoch/task, SGD lr 0.01 momentum 0.9, batch 128, mlp, default hparams",
             "_scenario_options": SCENARIOS, "_tolerance": TOL, "results": {}}
    for sc in SCENARIOS:
        for m in GRID_METHODS:
            table["results"][f"{m}/{sc}"] = run_cell(m, sc)
            print(m, sc, table["results"][f"{m}/{sc}"], flush=True)
    TARGETS.write_text(json.dumps(table, indent=1) + "\n")


@needs_fmnist
@pytest.mark.parametrize("method,scenario", CHECKED)
def test_quick_results_do_not_drift(method, scenario):
    expected = json.loads(TARGETS.read_text())["results"][f"{method}/{scenario}"]
    got = run_cell(method, scenario)
    for setting, vals in expected.items():
        for key in ("final_avg_acc", "forgetting"):
            assert got[setting][key] == pytest.approx(vals[key], abs=TOL), (method, scenario, setting, key)


def test_table_is_complete_and_ordered():
    """Every grid cell is present, and the table keeps the orderings the literature predicts."""
    res = json.loads(TARGETS.read_text())["results"]
    assert set(res) == {f"{m}/{s}" for m in GRID_METHODS for s in SCENARIOS}
    c = {m: res[f"{m}/split-fmnist"]["class_il"]["final_avg_acc"] for m in GRID_METHODS}
    assert c["joint"] > c["er"] > c["ft"]  # upper bound > replay > fine-tuning in class-IL
    for m in GRID_METHODS:
        assert res[f"{m}/split-fmnist"]["task_il"]["final_avg_acc"] >= c[m]  # masking only helps


if __name__ == "__main__":
    if "--regenerate" in sys.argv:
        regenerate()
