"""Compare two results folders record by record: the numbers a refactor must not change.

    python bench/compare_records.py RESULTS_BEFORE RESULTS_AFTER

Reads every ``<experiment>/runs/*.json`` under each folder and prints whether the same runs (file
names carry the key and the configuration hash) exist on both sides, then, over the runs both have,
which fields are identical everywhere and which differ (with examples). Timings, memory and energy
are not compared (they vary from run to run); the configuration is compared without the git revision
of the code that ran.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

FIELDS = ("acc", "random_init_acc", "metrics", "config_hash", "config_group", "status", "config")
COSTS = ("params_total", "params_trainable", "inference_flops_per_sample", "train_flops_total",
         "train_flops_boundary", "train_samples", "passes_per_task", "comm_bytes", "comm_rounds",
         "flop_steps_counted", "method_state_bytes", "footprint_bytes")


def load(folder: str) -> dict[str, dict]:
    return {os.path.basename(f): json.load(open(f)) for f in glob.glob(f"{folder}/**/runs/*.json", recursive=True)
            if not os.path.basename(f).startswith(".tmp-")}


def _config(rec: dict) -> dict:
    c = dict(rec.get("config") or {})
    c["env"] = {**(c.get("env") or {}), "git_revision": None}
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    args = ap.parse_args()
    a, b = load(args.before), load(args.after)
    print(f"records: before {len(a)}, after {len(b)}, same file names (key + config hash): {sorted(a) == sorted(b)}")
    diff: dict[str, list] = {}
    for k in sorted(set(a) & set(b)):
        for f in FIELDS:
            va, vb = (_config(a[k]), _config(b[k])) if f == "config" else (a[k].get(f), b[k].get(f))
            if va != vb:
                diff.setdefault(f, []).append(k)
        for c in COSTS:
            if a[k].get("costs", {}).get(c) != b[k].get("costs", {}).get(c):
                diff.setdefault("costs." + c, []).append((k, a[k]["costs"].get(c), b[k]["costs"].get(c)))
    names = [*FIELDS, *("costs." + c for c in COSTS)]
    print("identical in all records:", ", ".join(n for n in names if n not in diff))
    for f, ks in diff.items():
        print(f"DIFFERENT {f}: {len(ks)} records, e.g. {ks[:3]}")
    return 1 if diff or sorted(a) != sorted(b) else 0


if __name__ == "__main__":
    raise SystemExit(main())
