"""Tuned settings as files: ``dmkd tune``'s best parameters (results/tuned/<method>__<scenario>.json) and
``dmkd tune-suite``'s checked-in files (configs/tuned/<suite>/<scenario>.yaml). Reading them needs no
Optuna, so a suite on a minimal install runs its tuned settings too."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from harness.core.config import Document, validate_document
from harness.core.errors import UserError


class TunedEntry(Document):
    """One row's tuned settings in a tuned-settings file (written by ``dmkd tune-suite``)."""

    model_config = ConfigDict(extra="allow")
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    fixed: dict[str, Any] | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)


class TunedFile(Document):
    """The structure of configs/tuned/<suite>/<scenario>.yaml (other keys record how it was made)."""

    model_config = ConfigDict(extra="allow")
    entries: dict[str, TunedEntry]
    scenario_options: dict[str, Any] | None = None
    protocol: dict[str, Any] | None = None
    budget_memory: str | int | None = None  # the suite's memory budget it was tuned under (None: none)


def tuning_from_args(args, cfg):
    """The tuning protocol of a command: ``--protocol``/``--first-tasks``, else the suite file's ``tuning:``,
    else end-of-stream."""
    from harness.core.streams import FIRST_TASKS, TuningProtocol

    proto = getattr(args, "protocol", None)
    k = getattr(args, "first_tasks", None)
    if proto is None:
        base = TuningProtocol.from_dict(getattr(cfg, "tuning", None) if cfg is not None else None)
        if k is not None and base.protocol != FIRST_TASKS:
            raise UserError("--first-tasks needs --protocol first-tasks", "e.g. --protocol first-tasks --first-tasks 2")
        return TuningProtocol(FIRST_TASKS, k) if k is not None else base
    return TuningProtocol(proto, k)


class _RepeatedKey(ValueError):
    pass


def _distinct_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: an object with a key written twice is refused (json keeps the last)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _RepeatedKey(k)
        out[k] = v
    return out


def trial_count(value: Any, where: str, fix: str) -> int:
    """A number of tuning trials: a whole number >= 0 (an integral float such as 20.0 is accepted)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where} must be a whole number of trials >= 0, got {value!r}", fix)
    return value


def best_params_path(results_dir: Path, method: str, scenario: str) -> Path:
    return Path(results_dir) / "tuned" / f"{method}__{scenario}.json"


def load_best_params(results_dir: Path, cfg) -> dict[tuple[str, str], dict[str, Any]]:
    """Best parameters saved by `dmkd tune` for the (method, scenario) pairs of a suite."""
    out = {}
    for m, _label, _ in cfg.methods:
        for sc, _ in cfg.scenarios:
            p = best_params_path(results_dir, m, sc)
            if p.exists():
                again = f"delete it and run `dmkd tune --method {m} --scenario {sc}` again"
                try:
                    saved = json.loads(p.read_text(), object_pairs_hook=_distinct_keys)
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise UserError(f"tuned settings {p} are unreadable ({type(e).__name__})", again) from None
                except _RepeatedKey as e:
                    raise UserError(f"tuned settings {p}: key {e.args[0]!r} appears twice in one object; only "
                                    "the last would count", again) from None
                if not isinstance(saved, dict) or not isinstance(saved.get("params"), dict):
                    raise UserError(f"tuned settings {p} have no 'params' mapping", again)
                saved["n_trials"] = trial_count(saved.get("n_trials", 0), f"tuned settings {p}: n_trials", again)
                out[(m, sc)] = saved
    if not out:
        raise UserError(f"--tuned: no saved parameters under {Path(results_dir) / 'tuned'}",
                        "run `dmkd tune --method M --scenario S` first")
    return out


def tuned_dir(cfg, override: str | Path | None = None, tuning=None, sampler_seed: int = 0) -> Path:
    """Where a suite's tuned settings live: ``<suite file's folder>/tuned/<suite name>/<protocol>/seed<S>/``
    (protocol: end-of-stream, first-tasks-K or held-out-stream; S: the TPE sampler seed). End-of-stream
    files of sampler seed 0 made before protocols existed lie in ``<suite name>/`` itself; they are read
    when the new folder holds none. ``tuning``: a TuningProtocol (default: the suite's ``tuning:``)."""
    if override is not None:
        return Path(override)
    from harness.core.streams import END_OF_STREAM, TuningProtocol

    tuning = tuning or TuningProtocol.from_dict(getattr(cfg, "tuning", None))
    base = (Path(cfg.source).parent if getattr(cfg, "source", None) else Path("configs")) / "tuned" / cfg.name
    if getattr(cfg, "budget_overridden", False):  # settings tuned under another memory budget live apart
        budget = cfg.budget_memory
        base = base / f"budget-{'none' if budget is None else budget}"
    where = base / tuning.slug / f"seed{sampler_seed}"
    legacy = tuning.protocol == END_OF_STREAM and sampler_seed == 0 and not where.is_dir() and any(
        base.glob("*.yaml"))
    return base if legacy else where


def tuned_file(directory: Path, scenario: str) -> Path:
    return Path(directory) / f"{scenario}.yaml"


def load_tuned_suite(cfg, directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Tuned settings for the suite's (row label, scenario) pairs from ``directory`` (none: {}).

    A file tuned for other scenario options, another protocol or other fixed row settings is a
    user error: its settings would not mean what they meant there.
    """
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for sc_name, sc_opts in cfg.scenarios:
        path = tuned_file(directory, sc_name)
        if not path.is_file():
            continue
        from harness.core.yamlio import load_yaml_file

        raw = load_yaml_file(path, "tuned-settings file")
        if not isinstance(raw, dict) or "entries" not in raw:
            raise UserError(f"{path} is not a tuned-settings file (no 'entries:')", "re-run `dmkd tune-suite`")
        doc = validate_document(TunedFile, raw, str(path), "re-run `dmkd tune-suite`").model_dump()
        budget = getattr(cfg, "budget_memory", None)
        # The tuning protocol that chose these settings (files without one were tuned end-of-stream).
        tuning = {"protocol": "end-of-stream", **dict(raw.get("tuning") or {}),
                  "sampler_seed": int(raw.get("sampler_seed", 0) or 0)}
        for what, have, want in (("scenario options", doc.get("scenario_options") or {}, dict(sc_opts)),
                                 ("protocol", doc.get("protocol") or {}, dict(cfg.protocol)),
                                 ("memory budget", doc.get("budget_memory"), budget)):
            if have != want:
                raise UserError(f"{path} was tuned for {what} {have}, the suite has {want}",
                                "re-run `dmkd tune-suite` for this suite, or pass --defaults")
        for m_name, label, overrides in cfg.methods:
            row = label or m_name
            e = doc["entries"].get(row)
            if e is None:
                print(f"warning: {path} has no entry for {row}; it runs its defaults", file=sys.stderr)
                continue
            if e.get("method") != m_name or (e.get("fixed") or {}) != dict(overrides):
                raise UserError(f"{path}: entry {row!r} was tuned for {e.get('method')} with {e.get('fixed')}, "
                                f"the suite has {m_name} with {dict(overrides)}",
                                "re-run `dmkd tune-suite` for this suite, or pass --defaults")
            prov = e.get("provenance") or {}
            trials = trial_count(prov.get("trials", 0), f"{path}: entry {row!r}: provenance.trials",
                                 "re-run `dmkd tune-suite` for this suite, or pass --defaults")
            out[(row, sc_name)] = {"params": dict(e.get("params") or {}), "n_trials": trials,
                                   "provenance": prov, "file": str(path), "tuning": dict(tuning)}
    return out
