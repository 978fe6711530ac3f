"""Tuning: validation-only objective, sealed test split, exact trial counts across workers,
PostgreSQL for many machines, tuned parameters used by suites, ablation grids."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness.core.data import Task
from harness.engine.runner import RunSpec, run
from harness.orchestration.storage import is_surplus
from harness.orchestration.tune import ablate, load_ablation, tune
from tests.conftest import needs_fmnist

REPO = Path(__file__).resolve().parent.parent
SMALL = {"max_train_per_task": 200, "max_test_per_task": 60}


@needs_fmnist
def test_tuning_never_reads_the_test_split(tmp_path, monkeypatch):
    calls = []
    orig = Task.split_indices

    def spy(self, split):
        calls.append(split)
        return orig(self, split)

    monkeypatch.setattr(Task, "split_indices", spy)
    out = tune("ft", "split-fmnist", trials=2, results_dir=tmp_path, scenario_set=SMALL, tracking_uri="none",
               show_progress=False)
    assert "val" in calls and "test" not in calls
    # The objective is the validation final accuracy of the same configuration run on its own.
    lr = out["params"]["protocol.lr"]
    from harness.core.protocol import Protocol

    rec = run(RunSpec("ft", "split-fmnist", 0, scenario_set=SMALL, protocol=Protocol(lr=lr), eval_split="val"))
    assert rec["metrics"]["class_il"]["final_avg_acc"] == pytest.approx(out["value"])
    assert rec["eval_split"] == "val"


@needs_fmnist
def test_sealed_test_split_raises():
    from harness.engine.runner import get_scenario

    spec = RunSpec("ft", "split-fmnist", 0, scenario_set=SMALL, eval_split="val")
    run(spec)
    task = get_scenario(spec).tasks[0]
    with pytest.raises(PermissionError):
        next(task.batches("test", 10))
    run(RunSpec("ft", "split-fmnist", 0, scenario_set=SMALL))  # a normal run unseals it
    assert next(task.batches("test", 10))[0].shape[0] == 10


def _workers(n, storage, trials, tmp_path, study="s"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "harness.cli", "tune", "--method", "ft", "--scenario", "split-fmnist",
            "--trials", str(trials), "--storage", storage, "--study", study, "--results", str(tmp_path / "res"),
            "--tracking-uri", "none", "--set", "max_train_per_task=200", "--set", "max_test_per_task=60",
            "--pruner", "none"]
    procs = [subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-800:] for o in outs]


def _counted(storage_obj, study):
    import optuna
    from optuna.trial import TrialState

    st = optuna.load_study(study_name=study, storage=storage_obj)
    real = [t for t in st.get_trials() if not is_surplus(t)]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in real)
    return sorted(t.number for t in real), st


@needs_fmnist
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_concurrent_workers_run_exactly_the_trials_asked_for(tmp_path, kind):
    from harness.orchestration.tune import make_storage

    url = f"sqlite:///{tmp_path}/optuna.db" if kind == "sqlite" else f"journal:{tmp_path}/optuna.log"
    _workers(3, url, 7, tmp_path)
    numbers, _ = _counted(make_storage(url, tmp_path), "s")
    assert len(numbers) == 7 and len(set(numbers)) == 7


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres(tmp_path):
    """A throw-away PostgreSQL cluster on loopback, started and stopped by the test."""
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin")) if Path("/usr/lib/postgresql").exists() else []
    if not bindirs:
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql; CI installs it)")
    pytest.importorskip("psycopg", reason="psycopg missing (pip install psycopg[binary]; part of [dev])")
    bindir = bindirs[-1]
    # pytest's tmp folders are private to root; the server user needs a folder it can enter.
    base = Path(tempfile.mkdtemp(prefix="dmkd-pg-"))
    data = base / "pgdata"
    port = _free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        prefix = ["runuser", "-u", "postgres", "--"]
        os.chmod(base, 0o777)
        data.mkdir()
        shutil.chown(data, "postgres")
    tmp_path = base
    sock = tmp_path / "sock"
    sock.mkdir()
    os.chmod(sock, 0o777)
    subprocess.run(prefix + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "dmkd"], check=True,
                   capture_output=True)
    subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp_path / "pg.log"), "-w",
                             "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run(prefix + [str(bindir / "createdb") if (bindir / "createdb").exists() else "createdb",
                                 "-h", "127.0.0.1", "-p", str(port), "-U", "dmkd", "optuna"], check=True,
                       capture_output=True)
        yield f"postgresql://dmkd@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)


@needs_fmnist
def test_three_workers_through_postgresql(tmp_path, postgres):
    from harness.orchestration.tune import make_storage

    _workers(3, postgres, 6, tmp_path, study="pg")
    numbers, _ = _counted(make_storage(postgres, tmp_path), "pg")
    assert len(numbers) == 6 and len(set(numbers)) == 6


@needs_fmnist
def test_tuned_parameters_feed_the_suite(tmp_path):
    res = tmp_path / "res"
    out = tune("ft", "split-fmnist", trials=2, results_dir=res, scenario_set=SMALL, tracking_uri="none",
               show_progress=False)
    saved = json.loads((res / "tuned" / "ft__split-fmnist.json").read_text())
    assert saved["params"] == out["params"] and saved["n_trials"] == 2
    suite = tmp_path / "s.yaml"
    suite.write_text("name: t\nseeds: [0]\nscenarios:\n  - {name: split-fmnist, options: "
                     "{max_train_per_task: 200, max_test_per_task: 60}}\nmethods:\n  - ft\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "harness.cli", "suite", str(suite), "--results", str(res), "--tuned",
                        "--no-report", "--tracking-uri", "none"], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stderr
    rec = json.loads(next((res / "t" / "runs").glob("*.json")).read_text())
    assert rec["tuned"] is True and rec["tuned_trials"] == 2 and rec["label"] == "ft+tuned"
    assert rec["config"]["protocol"]["lr"] == pytest.approx(out["params"]["protocol.lr"])
    assert rec["eval_split"] == "test"


@needs_fmnist
def test_ablation_grid_runs_every_cell(tmp_path):
    cfg_path = tmp_path / "abl.yaml"
    cfg_path.write_text("name: abl\nmethod: joint\nscenario: split-fmnist\nseeds: [0, 1]\n"
                        "scenario_options: {max_train_per_task: 150, max_test_per_task: 50}\n"
                        "grid:\n  reinit: [true, false]\n")
    cfg = load_ablation(cfg_path)
    recs = ablate(cfg, tmp_path / "res", tracking_uri="none", show_progress=False)
    cells = sorted((r["ablation"]["params"]["reinit"], r["seed"]) for r in recs)
    assert cells == [(False, 0), (False, 1), (True, 0), (True, 1)]
    assert all(r["status"] == "finished" and r["eval_split"] == "test" for r in recs)
    # Run again: nothing is re-run (records are reused).
    t0 = time.time()
    again = ablate(cfg, tmp_path / "res", tracking_uri="none", show_progress=False)
    assert sorted(r["finished_at"] for r in again) == sorted(r["finished_at"] for r in recs)
    assert time.time() - t0 >= 0


@needs_fmnist
def test_trials_are_mlflow_runs_nested_under_the_study(tmp_path):
    from mlflow.tracking import MlflowClient

    res = tmp_path / "res"
    tune("ft", "split-fmnist", trials=2, results_dir=res, scenario_set=SMALL, show_progress=False, study_name="st")
    client = MlflowClient(f"sqlite:///{res.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("tuning")
    runs = client.search_runs([exp.experiment_id])
    study = [r for r in runs if r.data.tags.get("dmkd.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("dmkd.kind") == "trial"]
    assert len(study) == 1 and len(trials) == 2
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == study[0].info.run_id
        assert "hparams.protocol.lr" in t.data.params and t.info.status == "FINISHED"
        assert "objective_val_final_avg_acc" in t.data.metrics
        history = client.get_metric_history(t.info.run_id, "val/class_il/avg_acc")
        assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]  # one value per task
    assert study[0].data.metrics["n_trials"] == 2


def test_every_search_space_gives_valid_settings():
    import optuna

    import methods  # noqa: F401
    from harness.core.config import hparams_from, split_params
    from harness.core.method import METHODS
    from harness.core.protocol import Protocol

    for name, cls in METHODS.items():
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(5):
            m_part, p_part = split_params(cls.search_space(study.ask()))
            assert "lr" in p_part, name  # the learning rate is tuned for every method: equal budgets
            hparams_from(cls.HParams, m_part)
            hparams_from(Protocol, p_part).validate()


@needs_fmnist
def test_diverging_trials_score_zero_and_count_in_the_budget(tmp_path):
    import optuna

    from harness.orchestration.tune import make_storage

    # A fixed lr of 1e9 (fixed values win over the search space) makes every trial diverge: each
    # completes with value 0, so the sampler sees it, and the study holds exactly the budget.
    out = tune("ft", "split-fmnist", trials=3, results_dir=tmp_path, scenario_set=SMALL, tracking_uri="none",
               show_progress=False, study_name="div", fixed={"protocol.lr": 1e9})
    assert out["n_trials"] == 3 and out["value"] == 0.0
    st = optuna.load_study(study_name="div", storage=make_storage(None, tmp_path))
    assert [t.state.name for t in st.trials] == ["COMPLETE"] * 3
    assert all("NaN/inf" in t.user_attrs["diverged"] for t in st.trials)


@needs_fmnist
def test_objective_setting_can_be_chosen(tmp_path):
    from harness.core.errors import UserError

    out = tune("ft", "split-fmnist", trials=1, results_dir=tmp_path, scenario_set=SMALL, tracking_uri="none",
               show_progress=False, objective="task_il", fixed={"protocol.lr": 0.01})
    rec = run(RunSpec("ft", "split-fmnist", 0, scenario_set=SMALL, eval_split="val"))
    assert out["value"] == pytest.approx(rec["metrics"]["task_il"]["final_avg_acc"])
    assert "task_il" in out["objective"]
    with pytest.raises(UserError, match="does not apply"):
        tune("ft", "split-fmnist", trials=1, results_dir=tmp_path, scenario_set=SMALL, tracking_uri="none",
             show_progress=False, objective="domain_il")


@needs_fmnist
def test_tune_suite_writes_provenance_never_reads_test_and_the_suite_runs_it(tmp_path, monkeypatch):
    import yaml

    from harness.cli.dmkd import main

    suite = tmp_path / "tiny.yaml"
    suite.write_text("name: tiny\nseeds: [0]\nprotocol: {epochs: 1, batch_size: 64}\nscenarios:\n"
                     "  - {name: split-fmnist, options: {max_train_per_task: 200, max_test_per_task: 60}}\n"
                     "methods:\n  - ft\n  - {name: er, label: er-50, set: {buffer_size: 50}}\n")
    res = tmp_path / "res"
    calls = []
    orig = Task.split_indices

    def spy(self, split):
        calls.append(split)
        return orig(self, split)

    monkeypatch.setattr(Task, "split_indices", spy)
    assert main(["tune-suite", str(suite), "--trials", "2", "--results", str(res), "--tracking-uri", "none"]) == 0
    assert "val" in calls and "test" not in calls  # tuning read validation data only
    monkeypatch.setattr(Task, "split_indices", orig)
    path = tmp_path / "tuned" / "tiny" / "end-of-stream" / "seed0" / "split-fmnist.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc["trials"] == 2 and doc["sampler_seed"] == 0 and doc["seeds"] == [0]
    assert doc["scenario_options"] == {"max_train_per_task": 200, "max_test_per_task": 60}
    assert set(doc["entries"]) == {"ft", "er-50"}
    for e in doc["entries"].values():
        prov = e["provenance"]
        assert prov["trials"] == 2 and 0.0 <= prov["best_validation_score"] <= 1.0
        assert prov["study"].startswith("tune-suite.tiny.split-fmnist.") and prov["git_revision"]
        assert "validation" in prov["objective"]
        assert "protocol.lr" in e["params"]  # the learning rate is searched for every row
    timing = yaml.safe_load(path.with_suffix(".run.yaml").read_text())["rows"]  # when and where: beside it
    assert set(timing) == {"ft", "er-50"} and all(t["date"][:4].isdigit() for t in timing.values())
    assert doc["tuning"] == {"protocol": "end-of-stream"} and "--protocol end-of-stream" in doc["command"]
    assert doc["entries"]["er-50"]["fixed"] == {"buffer_size": 50}
    assert doc["entries"]["er-50"]["params"]["buffer_size"] == 50  # the row's set: value stays fixed
    # The same sampler seed gives every row the same first learning rate (TPE starts at random).
    import optuna

    studies = {e["provenance"]["study"] for e in doc["entries"].values()}
    storage = optuna.storages.RDBStorage(f"sqlite:///{(res / 'optuna.db').resolve()}")
    first = {optuna.load_study(study_name=s, storage=storage).trials[0].params["lr"] for s in studies}
    assert len(first) == 1

    # The suite runs the tuned settings by default, and the documented defaults with --defaults.
    assert main(["suite", str(suite), "--results", str(res), "--no-report", "--tracking-uri", "none"]) == 0
    recs = {r["label"]: r for r in (json.loads(p.read_text()) for p in (res / "tiny" / "runs").glob("*.json"))}
    assert set(recs) == {"ft+tuned", "er-50+tuned"}
    ft = recs["ft+tuned"]
    assert ft["tuned"] is True and ft["tuned_trials"] == 2 and ft["eval_split"] == "test"
    assert ft["config"]["protocol"]["lr"] == pytest.approx(doc["entries"]["ft"]["params"]["protocol.lr"])
    assert main(["suite", str(suite), "--results", str(res), "--no-report", "--tracking-uri", "none",
                 "--defaults"]) == 0
    recs = {r["label"]: r for r in (json.loads(p.read_text()) for p in (res / "tiny" / "runs").glob("*.json"))}
    assert recs["ft"]["tuned"] is False and recs["ft"]["config"]["protocol"]["lr"] == 0.01
    # A file tuned for other scenario options is refused rather than silently reused.
    suite.write_text(suite.read_text().replace("max_test_per_task: 60", "max_test_per_task: 70"))
    assert main(["suite", str(suite), "--results", str(res), "--no-report", "--tracking-uri", "none"]) == 2


def test_tune_suite_study_name_carries_every_shared_setting():
    from harness.orchestration.tune import _study_name

    base = {"method": "ft", "scenario_set": {"n_tasks": 5}, "protocol": {"epochs": 1}, "fixed": {}, "seeds": [0],
            "pruner": "median"}
    a = _study_name("quick", "permuted-fmnist", "ft", 20, 0, base)
    assert a.startswith("tune-suite.quick.permuted-fmnist.ft.t20.ss0.")
    assert a == _study_name("quick", "permuted-fmnist", "ft", 20, 0, dict(base))
    # Another scenario option, protocol, fixed setting or seed list is another study, never continued.
    for key, val in (("scenario_set", {"n_tasks": 5, "max_train_per_task": 12000}), ("protocol", {"epochs": 2}),
                     ("fixed", {"buffer_size": 50}), ("seeds", [0, 1]), ("pruner", "none")):
        assert _study_name("quick", "permuted-fmnist", "ft", 20, 0, {**base, key: val}) != a


@needs_fmnist
def test_a_worker_waits_for_the_trial_another_worker_still_runs(tmp_path):
    """The last worker out picks the best of all trials, the one still running elsewhere included."""
    import threading

    import optuna

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="w", storage=url, direction="maximize")
    foreign = study.ask()  # another worker's trial: RUNNING while this worker runs its own
    done = threading.Event()

    def other_worker():
        # Finish the foreign trial only after this worker's own trial has completed.
        while not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            time.sleep(0.05)
        time.sleep(1.0)
        foreign.set_user_attr("params", {"protocol.lr": 0.123})
        study.tell(foreign, 2.0)  # better than any accuracy
        done.set()

    th = threading.Thread(target=other_worker)
    th.start()
    out = tune("ft", "split-fmnist", trials=2, results_dir=tmp_path, storage_url=url, study_name="w",
               scenario_set=SMALL, tracking_uri="none", show_progress=False, wait_poll_s=0.1)
    th.join()
    assert done.is_set() and out["value"] == 2.0 and out["params"] == {"protocol.lr": 0.123}
    assert out["n_trials"] == 2
