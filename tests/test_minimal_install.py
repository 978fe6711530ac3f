"""`dmkd run --tracking-uri none` and a suite worker on a minimal install (the GPU machine's image):
mlflow, optuna, pandas and codecarbon made unimportable in a subprocess, which must still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from scenarios.synth import generate

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("mlflow", "optuna", "pandas", "codecarbon")


def _env(tmp_path: Path) -> dict[str, str]:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in BLOCKED))  # import -> ImportError
    return {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}


def test_run_and_suite_without_tracking_tuning_reporting_or_energy_packages(tmp_path):
    data, res = tmp_path / "data", tmp_path / "results"
    generate("cifar10", data, scale=0.002)
    env = _env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import pandas"], check=False, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "halted" in probe.stderr  # the shim is in force
    common = ["--data-root", str(data), "--tracking-uri", "none", "--results", str(res), "--device", "cpu"]
    sets = ["--set", "backbone=mlp", "--set", "max_train_per_task=20", "--set", "max_test_per_task=8"]
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--method", "er", "--scenario",
                          "split-cifar10", "--set", "precision=bf16", *sets, *common],
                         check=False, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "setting=class_il" in out.stdout and "status=finished" in out.stdout
    rec = json.loads(next((res / "adhoc" / "runs").glob("*.json")).read_text())
    assert rec["status"] == "finished" and rec["costs"]["energy_kwh"] is None
    assert rec["costs"]["energy_kind"].startswith("unavailable") and rec["synthetic_data"] is True

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nexperiment: s\nseeds: [0]\nprotocol: {epochs: 1, backbone: mlp}\n"
                     "scenarios: [{name: split-cifar10, options: {max_train_per_task: 20, max_test_per_task: 8}}]\n"
                     "methods: [ft]\n")
    out = subprocess.run([sys.executable, "-m", "harness.cli", "suite", str(suite), "--no-report", *common],
                         check=False, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(next((res / "s" / "runs").glob("*.json")).read_text())["status"] == "finished"
