"""A team MLflow tracking server (``mlflow server``, PostgreSQL backend store, local artifact root; see
tests/engines.py): a 2-worker suite logs into it, `dmkd report` builds the same leaderboard from it as
from the JSON records, a server stopped mid-suite costs no record and `dmkd sync` fills MLflow in
afterwards, and the served UI opens the suite's experiment on its training runs.

Skipped, with the reason, where PostgreSQL is not installed (scripts/setup.sh --test installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import needs_fmnist
from tests.test_cluster import NO_KILL_GRACE, REPO, _env, _records, _suite

pytestmark = needs_fmnist

SUITE = """
name: {name}
experiment: {name}
seeds: [0, 1]
protocol: {{epochs: {epochs}, batch_size: 64}}
scenarios:
  - {{name: split-fmnist, options: {{max_train_per_task: 300, max_test_per_task: 100}}}}
methods:
  - ft
  - {{name: joint, label: joint-reinit, set: {{reinit: true}}}}
"""
KIND = "mlflow.experimentKind"


def _dmkd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def _suite_cmd(suite, res, storage, uri) -> list[str]:
    """A two-worker suite logging into the team server, as docs/cluster.md shows it."""
    return ["suite", str(suite), "--results", str(res), "--no-report", "--workers", "2", "--storage", storage,
            "--tracking-uri", uri, "--heartbeat", "1", "--grace", NO_KILL_GRACE]


def _board(report_dir) -> str:
    """LEADERBOARD.md without its run metadata (when and where the report was made)."""
    text = (report_dir / "LEADERBOARD.md").read_text()
    return text.split("## Run metadata")[0]


def _boards_equal(uri, res, experiment, tmp_path) -> str:
    """The leaderboard from MLflow alone (no JSON records beside it) and from the JSON records alone."""
    empty = tmp_path / "no-json"
    a = _dmkd("report", "--results", str(empty), "--experiment", experiment, "--tracking-uri", uri,
              "--out", str(tmp_path / "from-mlflow"))
    b = _dmkd("report", "--results", str(res), "--experiment", experiment, "--tracking-uri", "none",
              "--out", str(tmp_path / "from-json"))
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-1500:], b.stderr[-1500:])
    assert not empty.exists() or not any(empty.rglob("*.json"))
    board = _board(tmp_path / "from-mlflow")
    assert board == _board(tmp_path / "from-json")
    assert "| ft" in board and "| joint-reinit" in board
    return board


def _seed_runs(uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, exp, runs


def _complete(client, runs) -> dict[str, str]:
    """Seed runs holding their record and every task's metrics once: key -> status."""
    out = {}
    for r in runs:
        if r.data.tags.get("dmkd.kind") != "run":
            continue
        if not any(a.path == "record.json" for a in client.list_artifacts(r.info.run_id)):
            continue
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "class_il/avg_acc"))
        if steps == [0, 1, 2, 3, 4]:
            out[r.data.tags["dmkd.key"]] = r.info.status
    return out


