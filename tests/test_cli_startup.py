"""The command line answers without the heavy libraries: help and argument errors import no torch,
MLflow, Optuna, torchvision, scipy or pandas; `dmkd list` needs torch (the methods and scenarios are
defined with it) but none of the others. Checked in a fresh interpreter, through ``sys.modules``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "mlflow", "optuna", "scipy", "pandas", "matplotlib", "sqlalchemy")
COMMANDS = ("list", "run", "suite", "report", "tune", "tune-suite", "synth", "ablate")

# Runs each argv through the real entry point in one interpreter, then prints, on its last line, each
# argv's exit status and which heavy modules the interpreter had loaded by then.
_PROBE = """
import json, sys
from harness.cli.dmkd import main
HEAVY = {heavy!r}
out = []
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out.append(code)
print("PROBE " + json.dumps({{"codes": out, "loaded": [m for m in HEAVY if m in sys.modules]}}))
"""


def _probe(argvs: list[list[str]], cwd: Path) -> tuple[list[int], list[str], str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), json.dumps(argvs)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("PROBE "), proc.stdout[-2000:]
    got = json.loads(last[len("PROBE "):])
    return got["codes"], got["loaded"], proc.stdout, proc.stderr


def test_help_of_every_command_imports_no_heavy_library(tmp_path):
    codes, loaded, out, _ = _probe([["--help"], *[[c, "--help"] for c in COMMANDS]], tmp_path)
    assert codes == [0] * (1 + len(COMMANDS))
    assert loaded == [], f"--help imported {loaded}"
    assert out.count("usage: dmkd") == 1 + len(COMMANDS)
    # the suite's coordination defaults are shown without importing the suite
    assert "(default 10)" in out and "(default 60)" in out


def test_argument_errors_import_no_heavy_library(tmp_path):
    bad = [[], ["nosuch"], ["run"], ["run", "--method", "ft"], ["run", "--method", "ft", "--scenario", "x",
           "--seed", "abc"], ["suite"], ["tune", "--method", "ft", "--scenario", "x", "--pruner", "nosuch"],
           ["suite", "s.yaml", "--launcher", "nosuch"], ["report", "--nosuch"]]
    codes, loaded, _, err = _probe(bad, tmp_path)
    assert codes == [2] * len(bad)
    assert loaded == [], f"an argument error imported {loaded}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == len(bad) and all(line.startswith("error: ") for line in lines), lines


def test_list_imports_torch_but_no_other_heavy_library(tmp_path):
    codes, loaded, out, _ = _probe([["list"]], tmp_path)
    assert codes == [0]
    assert loaded == ["torch"], f"dmkd list imported {loaded}"
    for name in ("methods:", "ewc", "dimat", "scenarios:", "split-cifar10", "split-fmnist", "backbones:"):
        assert name in out
