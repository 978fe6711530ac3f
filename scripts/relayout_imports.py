"""Rewrite imports and module paths written against the flat harness/ layout (harness.api, harness.runner,
from harness.cli import main, methods.fedavg.NodesMethod, ...) to the layered one: `python scripts/relayout_imports.py FILE...`.

Used for the move itself; kept for code written before it (a branch merged later). Prints the files it changed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

MOVES = {
    "errors": "core", "yamlio": "core", "backbones": "core", "partition": "core", "nodes": "core",
    "defaults": "core",
    "runner": "engine", "metrics": "engine", "costs": "engine", "energy": "engine",
    "suite": "orchestration", "tune": "orchestration", "tuned": "orchestration", "cluster": "orchestration",
    "launch": "orchestration", "storage": "orchestration", "tracking": "orchestration",
    "console": "orchestration", "overrides": "orchestration",
}
API = {}
for mod, names in {
    "data": "CLASS_IL TASK_IL DOMAIN_IL ALL_SETTINGS DataSource TensorSource Task Scenario",
    "protocol": "Protocol PRECISIONS",
    "context": "RunContext TrainingDiverged check_finite",
    "method": "HParams Method tensor_bytes METHODS register",
    "config": "split_params hparams_from coerce require choice",
}.items():
    for n in names.split():
        API[n] = f"harness.core.{mod}"
# names whose home is not the module they were imported from
BY_NAME = {
    "harness.defaults": {"BASELINES": "harness.cli.defaults", "method_table": "harness.cli.defaults",
                         "render": "harness.cli.defaults", "main": "harness.cli.defaults"},
    "harness.runner": {"evaluate": "harness.engine.evaluation", "STATE_KEYS": "harness.engine.checkpoints",
                       "capture_state": "harness.engine.checkpoints", **API},
    "harness.launch": {"add_suite_options": "harness.cli.dmkd"},
    "methods.fedavg": {"NodesMethod": "harness.core.nodes_method", "NodesParams": "harness.core.nodes_method",
                       "round_schedule": "harness.core.nodes_method",
                       "round_batch_counts": "harness.core.nodes_method"},
    "harness.cli": {"main": "harness.cli.dmkd"},
}


def new_module(old: str) -> str:
    if old == "harness.api":
        return "harness.core"
    parts = old.split(".")
    if len(parts) >= 2 and parts[0] == "harness" and parts[1] in MOVES:
        return ".".join(["harness", MOVES[parts[1]], *parts[1:]])
    return old


def target(old_mod: str, name: str) -> str:
    if old_mod == "harness.api":
        return API[name]
    if name in BY_NAME.get(old_mod, {}):
        return BY_NAME[old_mod][name]
    return new_module(old_mod)


FROM_RE = re.compile(
    r"^(?P<ind>[ \t]*)from (?P<mod>harness(?:\.[a-z_]+)?|methods\.fedavg) import "
    r"(?P<names>\([^)]*\)|[^\n]*?)(?P<comment>[ \t]*#[^\n]*)?$", re.MULTILINE)


def rewrite_from(m: re.Match) -> str:
    ind, mod, names, comment = m["ind"], m["mod"], m["names"], m["comment"] or ""
    raw = names.strip()
    if raw.startswith("("):
        raw = raw[1:-1]
    items = [x.strip() for x in re.sub(r"#[^\n]*", "", raw).replace("\n", " ").split(",") if x.strip()]
    if mod == "harness":  # from harness import suite as suite_mod
        out = []
        for it in items:
            layer = MOVES.get(it.partition(" as ")[0].strip())
            if layer is None:
                out.append(f"{ind}from harness import {it}")
            else:
                out.append(f"{ind}from harness.{layer} import {it}")
        return "\n".join(out) + comment
    groups: dict[str, list[str]] = {}
    for it in items:
        name = it.split(" as ")[0].strip()
        groups.setdefault(target(mod, name), []).append(it)
    if mod == "methods.fedavg" and list(groups) == ["methods.fedavg"]:
        return m.group(0)
    lines = []
    for k, (tmod, its) in enumerate(groups.items()):
        line = f"{ind}from {tmod} import {', '.join(its)}"
        if k == 0:
            line += comment
        lines.append(line)
    return "\n".join(lines)


TEXT_RE = re.compile(r"\bharness\.(" + "|".join(sorted(MOVES, key=len, reverse=True)) + r")\b(?![/\w])")
PATH_RE = re.compile(r"\bharness/(" + "|".join(sorted(MOVES, key=len, reverse=True)) + r")\.py\b")


def rewrite(text: str) -> str:
    text = FROM_RE.sub(rewrite_from, text)
    text = re.sub(r"^(\s*)import harness\.([a-z_]+)\b", lambda m: f"{m[1]}import {new_module('harness.' + m[2])}",
                  text, flags=re.MULTILINE)
    text = text.replace("python -m harness.defaults", "python -m harness.cli.defaults")
    text = TEXT_RE.sub(lambda m: f"harness.{MOVES[m[1]]}.{m[1]}", text)
    text = PATH_RE.sub(lambda m: f"harness/{MOVES[m[1]]}/{m[1]}.py", text)
    return text


if __name__ == "__main__":
    for f in sys.argv[1:]:
        p = Path(f)
        s = p.read_text()
        t = rewrite(s)
        if t != s:
            p.write_text(t)
            print("rewrote", f)