@pytest.fixture(scope="module")
def team_suite(mlflow_server, engines_postgres, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    suite, res = _suite(tmp, SUITE.format(name="team", epochs=1)), tmp / "res"
    p = _dmkd(*_suite_cmd(suite, res, engines_postgres.create_db("team_suite"), mlflow_server.uri))
    assert p.returncode == 0, p.stderr[-2000:]
    return res


def test_a_two_worker_suite_logs_into_the_team_server(mlflow_server, team_suite, tmp_path):
    recs = _records(team_suite, "team")
    assert len(recs) == 4 and {r["status"] for r in recs.values()} == {"finished"}
    assert len({r["worker"] for r in recs.values()}) <= 2
    client, exp, runs = _seed_runs(mlflow_server.uri, "team")
    assert exp.tags.get(KIND) == "custom_model_development"  # MLflow's UI opens it on its runs
    assert _complete(client, runs) == {k: "FINISHED" for k in recs}
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 1 + 2 + 4  # suite, groups, seeds
    assert {r.data.tags["mlflow.runName"] for r in runs if r.data.tags.get("dmkd.kind") == "run"} == {"seed 0", "seed 1"}
    # The artifacts went through the server into its artifact root, not into the results folder.
    assert len(list(mlflow_server.artifacts.rglob("record.json"))) == 4
    assert not (team_suite / "mlartifacts").exists()
    board = _boards_equal(mlflow_server.uri, team_suite, "team", tmp_path)
    print(f"\nteam server {mlflow_server.uri} (backend {mlflow_server.backend.split('@')[-1]}): 4 seed runs "
          f"FINISHED, experiment tag {KIND}={exp.tags.get(KIND)}; leaderboard from MLflow == from JSON:\n{board}")


def test_a_server_stopped_mid_suite_loses_nothing_and_sync_fills_it_in(mlflow_server, engines_postgres, tmp_path):
    suite, res = _suite(tmp_path, SUITE.format(name="outage", epochs=4)), tmp_path / "res"
    uri = mlflow_server.uri
    p = subprocess.Popen([sys.executable, "-m", "harness.cli", *_suite_cmd(
        suite, res, engines_postgres.create_db("outage_suite"), uri)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None:
            recs = _records(res, "outage") if (res / "outage" / "runs").is_dir() else {}
            if any(r["status"] == "finished" for r in recs.values()):
                break
            time.sleep(0.2)
        mlflow_server.stop()  # mid-suite: one cell finished, the others running or queued
        at_stop = sum(r["status"] == "finished" for r in _records(res, "outage").values())
        _, err = p.communicate(timeout=600)
    finally:
        mlflow_server.stop()
        mlflow_server.start()  # the same server (same backend store and artifact root) again
    assert p.returncode == 0, err[-2000:]
    assert at_stop < 4
    assert f"warning: MLflow tracking at {uri} failed" in err  # said once per worker; the runs went on
    recs = _records(res, "outage")
    assert len(recs) == 4 and {r["status"] for r in recs.values()} == {"finished"}  # the JSON records are complete

    client, _, runs = _seed_runs(uri, "outage")
    before = _complete(client, runs)
    gone = sorted(set(recs) - set(before))  # no record in MLflow: the server never heard the run's end
    unfinished = sorted(k for k in recs if before.get(k) != "FINISHED")  # those, and any left RUNNING
    assert gone
    rep = _dmkd("report", "--results", str(res), "--experiment", "outage", "--tracking-uri", uri)
    assert rep.returncode == 0, rep.stderr[-1500:]
    said = [line for line in rep.stderr.splitlines() if "lacks" in line]
    assert len(said) == 1 and all(f"outage/{k}" in said[0] for k in gone), rep.stderr[-1500:]
    assert "missing from MLflow" in (res / "report" / "LEADERBOARD.md").read_text()

    sync = _dmkd("sync", "--results", str(res), "--tracking-uri", uri)
    assert sync.returncode == 0, sync.stderr[-1500:]
    assert sync.stdout.startswith(f"outage: copied {len(unfinished)} run(s)"), sync.stdout
    assert "MLflow holds all 4" in sync.stdout and sync.stdout.count("\n") == 1
    client, _, runs = _seed_runs(uri, "outage")
    assert _complete(client, runs) == {k: "FINISHED" for k in recs}  # complete, and each cell once
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 1 + 2 + 4
    again = _dmkd("sync", "--results", str(res), "--tracking-uri", uri)
    assert "copied 0 run(s)" in again.stdout  # nothing left to copy
    rep = _dmkd("report", "--results", str(res), "--experiment", "outage", "--tracking-uri", uri)
    assert "lacks" not in rep.stderr
    board = _boards_equal(uri, res, "outage", tmp_path)
    print(f"\nserver stopped with {at_stop}/4 cells finished; the suite went on (exit 0, 4/4 JSON records); "
          f"MLflow then lacked {gone} (not FINISHED there: {unfinished}); report said: {said[0]}\n`dmkd sync`: {sync.stdout.strip()}\n"
          f"leaderboard from MLflow == from JSON:\n{board}")


BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_the_served_ui_opens_the_suites_experiment_on_its_training_runs(mlflow_server, team_suite, tmp_path):
    """The link docs/cluster.md gives opens the experiment on its runs table. (MLflow 3.17's UI takes an
    experiment's kind from its GenAI / Model training switch, ``workflowType`` in the link or the
    browser's last choice; older MLflow 3 UIs take it from the experiment's kind tag, which the harness
    sets. The plain link's screenshot is kept beside, for comparison.)"""
    _, exp, _ = _seed_runs(mlflow_server.uri, "team")
    plain = f"{mlflow_server.uri}/#/experiments/{exp.experiment_id}"
    url = f"{plain}?workflowType=machine_learning"
    base = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update", "--window-size=1400,900",
            "--virtual-time-budget=30000"]
    pages = {}
    for name, link in (("runs", url), ("plain", plain)):
        prof = f"--user-data-dir={tmp_path / ('profile-' + name)}"  # a fresh browser: no remembered choice
        dom = subprocess.run([*base, prof, "--dump-dom", link], capture_output=True, text=True, timeout=180,
                             check=False)
        assert dom.returncode == 0, dom.stderr[-1500:]
        pages[name] = dom.stdout
        (tmp_path / f"mlflow-ui-{name}.html").write_text(dom.stdout)
        png = tmp_path / f"mlflow-ui-{name}.png"
        shot = subprocess.run([*base, prof, f"--screenshot={png}", link], capture_output=True, text=True,
                              timeout=180, check=False)
        assert shot.returncode == 0 and png.stat().st_size > 10_000, shot.stderr[-1500:]
    page = pages["runs"]
    assert "suite team" in page  # the runs table, with the suite's parent run
    assert "No data available" not in page  # not the GenAI traces overview
    print(f"\nMLflow UI: {url} opens on the runs (screenshot {tmp_path / 'mlflow-ui-runs.png'}); "
          f"{plain}: {'runs' if 'suite team' in pages['plain'] else 'GenAI overview'} "
          f"(screenshot {tmp_path / 'mlflow-ui-plain.png'})")
