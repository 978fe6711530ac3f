"""Reliability, second round: the code that produced each task, duplicate keys, one run of a key at a
time across processes, heartbeats from the future, bounded sizes, report inputs, write failures,
and one-line errors of the tuned-settings files and `dmkd synth`."""

from __future__ import annotations

import json
import os
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
