"""Configuration helpers: hyperparameter dataclasses from CLI/YAML values, validation helpers, and
the split of ``protocol.<field>`` entries from method options."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from harness.core.errors import UserError


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate ``protocol.<field>`` entries from method hyperparameters."""
    method = {k: v for k, v in params.items() if not k.startswith("protocol.")}
    protocol = {k[len("protocol."):]: v for k, v in params.items() if k.startswith("protocol.")}
    return method, protocol


def hparams_from(cls: type, overrides: dict[str, Any]) -> Any:
    """Build a hyperparameter dataclass, converting string overrides to the field types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in overrides.items():
        if key not in fields:
            raise UserError(
                f"unknown option {key!r} for {cls.__qualname__}",
                f"valid options: {', '.join(sorted(fields))}",
            )
        kwargs[key] = coerce(value, fields[key].type, key)
    hp = cls(**kwargs)
    validate = getattr(hp, "validate", None)
    if callable(validate):
        validate()
    return hp


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a CLI/YAML value to a dataclass field's declared type, with a clear error."""
    tname = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    tname = tname.replace(" ", "")
    try:
        if tname in ("int",):
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tname in ("float",):
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise UserError(f"option {key}={value!r} is not a finite number", f"give {key} a finite value")
            return out
        if tname in ("bool",):
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tname in ("str",):
            return str(value)
        if tname.startswith(("str|None", "None|str")) or tname == "Optional[str]":
            return None if value in (None, "none", "None", "") else str(value)
        if tname.startswith("float|None"):
            if value in (None, "none", "None", ""):
                return None
            return coerce(value, "float", key)
        if tname.startswith("int|None"):
            return None if value in (None, "none", "None", "") else int(value)
    except (TypeError, ValueError):
        raise UserError(f"option {key}={value!r} is not a valid {tname}", f"give {key} a {tname} value") from None
    return value


def require(cond: bool, problem: str, fix: str) -> None:
    """Validation helper for hyperparameter dataclasses."""
    if not cond:
        raise UserError(problem, fix)


def choice(value: str, allowed: Sequence[str], key: str) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r} is not one of {', '.join(allowed)}", f"set {key} to one of {list(allowed)}")
