"""The architecture contract ([tool.importlinter] in pyproject.toml) holds on the tree and fails on an
upward import: lint-imports runs on a copy of the packages, clean and with one injected import."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "methods", "scenarios", "reports")
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH=root first: the copy, not the editable install, is the package that is analysed.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": str(root)}
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def _verdicts(stdout: str) -> dict[str, str]:
    """Contract name -> KEPT | BROKEN, from lint-imports' summary (whose lines it wraps at 80 columns)."""
    text = re.sub(r"\s+", " ", stdout)
    names = [c["name"] for c in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]]
    out = {}
    for name in names:
        m = re.search(re.escape(re.sub(r"\s+", " ", name)) + r" (KEPT|BROKEN)", text)
        assert m, f"contract {name!r} missing from the output:\n{stdout[-3000:]}"
        out[name] = m[1]
    return out


def _inject(root: Path, module: str, line: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402,F401\n")


def test_contract_holds_on_the_unmodified_tree(tmp_path):
    out = _lint(_copy(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    verdicts = _verdicts(out.stdout)
    assert len(verdicts) >= 5 and set(verdicts.values()) == {"KEPT"}, verdicts


@pytest.mark.parametrize(("module", "line", "contract", "edge"), [
    # the core reaching up into the engine (also a chain core -> engine -> core: a cycle)
    ("harness.core.errors", "import harness.engine.runner", "Harness layers",
     "harness.core.errors -> harness.engine.runner"),
    # the engine reaching up into orchestration, as a function-level import
    ("harness.engine.metrics", "def _f():\n    from harness.orchestration import suite", "Harness layers",
     "harness.engine.metrics -> harness.orchestration.suite"),
    # inside orchestration: the suite importing the launcher above it
    ("harness.orchestration.suite", "import harness.orchestration.launch", "Orchestration inside",
     "harness.orchestration.suite -> harness.orchestration.launch"),
    # a method importing the engine
    ("methods.ft", "from harness.engine.runner import run", "Methods and scenarios",
     "methods.ft -> harness.engine.runner"),
    # reports importing the runner
    ("reports.tables", "import harness.engine.runner", "Reports read the run record only",
     "reports.tables -> harness.engine.runner"),
])
def test_contract_fails_on_an_upward_import(tmp_path, module, line, contract, edge):
    root = _copy(tmp_path)
    _inject(root, module, line)
    out = _lint(root)
    assert out.returncode != 0, out.stdout[-3000:]
    broken = [name for name, verdict in _verdicts(out.stdout).items() if verdict == "BROKEN"]
    assert any(name.startswith(contract) for name in broken), broken
    assert f"- {edge} (l." in re.sub(r"\s+", " ", out.stdout), out.stdout[-3000:]
