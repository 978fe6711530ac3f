"""Suites: YAML parsing, MLflow nesting, resume after kill -9, failures (many workers: test_cluster.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core.errors import UserError
from harness.orchestration.cluster import run_suite
from harness.orchestration.suite import load_suite
from harness.orchestration.tracking import Store
from tests.conftest import needs_fmnist

REPO = Path(__file__).resolve().parent.parent

SUITE = """
name: tiny
experiment: tiny
seeds: [0, 1]
protocol: {epochs: 1, batch_size: 64}
scenarios:
  - {name: split-fmnist, options: {max_train_per_task: 300, max_test_per_task: 100}}
methods:
  - ft
  - {name: joint, label: joint-reinit, set: {reinit: true}}
"""


def _write(tmp_path, text=SUITE, name="tiny.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _dmkd(*args, env=None, check=True):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=e,
                          cwd=REPO, check=False, timeout=600)


def _finals(results: Path, experiment="tiny"):
    out = {}
    for p in sorted((results / experiment / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        out[r["key"]] = (r["status"], r.get("acc"), r.get("metrics"))
    return out


def test_suite_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_suite(_write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(UserError, match="unknown key"):
        load_suite(_write(tmp_path, SUITE + "bogus: 1\n"))
    with pytest.raises(UserError, match="unknown method"):
        load_suite(_write(tmp_path, SUITE.replace("- ft", "- nosuch")))
    with pytest.raises(UserError, match="lr must be"):
        load_suite(_write(tmp_path, SUITE.replace("batch_size: 64", "batch_size: 64, lr: -0.1")))
    with pytest.raises(UserError, match="seeds must be"):
        load_suite(_write(tmp_path, SUITE.replace("[0, 1]", "[zero]")))
    cfg = load_suite(_write(tmp_path))
    specs = cfg.specs()
    assert [(s.method_label(), s.seed) for s in specs] == [("ft", 0), ("ft", 1), ("joint-reinit", 0),
                                                           ("joint-reinit", 1)]


@needs_fmnist
def test_suite_records_and_nested_mlflow_tree(tmp_path):
    cfg = load_suite(_write(tmp_path))
    store = Store(tmp_path / "res", cfg.experiment)
    recs = run_suite(cfg, store, show_progress=False)
    assert len(recs) == 4 and all(r["status"] == "finished" for r in recs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(tmp_path / 'res').resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    by_id = {r.info.run_id: r for r in runs}
    kinds = {}
    for r in runs:
        kinds.setdefault(r.data.tags["dmkd.kind"], []).append(r)
    assert len(kinds["suite"]) == 1 and len(kinds["group"]) == 2 and len(kinds["run"]) == 4
    for r in kinds["run"]:
        parent = by_id[r.data.tags["mlflow.parentRunId"]]
        assert parent.data.tags["dmkd.kind"] == "group"
        assert by_id[parent.data.tags["mlflow.parentRunId"]].data.tags["dmkd.kind"] == "suite"
        assert r.info.status == "FINISHED"
        assert r.data.params["protocol.batch_size"] == "64" and "env.git_revision" in r.data.params
        assert "class_il/final_avg_acc" in r.data.metrics
    # A kill between a run's finished record and MLflow's FINISHED (and before the suite closed its
    # group and suite runs) leaves them RUNNING; running the suite again closes them, re-running nothing.
    client.update_run(kinds["run"][0].info.run_id, status="RUNNING")
    client.update_run(kinds["group"][0].info.run_id, status="RUNNING")
    client.update_run(kinds["suite"][0].info.run_id, status="RUNNING")
    again = run_suite(cfg, store, show_progress=False)
    assert [r["finished_at"] for r in again] == [r["finished_at"] for r in recs]
    assert {r.info.status for r in client.search_runs([exp.experiment_id])} == {"FINISHED"}


@needs_fmnist
def test_kill_and_resume_gives_the_same_numbers(tmp_path):
    suite = _write(tmp_path)
    # Uninterrupted reference.
    ref = _dmkd("suite", str(suite), "--results", str(tmp_path / "ref"), "--no-report", "--tracking-uri", "none")
    assert ref.returncode == 0, ref.stderr
    # Killed with SIGKILL right after task 2 of the first run is checkpointed.
    res = tmp_path / "res"
    killed = _dmkd("suite", str(suite), "--results", str(res), "--no-report",
                   env={"DMKD_TEST_KILL_AFTER_TASK": "2"})
    assert killed.returncode == -9
    partial = _finals(res)
    assert [s for s, _, _ in partial.values()] == ["running"]
    key = next(iter(partial))
    assert (res / "tiny" / "checkpoints" / f"{key}.pt").exists()
    assert len(partial[key][1]["class_il"]) == 3  # three tasks recorded before the kill
    # The killed run is not FINISHED in MLflow.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{res.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              filter_string="tags.`dmkd.kind` = 'run'")
    assert [r.info.status for r in runs] == ["RUNNING"]
    # Resume: the dead worker's heartbeat in the Optuna storage is older than --grace, so its cell
    # is taken over by the new worker process and resumed from the dead worker's last checkpoint.
    resumed = _dmkd("suite", str(suite), "--results", str(res), "--no-report", "--heartbeat", "1", "--grace", "2")
    assert resumed.returncode == 0, resumed.stderr
    rec = json.loads((res / "tiny" / "runs" / f"{key}.json").read_text())
    assert rec["resumed_from_task"] == 3
    assert _finals(res) == _finals(tmp_path / "ref")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 7  # suite, 2 groups, 4 seeds


@needs_fmnist
def test_diverging_run_is_marked_failed_and_the_suite_goes_on(tmp_path):
    text = SUITE.replace("seeds: [0, 1]", "seeds: [0]").replace(
        "  - ft\n", "  - ft\n  - {name: ft, label: ft-diverges, set: {}}\n")
    cfg = load_suite(_write(tmp_path, text))
    cfg.protocol = dict(cfg.protocol)
    specs = cfg.specs()
    # lr so large the loss overflows to inf/NaN for the labelled config only
    from harness.orchestration import suite as suite_mod

    orig = suite_mod.SuiteConfig.specs

    def patched(self):
        out = orig(self)
        for s in out:
            if s.label == "ft-diverges":
                s.protocol.lr = 1e9
        return out

    suite_mod.SuiteConfig.specs = patched
    try:
        recs = run_suite(cfg, Store(tmp_path / "res", "tiny", "none"), show_progress=False)
    finally:
        suite_mod.SuiteConfig.specs = orig
    status = {r["label"]: r["status"] for r in recs}
    assert status == {"ft": "finished", "ft-diverges": "failed", "joint-reinit": "finished"}
    failed = next(r for r in recs if r["label"] == "ft-diverges")
    assert "NaN/inf" in failed["error"]
    assert len(specs) == 3
