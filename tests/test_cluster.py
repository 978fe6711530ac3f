"""Suites on many workers through an Optuna storage: exactly-once cells, takeover of a dead
worker's cell from its checkpoint, launchers (local processes, submitit), heartbeat settings."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.core.errors import UserError
from tests.conftest import needs_fmnist
from tests.test_tune import postgres  # noqa: F401 - the throw-away PostgreSQL server fixture

REPO = Path(__file__).resolve().parent.parent

SUITE = """
name: tiny
experiment: tiny
seeds: [0, 1, 2]
protocol: {epochs: 1, batch_size: 64}
scenarios:
  - {name: split-fmnist, options: {max_train_per_task: 300, max_test_per_task: 100}}
methods:
  - ft
  - {name: joint, label: joint-reinit, set: {reinit: true}}
"""


def _suite(tmp_path, text=SUITE, name="tiny.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    e.update(extra)
    return e


# The grace before a silent worker is taken over: short where a test kills a worker, longer where no
# worker dies, so that a worker starved of CPU on a loaded machine is not taken for dead (its cell would
# then run twice and "exactly once" would fail for a reason that is not the one under test).
KILL_GRACE, NO_KILL_GRACE = "3", "15"


def _worker(suite, res, storage, *more, env=None, grace=KILL_GRACE):
    args = [sys.executable, "-m", "harness.cli", "suite", str(suite), "--results", str(res), "--no-report",
            "--heartbeat", "1", "--grace", grace, *(["--storage", storage] if storage else []), *more]
    # Ignored and blocked signals are inherited through exec: a test process whose SIGINT was ignored
    # (started with `cmd &`) or blocked (by an earlier test) would start workers that never see
    # Ctrl-C. The worker is started with SIGINT unblocked and handled, then the test's state restored.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    handler = signal.getsignal(signal.SIGINT)
    if handler == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # becomes the default at exec
    try:
        return subprocess.Popen(args, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    finally:
        if handler == signal.SIG_IGN:
            signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _records(res, experiment="tiny"):
    return {r["key"]: r for r in (json.loads(p.read_text()) for p in sorted((res / experiment / "runs").glob("*.json")))}


def _trials(storage_url, res):
    import optuna

    from harness.orchestration.storage import make_storage

    st = make_storage(storage_url, res)
    (name,) = [n for n in optuna.get_all_study_names(st) if n.startswith("suite-tiny-")]
    return optuna.load_study(study_name=name, storage=st).get_trials()


def _mlflow_seed_runs(res, experiment="tiny"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{res.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def _exactly_once(res, storage_url, n_cells):
    """Every cell: one finished record, one COMPLETE trial, one FINISHED MLflow run whose per-task
    metrics were each logged once (a cell run twice would log its tasks twice)."""
    from optuna.trial import TrialState

    recs = _records(res)
    assert len(recs) == n_cells and {r["status"] for r in recs.values()} == {"finished"}
    trials = _trials(storage_url, res)
    complete = [t.user_attrs["dmkd_cell"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(recs)
    client, runs = _mlflow_seed_runs(res)
    seed_runs = [r for r in runs if r.data.tags.get("dmkd.kind") == "run"]
    assert sorted(r.data.tags["dmkd.key"] for r in seed_runs) == sorted(recs)
    assert {r.info.status for r in runs} == {"FINISHED"}  # suite, group and seed runs alike
    for r in seed_runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "class_il/avg_acc")]
        assert sorted(steps) == [0, 1, 2, 3, 4], (r.data.tags["dmkd.key"], steps)
    return recs, trials


@needs_fmnist
def test_four_workers_through_postgresql_run_every_cell_exactly_once(tmp_path, postgres):  # noqa: F811
    suite, res = _suite(tmp_path), tmp_path / "res"
    procs = [_worker(suite, res, postgres, grace=NO_KILL_GRACE) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-800:] for o in outs]
    recs, trials = _exactly_once(res, postgres, 6)
    assert not any(r.get("resumed_from_task") for r in recs.values())
    workers = {r["worker"] for r in recs.values()}
    ran = sum(1 for t in trials if t.state.name == "COMPLETE")
    print(f"\n4 workers / PostgreSQL: {len(recs)} cells finished, {ran} COMPLETE trials, {len(trials)} trials in all, "
          f"{len(workers)} distinct workers ran cells, duplicates executed: 0")


@needs_fmnist
def test_killed_worker_cell_is_taken_over_from_its_checkpoint(tmp_path, postgres):  # noqa: F811
    from harness.engine.runner import run
    from harness.orchestration.suite import load_suite

    suite, res = _suite(tmp_path), tmp_path / "res"
    victim = _worker(suite, res, postgres, env=_env(DMKD_TEST_KILL_AFTER_TASK="2"))
    deadline = time.time() + 300
    while not list((res / "tiny" / "runs").glob("*.json")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # the victim has taken a cell before the others start
    others = [_worker(suite, res, postgres) for _ in range(2)]
    assert victim.wait(timeout=600) == -signal.SIGKILL
    outs = [p.communicate(timeout=600) for p in others]
    assert [p.returncode for p in others] == [0, 0], [o[1][-800:] for o in outs]
    recs, trials = _exactly_once(res, postgres, 6)
    (key,) = [k for k, r in recs.items() if r.get("resumed_from_task")]
    taken = recs[key]
    assert taken["resumed_from_task"] == 3  # tasks 0-2 by the dead worker, 3-4 by another process
    assert taken["worker"].split(":")[1] != str(victim.pid)
    stale = [t for t in trials if t.user_attrs["dmkd_cell"] == key and t.state.name == "FAIL"]
    retry = [t for t in trials if t.user_attrs["dmkd_cell"] == key and t.state.name == "COMPLETE"]
    assert len(stale) == 1 and len(retry) == 1 and retry[0].system_attrs["failed_trial"] == stale[0].number
    # The taken-over cell's accuracy matrices equal an uninterrupted run of the same spec.
    spec = next(s for s in load_suite(suite).specs() if s.key() == key)
    ref = run(spec)
    assert taken["acc"] == ref["acc"] and taken["metrics"] == ref["metrics"]
    print(f"\nkill -9: cell {key} resumed from task {taken['resumed_from_task']} by another worker; "
          f"acc matrices identical to an uninterrupted run: {taken['acc'] == ref['acc']}; 6/6 cells finished once")


@needs_fmnist
def test_local_workers_launcher_and_wall_time(tmp_path):
    suite, res = _suite(tmp_path), tmp_path / "res"
    p = subprocess.run([sys.executable, "-m", "harness.cli", "suite", str(suite), "--results", str(res), "--no-report",
                        "--workers", "2", "--heartbeat", "1", "--grace", NO_KILL_GRACE], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "starting 2 workers x" in p.stderr and "wall time:" in p.stdout and "2 workers" in p.stdout
    assert "joint-reinit" in p.stdout  # the suite's table, printed once by the launcher
    _exactly_once(res, None, 6)
    assert len({r["worker"] for r in _records(res).values()}) <= 2


@needs_fmnist
def test_slurm_launcher_through_submitits_local_executor(tmp_path):
    pytest.importorskip("submitit")
    suite, res = _suite(tmp_path, SUITE.replace("[0, 1, 2]", "[0, 1]")), tmp_path / "res"
    journal = f"journal:{tmp_path / 'suite.journal'}"
    p = subprocess.run([sys.executable, "-m", "harness.cli", "suite", str(suite), "--results", str(res), "--no-report",
                        "--launcher", "submitit-local", "--workers", "2", "--cpus-per-worker", "1", "--storage",
                        journal, "--heartbeat", "1", "--grace", NO_KILL_GRACE], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "submitted 2 worker job(s) through submitit (local)" in p.stderr
    assert "wall time:" in p.stdout
    from optuna.trial import TrialState

    recs = _records(res)
    assert len(recs) == 4 and {r["status"] for r in recs.values()} == {"finished"}
    done = [t.user_attrs["dmkd_cell"] for t in _trials(journal, res) if t.state == TrialState.COMPLETE]
    assert sorted(done) == sorted(recs)
    logs = list((res / "submitit" / "tiny").glob("*_log.out"))
    assert len(logs) == 2  # two jobs ran, each through harness.orchestration.launch.SuiteWorker


@needs_fmnist
@pytest.mark.parametrize("beats", [True, False])  # False: the holder died before its first heartbeat
def test_a_waiting_worker_reports_and_takes_over_a_silent_cell(tmp_path, capsys, beats):
    import optuna

    from harness.orchestration import cluster
    from harness.orchestration.suite import load_suite
    from harness.orchestration.tracking import Store

    cfg = load_suite(_suite(tmp_path, SUITE.replace("[0, 1, 2]", "[0]")))
    store = Store(tmp_path / "res", cfg.experiment, "none")
    specs = cfg.specs()
    storage = cluster.open_storage(None, store, 1, 2)
    # Another worker popped the first cell, beat once, then fell silent (hung, or its clock is off).
    study = cluster._open_study(storage, cluster.study_name(cfg, specs), [s.key() for s in specs])
    held = study.ask()
    other = next(s.key() for s in specs if s.key() != held.user_attrs["dmkd_cell"])
    stop = threading.Event()

    def beat_until_the_other_cell_is_done():  # alive while our worker runs the other cell, then silent
        while not stop.is_set() and (store.load_record(other) or {}).get("status") != "finished":
            storage.record_heartbeat(held._trial_id)
            time.sleep(0.3)

    beater = threading.Thread(target=beat_until_the_other_cell_is_done)
    if beats:
        beater.start()
    try:
        recs = cluster.run_suite(cfg, store, heartbeat=1, grace=2, show_progress=False, report_s=0.5)
    finally:
        stop.set()
        if beats:
            beater.join()
    assert [r["status"] for r in recs] == ["finished", "finished"]
    err = capsys.readouterr().err
    assert f"waiting for 1 cell(s) running on other workers ({held.user_attrs['dmkd_cell']})" in err
    states = {t.number: t.state for t in study.get_trials()}
    assert states[held.number] == optuna.trial.TrialState.FAIL


@needs_fmnist
def test_sigint_hands_the_cell_back_and_the_resumed_suite_closes_every_mlflow_run(tmp_path):
    # 20 epochs a task, so that a task lasts seconds: the signal lands inside a run, not after the suite.
    suite = _suite(tmp_path, SUITE.replace("[0, 1, 2]", "[0]").replace("epochs: 1,", "epochs: 20,"))
    res = tmp_path / "res"
    w = _worker(suite, res, None)
    deadline = time.time() + 300
    while not list((res / "tiny" / "checkpoints").glob("*.pt")) and w.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    w.send_signal(signal.SIGINT)  # Ctrl-C in the middle of a run
    _, err = w.communicate(timeout=300)
    assert w.returncode == 130, err[-800:]
    running = [k for k, r in _records(res).items() if r["status"] == "running"]
    assert len(running) == 1
    trials = _trials(None, res)
    cell = [t for t in trials if t.user_attrs["dmkd_cell"] == running[0]]
    assert sorted(t.state.name for t in cell) == ["FAIL", "WAITING"]  # back in the queue for any worker
    w = _worker(suite, res, None)
    _, err = w.communicate(timeout=600)
    assert w.returncode == 0, err[-800:]
    recs = _records(res)
    assert {r["status"] for r in recs.values()} == {"finished"} and recs[running[0]]["resumed_from_task"] >= 1
    _, runs = _mlflow_seed_runs(res)
    assert len(runs) == 5 and {r.info.status for r in runs} == {"FINISHED"}  # suite, 2 groups, 2 seeds


def test_journal_heartbeat_ignores_the_writers_clock(tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from harness.orchestration.storage import JournalHeartbeatStorage

    st = JournalHeartbeatStorage(JournalFileBackend(str(tmp_path / "j.log")), 1, 1)
    study = optuna.create_study(storage=st)
    alive, silent = study.ask(), study.ask()
    # A beat dated a day in the future must not keep a silent trial alive.
    st.set_trial_system_attr(silent._trial_id, st.ATTR, [time.time() + 86400, 1])
    assert st._get_stale_trial_ids(study._study_id) == []  # first sight: nothing known yet
    time.sleep(0.6)
    st.record_heartbeat(alive._trial_id)
    assert st._get_stale_trial_ids(study._study_id) == []
    time.sleep(0.6)
    st.record_heartbeat(alive._trial_id)
    assert st._get_stale_trial_ids(study._study_id) == [silent._trial_id]


@pytest.mark.parametrize("hb,grace,msg", [("0", "60", "--heartbeat must be"), ("nan", "60", "--heartbeat must be"),
                                          ("-5", "60", "--heartbeat must be"), ("1.5", "60", "--heartbeat must be"),
                                          ("10", "inf", "--grace must be"), ("10", "0", "--grace must be"),
                                          ("10", "10", "must be longer than")])
def test_bad_heartbeat_values_are_one_line_errors(tmp_path, capsys, hb, grace, msg):
    from harness.cli.dmkd import main

    rc = main(["suite", str(_suite(tmp_path)), "--results", str(tmp_path / "res"), "--heartbeat", hb, "--grace", grace])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and msg in err
    assert not (tmp_path / "res").exists()  # refused before anything is written


def test_study_name_depends_on_every_resolved_field(tmp_path):
    from harness.orchestration.cluster import study_name
    from harness.orchestration.suite import load_suite

    a = load_suite(_suite(tmp_path, name="a.yaml"))
    b = load_suite(_suite(tmp_path, SUITE.replace("batch_size: 64", "batch_size: 64, lr: 0.05"), name="b.yaml"))
    c = load_suite(_suite(tmp_path, name="c.yaml"))
    assert study_name(a, a.specs()) != study_name(b, b.specs())
    assert study_name(a, a.specs()) == study_name(c, c.specs())
    c.data_root = "/elsewhere"  # where a machine keeps the data does not split the study
    assert study_name(a, a.specs()) == study_name(c, c.specs())
    assert study_name(a, a.specs()).startswith("suite-tiny-")


def test_worker_plans_fit_the_cores():
    from harness.orchestration.launch import plan_workers

    plan = plan_workers("2", None, 66, cores=2)
    assert [e["OMP_NUM_THREADS"] for e in plan] == ["1", "1"] and "CUDA_VISIBLE_DEVICES" not in plan[0]
    assert [e["OMP_NUM_THREADS"] for e in plan_workers("3", None, 66, cores=16)] == ["5"] * 3
    assert len(plan_workers("auto", None, 66, cores=16)) == 16
    assert len(plan_workers("auto", None, 4, cores=16)) == 4  # never more workers than runs
    gpu = plan_workers("1", 2, 66, cores=16, gpus=["0", "3"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in gpu] == ["0", "0", "3", "3"] and gpu[0]["OMP_NUM_THREADS"] == "4"
    with pytest.raises(UserError, match="no GPU is visible"):
        plan_workers("1", 2, 66, cores=2, gpus=[])
    with pytest.raises(UserError, match="--workers must be"):
        plan_workers("0", None, 66, cores=2)
