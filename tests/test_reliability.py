"""Reliability (issue 11): one identity per run, nothing lost or mixed, no code from checkpoints,
every bad input one clear line with exit status 2. Kill cases are real subprocess kills."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.cli.dmkd import main
from harness.core.errors import UserError, one_line, redact
from harness.engine.runner import RunSpec
from harness.orchestration.tracking import Store
from tests.conftest import needs_fmnist

REPO = Path(__file__).resolve().parent.parent
CAPS = ["--set", "max_train_per_task=100", "--set", "max_test_per_task=50"]
FT = ["run", "--method", "ft", "--scenario", "split-fmnist"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=env or _env(), cwd=REPO, check=False, timeout=timeout)


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if line.startswith("error:")]


def _one_error(capsys, argv: list[str], expect: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and expect in lines[0], err
    assert "Traceback" not in err and "—" in lines[0]


def _snapshot(folder: Path) -> dict[Path, bytes]:
    # Run-key claim locks (empty files under claims/) record nothing; everything else must be unchanged.
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.parent.name != "claims"}


def _records(results: Path, experiment: str = "adhoc") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / experiment / "runs").glob("*.json"))]


@pytest.fixture
def recorded(tmp_path, capsys):
    """A results folder holding one finished run; every bad command must leave it byte for byte."""
    res = tmp_path / "res"
    assert main([*FT, "--results", str(res), "--tracking-uri", "none", *CAPS]) == 0
    capsys.readouterr()
    before = _snapshot(res)
    yield res
    assert _snapshot(res) == before


# ---------------------------------------------------------------------------------------------
# Run identity
# ---------------------------------------------------------------------------------------------
def test_identity_covers_the_whole_resolved_configuration():
    base = RunSpec("ft", "split-fmnist", 0)
    same = RunSpec("ft", "split-fmnist", 0, scenario_set={"val_fraction": 0.1})  # the default, spelt out
    assert base.key() == same.key() and base.config_hash() == same.config_hash()
    from harness.core.protocol import Protocol

    variants = [
        RunSpec("ft", "split-fmnist", 1),
        RunSpec("ft", "split-fmnist", 0, protocol=Protocol(lr=0.05)),
        RunSpec("ft", "split-fmnist", 0, protocol=Protocol(optimizer="adam")),
        RunSpec("ft", "split-fmnist", 0, protocol=Protocol(eval_batch_size=512)),
        RunSpec("ft", "split-fmnist", 0, protocol=Protocol(backbone="cnn")),
        RunSpec("ft", "split-fmnist", 0, scenario_set={"max_train_per_task": 5}),
        RunSpec("ewc", "split-fmnist", 0, method_set={"ewc_lambda": 10.0}),
        RunSpec("ewc", "split-fmnist", 0, method_set={"ewc_lambda": 10.0}, label="a/b"),
        RunSpec("ewc", "split-fmnist", 0, method_set={"ewc_lambda": 10.0}, label="a_b"),
        RunSpec("ft", "split-fmnist", 0, eval_split="val"),
    ]
    keys = [base.key()] + [v.key() for v in variants]
    assert len(set(keys)) == len(keys)
    # The backbone default resolved: naming the scenario's default backbone is the same run.
    assert RunSpec("ft", "split-fmnist", 0, protocol=Protocol(backbone="mlp")).key() == base.key()
    # Seeds of one row share the group hash; another protocol does not.
    assert RunSpec("ft", "split-fmnist", 3).group_hash() == base.group_hash()
    assert variants[1].group_hash() != base.group_hash()
    long = RunSpec("ft", "split-fmnist", 0, label="x" * 300)
    assert len(long.key()) < 150  # a file name, whatever the label


@needs_fmnist
def test_a_finished_record_is_never_overwritten(tmp_path, capsys):
    res = tmp_path / "res"
    assert main([*FT, "--results", str(res), "--tracking-uri", "none", *CAPS]) == 0
    first = _records(res)
    assert len(first) == 1 and first[0]["status"] == "finished"
    before = _snapshot(res)
    # The case: eval_batch_size=-1 used to turn the finished record into a running one of zeros.
    _one_error(capsys, [*FT, "--results", str(res), "--tracking-uri", "none", *CAPS, "--set", "eval_batch_size=-1"],
               "eval_batch_size must be")
    assert _snapshot(res) == before
    # The identical configuration again: the record stands as it was, and is reported as reused.
    assert main([*FT, "--results", str(res), "--tracking-uri", "none", *CAPS]) == 0
    assert "already run to the end" in capsys.readouterr().err
    assert _snapshot(res) == before
    # Another protocol is another run with its own record; the first is untouched.
    assert main([*FT, "--results", str(res), "--tracking-uri", "none", *CAPS, "--set", "eval_batch_size=512"]) == 0
    recs = _records(res)
    assert len(recs) == 2 and {r["config"]["protocol"]["eval_batch_size"] for r in recs} == {1024, 512}
    assert (res / "adhoc" / "runs" / f"{first[0]['key']}.json").read_bytes() == \
        before[res / "adhoc" / "runs" / f"{first[0]['key']}.json"]
    # And the store itself refuses to put an unfinished record over a finished one.
    store = Store(res, "adhoc", "none")
    with pytest.raises(RuntimeError, match="refusing to overwrite"):
        store.save_record(dict(first[0], status="running"))


@needs_fmnist
def test_a_killed_run_resumes_only_its_own_configuration(tmp_path):
    res = tmp_path / "res"
    args = [*FT, "--results", str(res), "--tracking-uri", "none", *CAPS]
    killed = _cli(*args, env=_env(DMKD_TEST_KILL_AFTER_TASK="1"))
    assert killed.returncode == -signal.SIGKILL
    (sgd,) = _records(res)
    assert sgd["status"] == "running" and len(list((res / "adhoc" / "checkpoints").glob("*.pt"))) == 1
    # Another optimiser and lr: a run of its own from task 0, not a resume of the sgd checkpoint.
    other = _cli(*args, "--set", "lr=0.05", "--set", "optimizer=adam")
    assert other.returncode == 0, other.stderr
    recs = {r["config"]["protocol"]["optimizer"]: r for r in _records(res)}
    assert recs["adam"]["status"] == "finished" and "resumed_from_task" not in recs["adam"]
    assert recs["adam"]["config"]["protocol"]["lr"] == 0.05
    assert recs["sgd"]["status"] == "running"
    # The sgd run resumes from its own checkpoint after task 1, and ends as an uninterrupted run does.
    again = _cli(*args)
    assert again.returncode == 0, again.stderr
    resumed = {r["config"]["protocol"]["optimizer"]: r for r in _records(res)}["sgd"]
    assert resumed["status"] == "finished" and resumed["resumed_from_task"] == 2
    fresh = tmp_path / "fresh"
    assert _cli(*FT, "--results", str(fresh), "--tracking-uri", "none", *CAPS).returncode == 0
    (ref,) = _records(fresh)
    assert resumed["acc"] == ref["acc"] and resumed["key"] == ref["key"]


SUITE = """
name: tiny
experiment: tiny
seeds: [0]
protocol: {epochs: 1, batch_size: 64}
scenarios:
  - {name: split-fmnist, options: {max_train_per_task: 100, max_test_per_task: 50}}
