"""``--set key=value`` overrides: parsed as YAML scalars (no aliases) and routed to the method's
hyperparameters, the scenario's options or the protocol."""

from __future__ import annotations

import dataclasses
from typing import Any

from harness.core.errors import UserError


def _parse_value(text: str) -> Any:
    from harness.core.yamlio import load_yaml_text

    try:
        return load_yaml_text(text, "--set value")
    except UserError:
        return text


def parse_sets(items: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for it in items or []:
        if "=" not in it or it.startswith("="):
            raise UserError(f"--set {it!r} is not key=value", "write e.g. --set lr=0.05")
        k, v = it.split("=", 1)
        out.append((k.strip(), _parse_value(v.strip())))
    return out


def route_sets(sets: list[tuple[str, Any]], method: str, scenario: str) -> tuple[dict, dict, dict]:
    """Send each key=value to the method's hyperparameters, the scenario's options or the protocol.

    A key may be prefixed (``method.``, ``scenario.``, ``protocol.``); unprefixed keys go to the
    first of method, scenario, protocol that has a field of that name.
    """
    import scenarios  # noqa: F401
    from harness.core.protocol import Protocol
    from harness.engine.runner import resolve_method
    from scenarios.base import SCENARIOS, scenario_option_names

    m_fields = {f.name for f in dataclasses.fields(resolve_method(method).HParams)}
    if scenario not in SCENARIOS:
        raise UserError(f"unknown scenario {scenario!r}", f"choose one of: {', '.join(SCENARIOS)}")
    s_fields = set(scenario_option_names(scenario))
    p_fields = {f.name for f in dataclasses.fields(Protocol)}
    m_set: dict[str, Any] = {}
    s_set: dict[str, Any] = {}
    p_set: dict[str, Any] = {}
    for key, value in sets:
        prefix, _, name = key.rpartition(".")
        if prefix == "method" or (not prefix and name in m_fields):
            m_set[name] = value
        elif prefix == "scenario" or (not prefix and name in s_fields):
            s_set[name] = value
        elif prefix == "protocol" or (not prefix and name in p_fields):
            p_set[name] = value
        else:
            raise UserError(
                f"unknown option {key!r} for method {method} / scenario {scenario}",
                f"method options: {', '.join(sorted(m_fields)) or '-'}; scenario options: {', '.join(sorted(s_fields))}; "
                f"protocol: {', '.join(sorted(p_fields))}",
            )
    return m_set, s_set, p_set
