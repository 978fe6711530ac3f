"""The code that produced a task's numbers: a digest of the harness's, methods' and scenarios' Python
sources, and the git revision they were checked out at (with ``+dirty`` when those sources differ
from it).

The digest is what is compared: two processes ran the same code exactly when their digests are
equal, whether the tree is a git checkout (clean or dirty) or an installed copy without git. A
commit that changes only documentation or tests leaves the digest as it was. The git revision is
there for people: it says where to find that code.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("harness", "methods", "scenarios")  # the code that decides a run's numbers (not reports)


@dataclass(frozen=True)
class CodeState:
    digest: str  # 16 hex digits of SHA-256 over every source file's path and bytes
    git: str  # the revision (12 hex digits), "" outside a git checkout
    dirty: bool  # the package sources differ from that revision

    def describe(self) -> str:
        """How the code is named in records and messages: ``git 13ee042a1b2c+dirty, sources 9f8e…``."""
        where = f"git {self.git}{'+dirty' if self.dirty else ''}, " if self.git else "no git, "
        return f"{where}sources {self.digest}"


def source_digest(root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def read_code_state(root: Path = ROOT) -> CodeState:
    digest = source_digest(root)
    top = _git(root, "rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != root.resolve():  # not a checkout of its own (an enclosing repo)
        return CodeState(digest, "", False)
    rev = _git(root, "rev-parse", "HEAD")[:12]
    dirty = bool(_git(root, "status", "--porcelain", "--", *PACKAGES))
    return CodeState(digest, rev, dirty)


@functools.lru_cache(maxsize=1)
def code_state() -> CodeState:
    """This process's code (read once: the modules are imported once, so later edits do not run)."""
    return read_code_state()
