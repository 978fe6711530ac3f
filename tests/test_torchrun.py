"""The `dmkd run` command under torchrun: rank 0's record holds system totals like in-process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness.engine.runner import RunSpec, run
from tests.conftest import needs_fmnist

REPO = Path(__file__).resolve().parent.parent
SETS = {"n_nodes": 2, "rounds": 1}
CAPS = {"max_train_per_task": 200, "max_test_per_task": 60}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_fmnist
def test_torchrun_record_matches_in_process_totals(tmp_path):
    pytest.importorskip("torch.distributed.run")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), "-m", "harness.cli", "run", "--method", "fedavg", "--scenario", "split-fmnist",
            "--nodes-backend", "distributed", "--results", str(tmp_path), "--tracking-uri", "none"]
    for k, v in {**SETS, **CAPS}.items():
        args += ["--set", f"{k}={v}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = list((tmp_path / "adhoc" / "runs").glob("*.json"))
    assert len(recs) == 1  # only rank 0 records
    dist_rec = json.loads(recs[0].read_text())
    local = run(RunSpec("fedavg", "split-fmnist", 0, method_set={**SETS, "backend": "inprocess"}, scenario_set=CAPS))
    assert dist_rec["ranks"] == 2
    assert dist_rec["acc"] == local["acc"]
    for key in ("train_samples", "comm_bytes", "comm_rounds"):
        assert dist_rec["costs"][key] == local["costs"][key], key
    assert dist_rec["costs"]["train_flops_total"] == pytest.approx(local["costs"]["train_flops_total"], rel=1e-9)
