"""Every argument parser of the harness: the `dmkd` command (:mod:`harness.cli.dmkd`, also the torchrun
entry point: ``torchrun ... -m harness.cli run ...``) and the docs generator (:mod:`harness.cli.defaults`).

``harness.cli.dmkd.main`` also answers as ``harness.cli:main``, lazily, so a `dmkd` console script installed
before the move (``harness.cli:main``) keeps working until the next ``pip install -e .``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "main":
        from harness.cli.dmkd import main

        return main
    raise AttributeError(f"module 'harness.cli' has no attribute {name!r}")
