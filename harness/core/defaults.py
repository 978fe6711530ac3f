"""Documented defaults: every baseline hyperparameter is documented once, at its field.

A field is declared with :func:`documented` (a ``dataclasses.field`` whose metadata holds what the
value means and where it comes from: the paper or official code and the setting it was chosen for,
or "ours" with the reason). ``dmkd list --method NAME`` prints a method's table and
``python -m harness.cli.defaults`` writes docs/defaults.md (:mod:`harness.cli.defaults`); both read the
same metadata, and a test checks that the checked-in file equals what that module prints, so the docs
cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def documented(default: Any, meaning: str, source: str) -> Any:
    """A dataclass field with its default, its meaning and its source (paper/code and setting)."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "source": source})


def rows(hparams: type) -> list[dict[str, str]]:
    """One row per field of a hyperparameter dataclass: name, default, meaning, source."""
    out = []
    for f in dataclasses.fields(hparams):
        out.append({"name": f.name, "default": _show(f.default), "meaning": f.metadata.get("meaning", ""),
                    "source": f.metadata.get("source", "")})
    return out


def undocumented(hparams: type) -> list[str]:
    """Fields of ``hparams`` without a meaning or a source."""
    return [r["name"] for r in rows(hparams) if not (r["meaning"] and r["source"])]


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, str):
        return repr(value) if value else "''"
    return repr(value)
