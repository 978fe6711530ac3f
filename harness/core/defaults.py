"""Documented defaults: every hyperparameter, scenario option and protocol field is documented once,
at its field.

A field is declared with :func:`harness.core.config.documented` (re-exported here): its default,
what the value means, where it comes from (the paper or official code and the setting it was chosen
for, or "ours" with the reason), what it accepts and its search range. ``dmkd list --method NAME``
prints a method's table and ``python -m harness.cli.defaults`` writes docs/defaults.md
(:mod:`harness.cli.defaults`); both read this metadata through :func:`rows`, and a test checks that the
checked-in file equals what that module prints, so the docs cannot drift from the code. pydantic
validates values against the same fields (:func:`harness.core.config.hparams_from`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from harness.core.config import Search, accepts, documented

__all__ = ["Search", "documented", "rows", "undocumented"]


def rows(hparams: type) -> list[dict[str, str]]:
    """One row per field of a configuration dataclass: name, default, meaning, source, what it
    accepts and its search range ('' where none)."""
    out = []
    for f in dataclasses.fields(hparams):
        search = f.metadata.get("search")
        out.append({"name": f.name, "default": _show(f.default), "meaning": f.metadata.get("meaning", ""),
                    "source": f.metadata.get("source", ""), "accepts": accepts(f),
                    "search": search.describe() if isinstance(search, Search) else ""})
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
