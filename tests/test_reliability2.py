"""Reliability, second round: the code that produced each task, duplicate keys, one run of a key at a
time across processes, heartbeats from the future, bounded sizes, report inputs, write failures,
and one-line errors of the tuned-settings files and `dmkd synth`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli.dmkd import main
from harness.core.errors import UserError
from tests.conftest import needs_fmnist

REPO = Path(__file__).resolve().parent.parent
CAPS = ["--set", "max_train_per_task=100", "--set", "max_test_per_task=50"]
FT = ["run", "--method", "ft", "--scenario", "split-fmnist"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=env or _env(), cwd=cwd, check=False, timeout=timeout)


def _records(results: Path, experiment: str = "adhoc") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / experiment / "runs").glob("*.json"))]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.startswith("error:")]


def _one_error(capsys, argv: list[str], expect: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert code == 2, (argv, err)
    assert len(lines) == 1 and expect in lines[0], err
    assert "Traceback" not in err and "—" in lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The code that produced each task
# ---------------------------------------------------------------------------------------------
def _copy_code(dst: Path) -> Path:
    """A copy of the packages outside git: its code state is the digest of its sources."""
    for pkg in ("harness", "methods", "scenarios", "reports"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_code_state_names_the_git_revision_and_a_dirty_tree(tmp_path):
    from harness.engine.codestate import read_code_state

    root = tmp_path / "repo"
    (root / "methods").mkdir(parents=True)
    (root / "methods" / "m.py").write_text("LOSS = 1\n")
    outside = read_code_state(root)
    assert outside.git == "" and not outside.dirty and "no git" in outside.describe()
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    clean = read_code_state(root)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert clean.git == head[:12] and not clean.dirty and clean.digest == outside.digest
    (root / "README.md").write_text("docs only\n")  # not code: neither dirty nor another digest
    assert read_code_state(root) == clean
    (root / "methods" / "m.py").write_text("LOSS = 2\n")
    edited = read_code_state(root)
    assert edited.dirty and edited.git == clean.git and edited.digest != clean.digest
    assert "+dirty" in edited.describe()
    (root / "methods" / "new.py").write_text("")  # an untracked new module is code too
    (root / "methods" / "m.py").write_text("LOSS = 1\n")
    assert read_code_state(root).dirty and read_code_state(root).digest != clean.digest


@needs_fmnist
def test_a_resume_under_other_code_is_refused_or_restarted_or_resumed_with_the_mix_recorded(tmp_path):
    code = _copy_code(tmp_path / "code")
    res = tmp_path / "res"
    env = _env(PYTHONPATH=str(code))
    base = [*FT, "--results", str(res), "--tracking-uri", "none", *CAPS]
    for seed in ("0", "1"):  # two runs killed after task 1 by the old code
        killed = _cli(*base, "--seed", seed, env=dict(env, DMKD_TEST_KILL_AFTER_TASK="1"), cwd=code)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    old = {r["seed"]: r for r in _records(res)}
    assert {r["status"] for r in old.values()} == {"running"}
    (old_code,) = {p["code"] for r in old.values() for p in r["per_task"]}
    with open(code / "methods" / "ft.py", "a") as f:  # the code changes (a git pull, an edited loss)
        f.write("\n# changed\n")
    checkpoints = sorted((res / "adhoc" / "checkpoints").glob("*.pt"))
    before = {p: p.read_bytes() for p in checkpoints}

    # 1. Refused, in one line that offers both choices; nothing recorded changes.
    refused = _cli(*base, "--seed", "0", env=env, cwd=code)
    lines = _error_lines(refused.stderr)
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "written by other code" in lines[0] and "--on-code-change restart" in lines[0]
    assert "--on-code-change resume" in lines[0] and "Traceback" not in refused.stderr
    assert {p: p.read_bytes() for p in checkpoints} == before
    assert {r["seed"]: r for r in _records(res)}[0] == old[0]

    # 2. Resumed with the mix recorded: tasks 0-1 by the old code, 2-4 by the new, and the table says so.
    resumed = _cli(*base, "--seed", "0", "--on-code-change", "resume", env=env, cwd=code)
    assert resumed.returncode == 0, resumed.stderr
    assert "written by other code" in resumed.stderr and "‡" in resumed.stdout
    rec0 = {r["seed"]: r for r in _records(res)}[0]
    codes = [p["code"] for p in rec0["per_task"]]
    assert rec0["status"] == "finished" and rec0["resumed_from_task"] == 2
    assert codes[:2] == [old_code] * 2 and len(set(codes[2:])) == 1 and codes[2] != old_code
    assert set(rec0["code"]) == {old_code, codes[2]} and "no git" in rec0["code"][codes[2]]

    # 3. Restarted from task 0 under the new code, and said so.
    restarted = _cli(*base, "--seed", "1", "--on-code-change", "restart", env=env, cwd=code)
    assert restarted.returncode == 0, restarted.stderr
    assert "restarting from task 0" in restarted.stderr and "‡" not in restarted.stdout
    rec1 = {r["seed"]: r for r in _records(res)}[1]
    assert rec1["status"] == "finished" and "resumed_from_task" not in rec1
    assert {p["code"] for p in rec1["per_task"]} == {codes[2]}
    assert not list((res / "adhoc" / "checkpoints").glob("*.pt"))

    # The report never averages the mixed row silently: its row is marked, a single-code row is not.
    from reports.build import make_report

    md = make_report([rec0, rec1], tmp_path / "rep", figures=False)["markdown"].read_text()
    assert "ft ‡ (2 code versions)" in md and "‡ marks a row whose tasks ran under different code" in md
    md1 = make_report([rec1], tmp_path / "rep1", figures=False)["markdown"].read_text()
    assert "| ft |" in md1 and "code versions)" not in md1


# ---------------------------------------------------------------------------------------------
# Duplicate keys in every file the project reads
# ---------------------------------------------------------------------------------------------
DUPLICATES = [
    ("methods: [ft]\nseeds: [0]\nmethods: [ewc]\n", "'methods' appears twice", "lines 1 and 3"),
    ("seeds: [0]\nname: x\nseeds: [1]\n", "'seeds' appears twice", "lines 1 and 3"),
    ("protocol: {lr: 0.1, epochs: 1, lr: 0.2}\n", "'lr' appears twice", "lines 1 and 1"),
    ("methods:\n  - name: er\n    set:\n      buffer_size: 10\n      buffer_size: 20\n", "'buffer_size' appears twice",
     "lines 4 and 5"),
    ("a:\n  b:\n    c: {d: 1, d: 1}\n", "'d' appears twice", "lines 3 and 3"),  # equal values too
]


@pytest.mark.parametrize("text,expect,lines", DUPLICATES, ids=[d[1] for d in DUPLICATES])
def test_duplicate_yaml_keys_are_refused_at_every_level(text, expect, lines):
    from harness.core.yamlio import load_yaml_text

    with pytest.raises(UserError) as e:
        load_yaml_text(text, "f.yaml")
    assert expect in e.value.line() and lines in e.value.line()


def test_distinct_keys_still_load():
    from harness.core.yamlio import load_yaml_text

    assert load_yaml_text("a: 1\nb: {a: 1}\nc: [{a: 1}, {a: 2}]\n", "f") == {"a": 1, "b": {"a": 1},
                                                                             "c": [{"a": 1}, {"a": 2}]}


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


def test_a_suite_with_a_key_twice_exits_2_before_anything_runs(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    res = tmp_path / "res"
    for text in (SUITE + "methods:\n  - ewc\n", SUITE.replace("seeds: [0]", "seeds: [0]\nseeds: [1]")):
        f.write_text(text)
        _one_error(capsys, ["suite", str(f), "--results", str(res), "--tracking-uri", "none", "--no-report"],
                   "appears twice")
        assert not (res / "tiny").exists()


def test_an_ablation_file_with_a_key_twice_is_refused(tmp_path):
    from harness.orchestration.tune import load_ablation

    f = tmp_path / "abl.yaml"
    f.write_text("method: dmkd\ngrid: {kd: [none, logits], kd: [none]}\nseeds: 2\n")
    with pytest.raises(UserError, match="'kd' appears twice"):
        load_ablation(f)


def _tuned_suite(tmp_path: Path, entry: str) -> Path:
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE)
    d = tmp_path / "tuned" / "tiny"
    d.mkdir(parents=True)
    (d / "split-fmnist.yaml").write_text(
        "scenario_options: {max_train_per_task: 100, max_test_per_task: 50}\n"
        "protocol: {epochs: 1, batch_size: 64}\nentries:\n  ft:\n    method: ft\n    fixed: {}\n" + entry)
    return suite


@pytest.mark.parametrize("entry,expect", [
    ("    params: {protocol.lr: 0.1}\n    params: {protocol.lr: 0.5}\n", "'params' appears twice"),
    ("    params: {protocol.lr: 0.1}\n    provenance: {trials: abc}\n", "provenance.trials must be a whole number"),
    ("    params: {protocol.lr: 0.1}\n    provenance: {trials: -3}\n", "provenance.trials must be a whole number"),
    ("    params: {protocol.lr: 0.1}\n    provenance: {trials: 2.5}\n", "provenance.trials must be a whole number"),
], ids=["duplicate", "abc", "negative", "fraction"])
def test_bad_tuned_settings_files_are_one_line(tmp_path, capsys, entry, expect):
    suite = _tuned_suite(tmp_path, entry)
    res = tmp_path / "res"
    _one_error(capsys, ["suite", str(suite), "--results", str(res), "--tracking-uri", "none", "--no-report"], expect)
    assert not (res / "tiny").exists()


def test_tuned_trials_that_are_whole_numbers_load(tmp_path):
    from harness.orchestration.suite import load_suite
    from harness.orchestration.tuned import load_tuned_suite, tuned_dir

    suite = _tuned_suite(tmp_path, "    params: {protocol.lr: 0.1}\n    provenance: {trials: 20.0}\n")
    cfg = load_suite(suite)
    assert load_tuned_suite(cfg, tuned_dir(cfg))[("ft", "split-fmnist")]["n_trials"] == 20


def test_best_params_json_with_a_key_twice_or_bad_trials_is_refused(tmp_path):
    from harness.orchestration.suite import load_suite
    from harness.orchestration.tuned import load_best_params

    cfg = load_suite(_tuned_suite(tmp_path, "    params: {}\n"))
    (tmp_path / "tuned" / "ft__split-fmnist.json").write_text('{"params": {"lr": 0.1}, "params": {"lr": 0.5}}')
    with pytest.raises(UserError, match="'params' appears twice"):
        load_best_params(tmp_path, cfg)
    (tmp_path / "tuned" / "ft__split-fmnist.json").write_text('{"params": {"lr": 0.1}, "n_trials": "abc"}')
    with pytest.raises(UserError, match="n_trials must be a whole number"):
        load_best_params(tmp_path, cfg)


# ---------------------------------------------------------------------------------------------
# One process per run key, whoever starts it
# ---------------------------------------------------------------------------------------------
def _wait_for(cond, what: str, timeout: float = 300.0, procs=()) -> None:
    import time

    end = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a process ended while waiting for {what}: {p.communicate()}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def _start(args: list[str], env: dict[str, str], err: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=err.open("w"))


@needs_fmnist
@pytest.mark.parametrize("holder_ends", ["finishes", "is killed"])
def test_two_runs_of_one_key_at_once_train_it_once(tmp_path, holder_ends):
    res, gate = tmp_path / "res", tmp_path / "go"
    args = [*FT, "--results", str(res), "--tracking-uri", "none", *CAPS]
    a = _start(args, _env(DMKD_TEST_HOLD_AFTER_TASK=f"0:{gate}"), tmp_path / "a.err")
    _wait_for(lambda: any(len(r["per_task"]) == 1 for r in _records(res)) if (res / "adhoc" / "runs").is_dir()
              else False, "the first run's task 0", procs=[a])
    b = _start(args, _env(), tmp_path / "b.err")
    _wait_for(lambda: "running in another process" in (tmp_path / "b.err").read_text(), "the second run to wait",
              procs=[b])
    if holder_ends == "finishes":
        gate.touch()
        assert a.wait(timeout=300) == 0, (tmp_path / "a.err").read_text()
    else:
        a.kill()
        a.wait(timeout=60)
    b.communicate(timeout=300)
    b_err = (tmp_path / "b.err").read_text()
    assert b.returncode == 0 and "Traceback" not in b_err + (tmp_path / "a.err").read_text(), b_err
    (rec,) = _records(res)
    assert rec["status"] == "finished" and [p["task"] for p in rec["per_task"]] == [0, 1, 2, 3, 4]
    if holder_ends == "finishes":  # the second comer reused the first one's record, trained nothing
        assert "already run to the end" in b_err and "resumed_from_task" not in rec
    else:  # the holder died: the waiter took the key over from its checkpoint after task 0
        assert rec["resumed_from_task"] == 1
    assert not list((res / "adhoc" / "checkpoints").glob("*"))  # no stale checkpoint beside the record


@needs_fmnist
def test_two_suites_sharing_a_cell_run_it_once_and_both_finish(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    res, gate, journal = tmp_path / "res", tmp_path / "go", tmp_path / "optuna.log"
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(SUITE.replace("name: tiny", "name: one"))
    two.write_text(SUITE.replace("name: tiny", "name: two").replace("  - ft\n", "  - ft\n  - ewc\n"))
    common = ["--results", str(res), "--storage", f"journal:{journal}", "--tracking-uri", "none", "--no-report"]
    a = _start(["suite", str(one), *common], _env(DMKD_TEST_HOLD_AFTER_TASK=f"0:{gate}"), tmp_path / "a.err")
    _wait_for(lambda: (res / "tiny" / "runs").is_dir() and len(_records(res, "tiny")) == 1, "suite one's ft cell",
              procs=[a])
    b = _start(["suite", str(two), *common], _env(), tmp_path / "b.err")
    _wait_for(lambda: "running in another process" in (tmp_path / "b.err").read_text(), "suite two to wait",
              procs=[b])
    gate.touch()
    assert a.wait(timeout=300) == 0, (tmp_path / "a.err").read_text()
    b.communicate(timeout=600)
    errs = (tmp_path / "a.err").read_text() + (tmp_path / "b.err").read_text()
    assert b.returncode == 0 and "Traceback" not in errs, errs
    recs = {r["method"]: r for r in _records(res, "tiny")}
    assert set(recs) == {"ft", "ewc"} and all(r["status"] == "finished" for r in recs.values())
    assert recs["ft"]["suite"] == "one" and "resumed_from_task" not in recs["ft"]  # trained once, by suite one
    # Neither study is left half-done: every cell's trial completed, none failed or waiting.
    storage = JournalStorage(JournalFileBackend(str(journal)))
    for s in optuna.get_all_study_summaries(storage):
        states = [t.state for t in optuna.load_study(study_name=s.study_name, storage=storage).trials]
        assert states and all(st == TrialState.COMPLETE for st in states), (s.study_name, states)


# ---------------------------------------------------------------------------------------------
# Write failures: one line, exit 2, nothing recorded lost or marked finished
# ---------------------------------------------------------------------------------------------
def _mount_tmpfs(where: Path, options: str) -> bool:
    """A small tmpfs (root only); False where it cannot be mounted."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          check=False).returncode == 0


