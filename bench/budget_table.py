"""Two suites side by side, e.g. the quick suite under its memory budget and without one:

    python bench/budget_table.py RESULTS_A EXPERIMENT_A RESULTS_B EXPERIMENT_B [--names aligned,none]

Reads the JSON records of each experiment and prints one markdown table: for every row (the method,
matched across the two by method name) and setting, the final average accuracy (mean ± 95% t-interval
over seeds) and the persistent memory of each side. This is how the README's aligned-versus-
unaligned table is made.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from reports.load import load_json_records
from reports.tables import mean_std

SETTINGS = (("split-fmnist", "class_il", "Split class-IL"), ("split-fmnist", "task_il", "Split task-IL"),
            ("permuted-fmnist", "domain_il", "Permuted domain-IL"))


def rows(results: str, experiment: str) -> dict[tuple[str, str, str], dict]:
    out: dict[tuple[str, str, str], dict] = defaultdict(lambda: {"acc": [], "mem": []})
    for r in load_json_records(results, experiment):
        if r.get("status") != "finished" or r.get("eval_split", "test") != "test":
            continue
        for setting, m in (r.get("metrics") or {}).items():
            cell = out[(r["method"], r["scenario"], setting)]
            cell["acc"].append(m["final_avg_acc"])
            cell["mem"].append((r.get("costs") or {}).get("persistent_bytes") or 0)
            cell["label"] = r["label"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_a")
    ap.add_argument("experiment_a")
    ap.add_argument("results_b")
    ap.add_argument("experiment_b")
    ap.add_argument("--names", default="A,B")
    args = ap.parse_args()
    name_a, name_b = args.names.split(",")
    a, b = rows(args.results_a, args.experiment_a), rows(args.results_b, args.experiment_b)
    methods = sorted({k[0] for k in a} | {k[0] for k in b},
                     key=lambda m: -mean_std(a.get((m, "split-fmnist", "class_il"), {"acc": [0]})["acc"]).mean)
    head = ["method"] + [f"{title} {n}" for _, _, title in SETTINGS for n in (name_a, name_b)] + \
        [f"memory {name_a}", f"memory {name_b}"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m in methods:
        cells = [m]
        for sc, setting, _ in SETTINGS:
            for side in (a, b):
                c = side.get((m, sc, setting))
                if not c:
                    cells.append("—")
                    continue
                ms = mean_std(c["acc"])
                cells.append(f"{ms.mean:.3f} ± {ms.half_width:.3f}" if ms.n > 1 else f"{ms.mean:.3f}")
        for side in (a, b):
            c = side.get((m, "split-fmnist", "class_il"))
            cells.append(f"{max(c['mem']) / 2**20:.2f} MiB" if c else "—")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