methods:
  - ft
"""


@needs_fmnist
def test_a_changed_protocol_is_new_runs_never_the_old_numbers(tmp_path):
    res = tmp_path / "res"
    a = tmp_path / "a.yaml"
    a.write_text(SUITE)
    b = tmp_path / "b.yaml"
    b.write_text(SUITE.replace("batch_size: 64}", "batch_size: 64, lr: 0.05, optimizer: adam}"))
    first = _cli("suite", str(a), "--results", str(res), "--no-report", "--tracking-uri", "none")
    assert first.returncode == 0, first.stderr
    second = _cli("suite", str(b), "--results", str(res), "--no-report", "--tracking-uri", "none")
    assert second.returncode == 0, second.stderr
    recs = _records(res, "tiny")
    assert len(recs) == 2 and all(r["status"] == "finished" for r in recs)
    assert {r["config"]["protocol"]["optimizer"] for r in recs} == {"sgd", "adam"}
    assert recs[0]["acc"] != recs[1]["acc"]
    # The report keeps the two configurations apart although their label is the same.
    from reports.load import load_records

    labels = sorted(r["label"] for r in load_records(res, "tiny"))
    assert len(set(labels)) == 2 and all(lbl.startswith("ft [") for lbl in labels)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing recorded
# ---------------------------------------------------------------------------------------------
BAD_RUNS = [
    (["--set", "eval_batch_size=0"], "eval_batch_size must be"),
    (["--set", "eval_batch_size=-1"], "eval_batch_size must be"),
    (["--set", "momentum=nan"], "not a finite number"),
    (["--set", "weight_decay=inf"], "not a finite number"),
    (["--set", "momentum=1.5"], "momentum must be < 1"),
    (["--seed", str(2**64)], "is not an integer in"),
    (["--seed", "-1"], "is not an integer in"),
    (["--device", "meta"], "cannot train"),
    (["--device", "nosuch"], "unknown device"),
    (["--set", "val_fraction=0.999"], "no training samples"),
    (["--experiment", "../../escaped"], "not a plain folder name"),
    (["--experiment", "/abs/path"], "not a plain folder name"),
]


@needs_fmnist
@pytest.mark.parametrize("extra,expect", BAD_RUNS, ids=[" ".join(b[0]) for b in BAD_RUNS])
def test_bad_run_inputs(capsys, recorded, tmp_path, extra, expect):
    _one_error(capsys, [*FT, "--results", str(recorded), "--tracking-uri", "none", *CAPS, *extra], expect)
    assert not (tmp_path / "escaped").exists() and not Path("/abs/path").exists()


@needs_fmnist
def test_bad_scenario_option_values(capsys, recorded):
    _one_error(capsys, ["run", "--method", "ft", "--scenario", "rotated-fmnist", "--results", str(recorded),
                        "--tracking-uri", "none", *CAPS, "--set", "max_angle=nan"], "not a finite number")


def _suite_error(capsys, tmp_path, recorded, text: str | bytes, expect: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    _one_error(capsys, ["suite", str(f), "--results", str(recorded), "--tracking-uri", "none", "--no-report"], expect)


BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n" \
       "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
BAD_SUITES = [
    (SUITE.replace("seeds: [0]", "seeds: []"), "seeds must be a non-empty list"),
    (SUITE.replace("seeds: [0]", "seeds: 0"), "runs nothing"),
    (SUITE.replace("seeds: [0]", "seeds: -3"), "runs nothing"),
    (SUITE.replace("seeds: [0]", "seeds: [0, 0]"), "listed twice"),
    (SUITE.replace("seeds: [0]", f"seeds: [{2**64}]"), "seeds must be integers"),
    (SUITE.replace("  - ft\n", "  - {name: ewc, label: x}\n  - {name: lwf, label: x}\n"), "the same row twice"),
    (SUITE.replace("  - ft\n", "  - {name: ewc, label: a/b}\n  - {name: lwf, label: a_b}\n"), "the same row twice"),
    (SUITE.replace("  - ft\n", "  - ft\n  - ft\n"), "the same row twice"),
    (SUITE.replace("experiment: tiny", "experiment: ../../escaped"), "not a plain folder name"),
    (SUITE + "data_root: 5\n", "data_root must be a string"),
    (SUITE.replace("batch_size: 64}", "batch_size: 64, eval_batch_size: 0}"), "eval_batch_size must be"),
    # The second scenario is bad: the suite stops before the first one trains.
    (SUITE.replace("methods:", "  - {name: split-fmnist, options: {n_tasks: 3}}\nmethods:"), "cannot be split"),
    (BOMB + SUITE, "aliases are not allowed"),
    (b"name: \xff\xfe tiny\n" + SUITE.encode(), "not UTF-8"),
]


@needs_fmnist
@pytest.mark.parametrize("text,expect", BAD_SUITES, ids=[b[1] + str(i) for i, b in enumerate(BAD_SUITES)])
def test_bad_suite_inputs(capsys, recorded, tmp_path, text, expect):
    _suite_error(capsys, tmp_path, recorded, text, expect)
    assert not (recorded / "tiny").exists()  # nothing of the suite was recorded


def test_ablation_seeds(tmp_path):
    from harness.orchestration.tune import load_ablation

    f = tmp_path / "abl.yaml"
    f.write_text("method: dmkd\ngrid: {kd: [none, logits]}\nseeds: 2\n")
    assert load_ablation(f)["seeds"] == [0, 1]  # a count, as in suites
    f.write_text("method: dmkd\ngrid: {kd: [none, logits]}\nseeds: 0\n")
    with pytest.raises(UserError, match="runs nothing"):
        load_ablation(f)


@needs_fmnist
def test_bad_tuning_inputs(capsys, recorded, tmp_path):
    tune = ["tune", "--method", "ft", "--scenario", "split-fmnist", "--trials", "1", "--results", str(recorded),
            "--tracking-uri", "none", *CAPS]
    _one_error(capsys, [*tune, "--storage", "journal:/nonexistent/dir/x.log"], "does not exist")
    _one_error(capsys, [*tune, "--storage", f"sqlite:///{tmp_path}/no/such/dir/x.db"], "not writable")
    _one_error(capsys, [*tune, "--set", "val_fraction=0"], "empty validation split")
    _one_error(capsys, [*tune, "--seeds", "0,0"], "listed twice")
    code = main([*tune, "--storage", "postgresql+psycopg://alice:s3cret@127.0.0.1:1/db"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot open Optuna storage"), err
    assert "s3cret" not in err and "alice:***@" in err


@needs_fmnist
def test_corrupt_tuned_settings(capsys, recorded, tmp_path):
    (recorded / "tuned").mkdir()
    (recorded / "tuned" / "ft__split-fmnist.json").write_text("{not json")
    f = tmp_path / "s.yaml"
    f.write_text(SUITE)
    try:
        _one_error(capsys, ["suite", str(f), "--tuned", "--results", str(recorded), "--tracking-uri", "none"],
                   "unreadable")
    finally:
        (recorded / "tuned" / "ft__split-fmnist.json").unlink()
        (recorded / "tuned").rmdir()


def test_messages_are_one_line_and_mask_passwords():
    assert redact("postgresql://alice:pw@db:5432/x") == "postgresql://alice:***@db:5432/x"
    assert redact("http://bob:p%40ss@host:5000 and sqlite:///a.db") == "http://bob:***@host:5000 and sqlite:///a.db"
    assert redact("host=db password=hunter2 user=x") == "host=db password=*** user=x"
    assert one_line("connection failed\n\tIs the server running on host \"x\"?") == \
        'connection failed Is the server running on host "x"?'
    assert UserError("a\nb", "c\nd").line() == "error: a b — c d"


def test_mlflow_warning_masks_the_password(tmp_path, capsys):
    store = Store(tmp_path, "e", "http://alice:topsecret@127.0.0.1:9")
    assert store.mlflow.find_or_create({"dmkd.kind": "run"}, "x") is None
    err = capsys.readouterr().err
    assert "topsecret" not in err and "alice:***@127.0.0.1:9" in err


def test_mlflow_names_with_quotes(tmp_path):
    store = Store(tmp_path, "e", f"sqlite:///{tmp_path}/mlflow.db")
    tags = {"dmkd.kind": "suite", "dmkd.suite": "it's \"quoted\" `x`"}
    a = store.mlflow.find_or_create(tags, "suite it's")
    assert a is not None and not store.mlflow.disabled
    assert store.mlflow.find_or_create(tags, "suite it's") == a  # found again, not a second run
    assert store.mlflow.find_or_create({"dmkd.kind": "suite", "dmkd.suite": "other"}, "o") != a


def test_report_escapes_html_from_labels(tmp_path):
    import pandas as pd

    from reports.build import leaderboard_markdown
    from reports.tables import to_markdown

    md = to_markdown(pd.DataFrame({"method": ["<script>alert(1)</script>"], "acc": ["0.5"]}))
    assert "<script>" not in md and "&lt;script&gt;" in md
    page = leaderboard_markdown("<b>t</b>", [], [], pd.DataFrame(), {"runs": "1", "experiments": "<i>x</i>"})
    assert "<b>" not in page and "<i>" not in page


@needs_fmnist
def test_report_ignores_temp_files_and_unwritable_out(tmp_path, capsys, recorded):
    tmp = recorded / "adhoc" / "runs" / ".tmp-abc.json"
    tmp.write_text('{"half": ')
    try:
        out = tmp_path / "rep"
        assert main(["report", "--results", str(recorded), "--tracking-uri", "none", "--out", str(out)]) == 0
        assert (out / "LEADERBOARD.md").exists()
        # An existing folder whose files cannot be written (as root, permissions do not stop a write;
        # a folder where the file should go does).
        blocked = tmp_path / "blocked"
        (blocked / "LEADERBOARD.md").mkdir(parents=True)
        _one_error(capsys, ["report", "--results", str(recorded), "--tracking-uri", "none", "--out",
                            str(blocked)], "cannot write the report")
    finally:
        tmp.unlink()


@needs_fmnist
def test_report_with_an_unreachable_server_falls_back_at_once(tmp_path, capsys, recorded):
    out = tmp_path / "rep"
    assert main(["report", "--results", str(recorded), "--tracking-uri", "http://127.0.0.1:9",
                 "--out", str(out)]) == 0
    assert "does not answer" in capsys.readouterr().err
    assert (out / "LEADERBOARD.md").exists()


@needs_fmnist
def test_report_from_mlflow_has_failed_runs_and_untracked_runs(tmp_path, capsys):
    from reports.load import load_records

    res = tmp_path / "res"
    uri = f"sqlite:///{res}/mlflow.db"
    assert main([*FT, "--results", str(res), "--tracking-uri", uri, *CAPS]) == 0
    assert main([*FT, "--results", str(res), "--tracking-uri", uri, *CAPS, "--set", "lr=1e6"]) == 1  # diverges
    assert main([*FT, "--results", str(res), "--tracking-uri", "none", *CAPS, "--set", "lr=0.02"]) == 0
    capsys.readouterr()
    recs = load_records(res, "adhoc", uri)
    by_lr = {r.get("config", {}).get("protocol", {}).get("lr"): r["status"] for r in recs}
    assert len(recs) == 3 and sorted(by_lr.values()) == ["failed", "finished", "finished"]
    from reports.load import load_mlflow_records

    assert {r["status"] for r in load_mlflow_records(uri, "adhoc")} == {"finished", "failed"}


# ---------------------------------------------------------------------------------------------
# Checkpoints: never code, never another configuration's, never a blocker
# ---------------------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_a_crafted_checkpoint_runs_no_code(tmp_path, capsys):
    store = Store(tmp_path, "e", "none")
    spec = RunSpec("ft", "split-fmnist", 0)
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    path = store.checkpoint_path(spec.key())
    torch.save({"format": Store.CHECKPOINT_FORMAT, "key": spec.key(), "config_hash": spec.config_hash(),
                "state": _Payload()}, path)
    assert store.load_checkpoint(spec.key(), spec.config_hash()) is None
    assert not marker.exists()
    assert "unreadable" in capsys.readouterr().err and path.with_suffix(".pt.bad").exists()


def test_checkpoints_of_another_config_or_incomplete_are_set_aside(tmp_path, capsys):
    store = Store(tmp_path, "e", "none")
    spec = RunSpec("ft", "split-fmnist", 0)
    key, h = spec.key(), spec.config_hash()
    store.save_checkpoint(key, "0" * 12, {"method": {}})
    assert store.load_checkpoint(key, h) is None and "another configuration" in capsys.readouterr().err
    store.save_checkpoint(key, h, {"method": {}})  # unpickles, but lacks the rest of the state
    assert store.load_checkpoint(key, h) is None and "incomplete" in capsys.readouterr().err
    assert not store.checkpoint_path(key).exists()  # set aside: the next try starts cleanly
    full = dict.fromkeys(("method", "rng", "record", "flops_total", "boundary_flops", "comm", "samples_seen",
                          "next_task"), 0)
    store.save_checkpoint(key, h, full)
    assert store.load_checkpoint(key, h) == full


@needs_fmnist
def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch):
    res = tmp_path / "res"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    _one_error(capsys, [*FT, "--results", str(res), "--tracking-uri", "none", *CAPS], "no space left")
    (rec,) = _records(res)
    assert rec["status"] == "running"  # not finished: it resumes when there is space again
    assert not list((res / "adhoc" / "checkpoints").glob("*tmp*"))
    monkeypatch.undo()
    assert main([*FT, "--results", str(res), "--tracking-uri", "none", *CAPS]) == 0
    assert _records(res)[0]["status"] == "finished"


# ---------------------------------------------------------------------------------------------
# MLflow: store creation safe against kill -9; statuses that agree with the records
# ---------------------------------------------------------------------------------------------
@needs_fmnist
def test_kill_during_mlflow_store_creation_then_rerun(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    uri = f"sqlite:///{res}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *FT, "--results", str(res), "--tracking-uri", uri,
                             *CAPS], env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(res.glob("*mlflow.db*")) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)  # well inside MLflow's migrations
    creating = list(res.glob(".mlflow.db.creating-*"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert creating, "the kill must land while the store is being created"
    assert not (res / "mlflow.db").exists() or _complete(res / "mlflow.db")
    again = _cli(*FT, "--results", str(res), "--tracking-uri", uri, *CAPS)
    assert again.returncode == 0, again.stderr
    assert "MLflow tracking" not in again.stderr  # MLflow is on, not silently off
    (rec,) = _records(res)
    assert rec["status"] == "finished" and rec["mlflow_run_id"]
    con = sqlite3.connect(res / "mlflow.db")
    assert con.execute("select status from runs where run_uuid=?", (rec["mlflow_run_id"],)).fetchone() == \
        ("FINISHED",)


def _complete(db: Path) -> bool:
    from harness.orchestration.tracking import _sqlite_store_complete

    return _sqlite_store_complete(db)


def test_a_half_created_store_is_repaired(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("create table experiments (experiment_id integer primary key, name text)")  # as a kill leaves it
    con.commit()
    con.close()
    store = Store(tmp_path, "e", f"sqlite:///{db}")
    assert store.mlflow.find_or_create({"dmkd.kind": "run"}, "x") is not None
    assert "half-created" in capsys.readouterr().err
    assert list(tmp_path.glob("mlflow.db.incomplete-*"))


@needs_fmnist
def test_kill_before_mlflow_hears_finished_then_rerun(tmp_path):
    res = tmp_path / "res"
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE.replace("seeds: [0]", "seeds: [0, 1]"))
    uri = f"sqlite:///{res}/mlflow.db"
    killed = _cli("suite", str(suite), "--results", str(res), "--no-report", "--tracking-uri", uri,
                  env=_env(DMKD_TEST_KILL_BEFORE_FINISHED="1"))
    assert killed.returncode == -signal.SIGKILL
    again = _cli("suite", str(suite), "--results", str(res), "--no-report", "--tracking-uri", uri)
    assert again.returncode == 0, again.stderr
    recs = _records(res, "tiny")
    assert [r["status"] for r in recs] == ["finished", "finished"]
    con = sqlite3.connect(res / "mlflow.db")
    statuses = dict(con.execute("select run_uuid, status from runs").fetchall())
    assert all(s == "FINISHED" for s in statuses.values()), statuses
    assert len(statuses) == 1 + 1 + 2  # suite, group, two seeds: nothing created twice


@needs_fmnist
def test_sigint_mid_suite_then_resume_leaves_nothing_running(tmp_path):
    res = tmp_path / "res"
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE.replace("seeds: [0]", "seeds: [0, 1]"))
    uri = f"sqlite:///{res}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "suite", str(suite), "--results", str(res),
                             "--no-report", "--tracking-uri", uri], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = res / "tiny" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((res / "tiny" / "checkpoints").glob("*.pt")) if (res / "tiny").exists() else []:
            break  # the first run is past its first task
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 0), err
    if proc.returncode == 130:
        assert any(json.loads(p.read_text())["status"] == "running" for p in runs.glob("*.json"))
    again = _cli("suite", str(suite), "--results", str(res), "--no-report", "--tracking-uri", uri)
    assert again.returncode == 0, again.stderr
    con = sqlite3.connect(res / "mlflow.db")
    statuses = dict(con.execute("select run_uuid, status from runs").fetchall())
    assert len(statuses) == 4 and set(statuses.values()) == {"FINISHED"}, statuses