@needs_fmnist
def test_a_full_disk_under_torch_save_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """torch.save reports a full disk as RuntimeError, not OSError; simulated at the write."""
    import torch

    res = tmp_path / "res"
    real_save, calls = torch.save, []

    def full_on_second(obj, f, *a, **k):
        calls.append(f)
        if len(calls) >= 2:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . basic_ios::clear: iostream error")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_on_second)
    line = _one_error(capsys, [*FT, "--results", str(res), "--tracking-uri", "none", *CAPS], "failed (RuntimeError")
    assert "stays 'running'" in line
    (rec,) = _records(res)
    assert rec["status"] == "running" and len(rec["per_task"]) == 1  # as written after task 0
    (ck,) = (res / "adhoc" / "checkpoints").glob("*")  # the checkpoint after task 0, no temporary file
    assert ck.suffix == ".pt" and torch.load(ck, weights_only=True)["state"]["next_task"] == 1
    monkeypatch.undo()
    assert main([*FT, "--results", str(res), "--tracking-uri", "none", *CAPS]) == 0
    (rec,) = _records(res)
    assert rec["status"] == "finished" and rec["resumed_from_task"] == 1


@needs_fmnist
def test_a_real_3mb_filesystem_is_one_line_exit_2_then_resumes(tmp_path):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "size=3m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        res = small / "res"
        args = [*FT, "--results", str(res), "--tracking-uri", "none", *CAPS]
        full = _cli(*args)
        lines = _error_lines(full.stderr)
        assert full.returncode == 2 and len(lines) == 1 and "Traceback" not in full.stderr, full.stderr
        (rec,) = _records(res)
        written = len(rec["per_task"])
        assert rec["status"] == "running" and 1 <= written < 5
        assert not [p for p in (res / "adhoc").rglob("*") if "tmp" in p.name]  # no temporary file left
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        again = _cli(*args)
        assert again.returncode == 0, again.stderr
        (rec,) = _records(res)
        assert rec["status"] == "finished" and rec["resumed_from_task"] == written
    finally:
        subprocess.run(["umount", str(small)], check=False)


