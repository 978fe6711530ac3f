"""Bad input: one clear line, exit status 2, no traceback, recorded results untouched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli.dmkd import main
from tests.conftest import needs_fmnist

REPO = Path(__file__).resolve().parent.parent
CAPS = ["--set", "max_train_per_task=100", "--set", "max_test_per_task=50"]


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if not line.startswith(("warning", "  ")) and "%|" not in line]


def _one_error(capsys, argv, expect):
    code, lines = _run(capsys, *argv)
    assert code == 2, (argv, lines)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], lines
    assert not any("Traceback" in line for line in lines)
    assert "—" in errors[0]  # the line names a fix


@pytest.fixture
def recorded(tmp_path, capsys):
    """A results folder with one finished run; every bad command below must leave it as it is."""
    res = tmp_path / "res"
    if _fm():
        assert main(["run", "--method", "ft", "--scenario", "split-fmnist", "--results", str(res),
                     "--tracking-uri", "none", *CAPS]) == 0
    capsys.readouterr()
    snapshot = {p: p.read_bytes() for p in res.rglob("*") if p.is_file()}
    yield res
    assert {p: p.read_bytes() for p in res.rglob("*") if p.is_file()} == snapshot


def _fm():
    from scenarios.fmnist import find_fmnist

    return find_fmnist(None) is not None


BAD_ARGS = [
    (["run", "--method", "nosuch", "--scenario", "split-fmnist"], "unknown method"),
    (["run", "--method", "ft", "--scenario", "nosuch"], "unknown scenario"),
    (["run", "--method", "ft", "--scenario", "split-fmnist", "--set", "backbone=nosuch"], "unknown backbone"),
    (["run", "--method", "ft", "--scenario", "split-fmnist", "--set", "bogus=1"], "unknown option"),
    (["run", "--method", "ft", "--scenario", "split-fmnist", "--set", "lr=-0.1"], "lr must be"),
    (["run", "--method", "ft", "--scenario", "split-fmnist", "--set", "lr=abc"], "not a valid float"),
    (["run", "--method", "ft", "--scenario", "split-fmnist", "--set", "noequals"], "not key=value"),
    (["run", "--method", "ft", "--scenario", "split-fmnist", "--epochs", "0"], "epochs must be"),
    (["run", "--method", "er", "--scenario", "split-fmnist", "--set", "buffer_size=-5"], "buffer_size"),
    (["run", "--method", "ewc", "--scenario", "split-fmnist", "--set", "mode=sideways"], "mode"),
    (["run", "--method", "ft", "--scenario", "split-fmnist", "--device", "cuda:0"], "cuda"),
    (["run", "--method", "ft", "--scenario", "split-fmnist", "--seed", "x"], "invalid int value"),
    (["tune", "--method", "ft", "--scenario", "split-fmnist", "--trials", "0"], "trials"),
    (["tune", "--method", "ft", "--scenario", "split-fmnist", "--seeds", "a,b"], "--seeds"),
]


@pytest.mark.parametrize("argv,expect", BAD_ARGS, ids=[b[1] for b in BAD_ARGS])
def test_bad_arguments(capsys, recorded, argv, expect):
    if expect == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    if argv[0] == "run" or argv[0] == "tune":
        argv = argv + ["--results", str(recorded)]
    if expect == "invalid int value":
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and expect in err[0]
        return
    _one_error(capsys, argv, expect)


def test_k_greater_than_n_is_rejected(capsys, recorded):
    import methods  # noqa: F401
    from harness.core.method import METHODS

    if "dmkd" not in METHODS:
        pytest.skip("dmkd not available")
    _one_error(capsys, ["run", "--method", "dmkd", "--scenario", "split-fmnist", "--set", "n_experts=2",
                        "--set", "top_k=3", "--results", str(recorded)], "top_k")
    _one_error(capsys, ["run", "--method", "dmkd", "--scenario", "split-fmnist", "--set", "kd=sideways",
                        "--results", str(recorded)], "kd")


def test_bad_suite_files(capsys, recorded, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [ft\nscenarios: x")
    _one_error(capsys, ["suite", str(bad), "--results", str(recorded)], "not valid YAML")
    bad.write_text("methods: [ft]\nscenarios: [split-fmnist]\nprotocol: {batch_size: -3}\n")
    _one_error(capsys, ["suite", str(bad), "--results", str(recorded)], "batch_size")
    bad.write_text("methods: [{name: ewc, set: {ewc_lambda: lots}}]\nscenarios: [split-fmnist]\n")
    _one_error(capsys, ["suite", str(bad), "--results", str(recorded)], "ewc_lambda")
    _one_error(capsys, ["suite", str(tmp_path / "missing.yaml"), "--results", str(recorded)], "not found")


def test_data_root_problems(capsys, recorded, tmp_path):
    _one_error(capsys, ["run", "--method", "ft", "--scenario", "split-fmnist", "--data-root",
                        str(tmp_path / "nowhere"), "--results", str(recorded)], "does not exist")
    f = tmp_path / "afile"
    f.write_text("x")
    _one_error(capsys, ["run", "--method", "ft", "--scenario", "split-fmnist", "--data-root", str(f),
                        "--results", str(recorded)], "not a folder")
    corrupt = tmp_path / "fm"
    corrupt.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (corrupt / name).write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")  # header promises more
    _one_error(capsys, ["run", "--method", "ft", "--scenario", "split-fmnist", "--data-root", str(corrupt),
                        "--results", str(recorded)], "truncated")
    _one_error(capsys, ["run", "--method", "ft", "--scenario", "split-cifar10", "--data-root", str(tmp_path),
                        "--results", str(recorded)], "CIFAR")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        _one_error(capsys, ["run", "--method", "ft", "--scenario", "split-fmnist", "--data-root", str(locked),
                            "--results", str(recorded)], "not readable")


def test_unwritable_results_folder(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_error(capsys, ["run", "--method", "ft", "--scenario", "split-fmnist", "--results",
                        str(blocker / "res")], "not writable")


@needs_fmnist
def test_unreachable_tracking_server_falls_back_to_json(capsys, tmp_path):
    code = main(["run", "--method", "ft", "--scenario", "split-fmnist", "--results", str(tmp_path / "res"),
                 "--tracking-uri", "http://127.0.0.1:9", *CAPS])
    err = capsys.readouterr().err
    assert code == 0
    assert "MLflow tracking at http://127.0.0.1:9 failed" in err
    recs = list((tmp_path / "res" / "adhoc" / "runs").glob("*.json"))
    assert len(recs) == 1 and json.loads(recs[0].read_text())["status"] == "finished"


def test_a_real_process_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "harness.cli", "run", "--method", "nosuch", "--scenario", "split-fmnist",
            "--results", str(tmp_path)]
    p = subprocess.run(args, check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: unknown method 'nosuch'")
    p = subprocess.run(args + ["--debug"], check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode != 0 and "Traceback" in p.stderr