# ---------------------------------------------------------------------------------------------
# dmkd synth
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["0", "-1", "nan", "2"])
def test_synth_scale_out_of_range_exits_2(tmp_path, capsys, scale):
    _one_error(capsys, ["synth", "cifar10", "--out", str(tmp_path / "d"), "--scale", scale], "--scale must be in")
    assert not (tmp_path / "d").exists()


def test_synth_onto_a_file_or_a_read_only_folder_exits_2(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    _one_error(capsys, ["synth", "cifar10", "--out", str(f), "--scale", "0.001"], "is a file, not a folder")
    _one_error(capsys, ["synth", "cifar10", "--out", str(f / "sub"), "--scale", "0.001"], "cannot write")
    assert f.read_text() == "keep"
    ro = tmp_path / "ro"
    if _mount_tmpfs(ro, "size=1m,ro"):
        try:
            _one_error(capsys, ["synth", "cifar10", "--out", str(ro), "--scale", "0.001"], "Read-only file system")
            _one_error(capsys, ["synth", "cifar10", "--out", str(ro / "x"), "--scale", "0.001"], "cannot write")
        finally:
            subprocess.run(["umount", str(ro)], check=False)
    elif os.geteuid() != 0:  # without root, permissions make a folder read-only
        ro.mkdir()
        ro.chmod(0o555)
        _one_error(capsys, ["synth", "cifar10", "--out", str(ro), "--scale", "0.001"], "cannot write")


# ---------------------------------------------------------------------------------------------
# Heartbeats judged by the reader's clock
# ---------------------------------------------------------------------------------------------
def _shift_heartbeat(db: Path, tid: int, delta_s: float) -> None:
    """Move a trial's stored heartbeat date as a writer with a skewed clock would have written it."""
    import datetime as dt
    import sqlite3

    con = sqlite3.connect(db)
    try:
        (value,) = con.execute("select heartbeat from trial_heartbeats where trial_id = ?", (tid,)).fetchone()
        moved = dt.datetime.fromisoformat(value) + dt.timedelta(seconds=delta_s)
        con.execute("update trial_heartbeats set heartbeat = ? where trial_id = ?", (str(moved), tid))
        con.commit()
    finally:
        con.close()


WORKER = """
import sys, time, warnings
warnings.simplefilter("ignore")
import optuna
from pathlib import Path
from harness.orchestration.storage import make_storage
st = make_storage(sys.argv[1], Path(sys.argv[2]), heartbeat_interval=1, grace_period=2)
trial = optuna.load_study(study_name="s", storage=st).ask()
print(trial._trial_id, flush=True)
while True:
    st.record_heartbeat(trial._trial_id)
    time.sleep(0.3)
"""


def test_a_dead_workers_heartbeat_dated_in_the_future_is_taken_over(tmp_path):
    import time
    import warnings

    import optuna
    from optuna.trial import TrialState

    from harness.orchestration.storage import make_storage

    warnings.simplefilter("ignore")
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    reader = make_storage(url, tmp_path, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=reader)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, url, str(tmp_path)], env=_env(), text=True,
                              stdout=subprocess.PIPE)
    tid = int(worker.stdout.readline())
    time.sleep(1.0)
    assert reader._get_stale_trial_ids(study._study_id) == []  # alive
    worker.kill()  # kill -9
    worker.wait()
    _shift_heartbeat(db, tid, 3600)  # its clock ran an hour ahead (or the reader's stepped back)
    end = time.monotonic() + 30
    while study.trials[0].state == TrialState.RUNNING:
        assert time.monotonic() < end, "a dead worker with a heartbeat from the future was never taken over"
        optuna.storages.fail_stale_trials(study)
        time.sleep(0.5)
    assert study.trials[0].state == TrialState.FAIL


def test_a_live_worker_with_a_clock_behind_is_not_taken_for_dead(tmp_path):
    import time
    import warnings

    import optuna
    from optuna.trial import TrialState

    from harness.orchestration.storage import make_storage

    warnings.simplefilter("ignore")
    db = tmp_path / "optuna.db"
    st = make_storage(f"sqlite:///{db}", tmp_path, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=st)
    tid = study.ask()._trial_id
    end = time.monotonic() + 5  # 2.5 grace periods of beats, each written by a clock an hour behind
    while time.monotonic() < end:
        st.record_heartbeat(tid)
        _shift_heartbeat(db, tid, -3600)
        assert st._get_stale_trial_ids(study._study_id) == []
        time.sleep(0.5)
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.RUNNING


# ---------------------------------------------------------------------------------------------
# Sizes bounded by the data and the machine, checked before training
# ---------------------------------------------------------------------------------------------
@needs_fmnist
def test_a_replay_buffer_larger_than_the_stream_allocates_only_the_stream():
    """A reservoir of M >= N slots fed N samples is the same reservoir as one of N slots: the same
    numbers, and an allocation bounded by the stream (1e12 slots used to allocate 3.1 PB)."""
    from harness.engine.runner import RunSpec, run

    small = {"max_train_per_task": 100, "max_test_per_task": 50}  # 5 tasks x 90 training samples
    exact = run(RunSpec("er", "split-fmnist", 0, {"buffer_size": 450}, dict(small)))
    huge = run(RunSpec("er", "split-fmnist", 0, {"buffer_size": 10**12}, dict(small)))
    assert huge["acc"] == exact["acc"] and huge["costs"]["buffer_samples"] == 10**12
    assert huge["costs"]["method_state_bytes"] == exact["costs"]["method_state_bytes"] < 450 * (784 * 4 + 8) * 1.1


@needs_fmnist
def test_allocations_beyond_the_machine_or_the_data_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from harness.core import memory

    res = tmp_path / "res"
    base = ["run", "--scenario", "split-fmnist", "--results", str(res), "--tracking-uri", "none", *CAPS]
    _one_error(capsys, [*base, "--method", "fedavg", "--set", "n_nodes=100000"],
               "n_nodes=100000 is more nodes than the 90 training samples")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)  # a machine with 1 MiB free
    _one_error(capsys, [*base, "--method", "fedavg", "--set", "n_nodes=80"], "GiB on cpu")
    _one_error(capsys, [*base, "--method", "er", "--set", "buffer_size=1000000000000"], "er's replay buffer")
    assert not list(res.rglob("*.json")) and not list(res.rglob("*.pt"))  # nothing recorded


# ---------------------------------------------------------------------------------------------
# Report inputs: bounded labels, progress, no live links
# ---------------------------------------------------------------------------------------------
def _write_records(res: Path, recs: list[dict]) -> None:
    runs = res / "e" / "runs"
    runs.mkdir(parents=True)
    for i, r in enumerate(recs):
        (runs / f"r{i}.json").write_text(json.dumps(r))


def test_a_suite_label_longer_than_the_bound_is_one_line(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(SUITE.replace("  - ft\n", "  - {name: ft, label: " + "x" * 20_000 + "}\n"))
    _one_error(capsys, ["suite", str(f), "--results", str(tmp_path / "res"), "--tracking-uri", "none", "--no-report"],
               "20,000 characters long; a label is at most 100")


def test_report_bounds_old_long_labels_escapes_links_and_shows_progress(tmp_path, capsys, monkeypatch):
    from reports import load
    from reports.build import report_from_results
    from tests.test_reports import fake_record

    long_a, long_b = "a" * 20_000 + "1", "a" * 20_000 + "2"  # records written before labels were bounded
    link = "[click](javascript:alert(1))"
    _write_records(tmp_path, [fake_record(lbl, s, 0.5 + 0.01 * s) for lbl in (long_a, long_b, link)
                              for s in (0, 1)])
    monkeypatch.setattr(load, "PROGRESS_FROM", 1)
    md = report_from_results(tmp_path, "e", out=tmp_path / "rep")["markdown"].read_text()
    err = capsys.readouterr().err
    assert "report: reading records" in err and "report: 6 records; building the tables" in err
    rows = [line for line in md.splitlines() if line.startswith(("| 1 ", "| 2 "))]
    labels = {line.split(" | ")[1] for line in rows}
    assert len(labels) == 3 and max(len(lbl) for lbl in labels) < 120  # two long rows stay two, each bounded
    assert "[click](javascript" not in md and "[click]\\(javascript:alert(1))" in md
