"""How long `dmkd report` takes as the number of runs grows: synthetic records from a real one.

Each size N writes N run records (JSON files, and an MLflow sqlite store holding the same records as
``record.json`` artifacts, as a suite writes them) made from one real record: its structure as it is,
with the method label, scenario, seed, accuracies and costs varied. Then it times, in this process:
reading the records (JSON; MLflow), the tables (the report without figures), the whole report, and
the whole `dmkd report` command in a fresh process, with ``python -c pass`` as the yardstick of a
process start.

    nice python bench/report_scale.py [--sizes 72,1000] [--record RUN.json] [--mlflow-max 200]

Without ``--record`` a small real run (FT on Split Fashion-MNIST, 200 samples per task) makes the
record. The quick suite has 72 runs (12 rows x 2 scenarios x 3 seeds); larger sizes add scenarios,
rows and seeds.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LABELS = ["ft", "joint", "ewc", "lwf", "si", "er", "moe", "m2mkd", "dmkd", "fedavg-p4", "dimat-p4", "wa-p4"]
SCENARIOS = ["split-fmnist", "permuted-fmnist"]


def grid(n: int) -> list[tuple[str, str, int]]:
    """N (label, scenario, seed) cells: up to 72, the quick suite's 12 rows x 2 scenarios x 3 seeds;
    beyond, 20 rows x 10 seeds x as many scenarios as it takes (1,000: 5 scenarios)."""
    if n <= 72:
        seeds, labels, n_sc = 3, LABELS, 2
    else:
        seeds, labels = 10, LABELS + [f"variant-{i}" for i in range(20 - len(LABELS))]
        n_sc = -(-n // (seeds * len(labels)))
    scenarios = (SCENARIOS + [f"scenario-{i}" for i in range(n_sc)])[:n_sc]
    return [(lab, sc, s) for sc in scenarios for lab in labels for s in range(seeds)][:n]


def _h(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12]


def make_record(base: dict[str, Any], label: str, scenario: str, seed: int, experiment: str) -> dict[str, Any]:
    rec = copy.deepcopy(base)
    rng = random.Random(f"{label}|{scenario}|{seed}")
    skill = random.Random(label).uniform(0.3, 0.9)
    group = _h(label, scenario)
    rec.update(method=label.split("-")[0], label=label, scenario=scenario, seed=seed, config_group=group,
               config_hash=_h(group, seed), experiment=experiment)
    rec["key"] = f"{label}__{scenario}__s{seed}__{rec['config_hash']}"
    rec.pop("mlflow_run_id", None)
    rec["config"].update(method=rec["method"], scenario=scenario, seed=seed)
    for setting, matrix in rec["acc"].items():
        rec["acc"][setting] = [[min(1.0, max(0.0, v * skill / 0.5 + rng.gauss(0, 0.02))) for v in row]
                               for row in matrix]
        m = rec["metrics"][setting]
        for k in list(m):
            m[k] = (m[k] or 0.0) * skill / 0.5 + rng.gauss(0, 0.01)
    for k in ("train_flops_total", "train_time_s", "eval_time_s", "peak_memory_bytes", "footprint_bytes",
              "persistent_bytes", "comm_bytes"):
        if isinstance(rec["costs"].get(k), (int, float)):
            rec["costs"][k] = type(rec["costs"][k])(rec["costs"][k] * rng.uniform(0.5, 4.0))
    return rec


def write_json(records: list[dict[str, Any]], results: Path, experiment: str) -> None:
    runs = results / experiment / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for rec in records:
        (runs / f"{rec['key']}.json").write_text(json.dumps(rec, indent=1))


def write_mlflow(records: list[dict[str, Any]], results: Path, experiment: str) -> str:
    """An MLflow sqlite store as a suite leaves it: one run per record with its ``record.json``."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(results / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(experiment, artifact_location=(results / "mlartifacts").resolve().as_uri())
    for rec in records:
        run = client.create_run(exp_id, tags={"mlflow.runName": rec["key"]})
        rec["mlflow_run_id"] = run.info.run_id
        client.log_dict(run.info.run_id, rec, "record.json")
        client.set_terminated(run.info.run_id, "FINISHED")
    return uri


def a_real_record(tmp: Path) -> dict[str, Any]:
    res = tmp / "seed-run"
    subprocess.run([sys.executable, "-m", "harness.cli", "run", "--method", "ft", "--scenario", "split-fmnist",
                    "--results", str(res), "--tracking-uri", "none", "--set", "max_train_per_task=200",
                    "--set", "max_test_per_task=100"], check=True, capture_output=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return json.loads(next(res.glob("*/runs/*.json")).read_text())


def timed(fn, *args, **kwargs) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def process_time(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="72,1000", help="comma-separated run counts (default 72,1000)")
    ap.add_argument("--record", default=None, help="a real run record (JSON) to vary (default: make one)")
    ap.add_argument("--mlflow-max", type=int, default=200,
                    help="also build and read an MLflow store for sizes up to this (writing one is slow)")
    ap.add_argument("--keep", default=None, help="write the results folders here and keep them")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    from reports.build import make_report, report_from_results
    from reports.load import load_json_records, load_mlflow_records

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(args.keep or tmpdir)
        base = json.loads(Path(args.record).read_text()) if args.record else a_real_record(tmp)
        py = [sys.executable, "-c", "pass"]
        print(f"record: {base['method']} on {base['scenario']}, {base['n_tasks']} tasks; threads "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; load {os.getloadavg()[0]:.1f}")
        print(f"{'runs':>6} {'step':<34} {'s':>8}")
        for n in [int(x) for x in args.sizes.split(",") if x]:
            exp = f"synthetic-{n}"
            results = tmp / f"results-{n}"
            recs = [make_record(base, lab, sc, s, exp) for lab, sc, s in grid(n)]
            uri = None
            if n <= args.mlflow_max:
                t, uri = timed(write_mlflow, recs, results, exp)
                print(f"{n:>6} {'(writing the MLflow store)':<34} {t:>8.2f}")
            write_json(recs, results, exp)
            t_json, loaded = timed(load_json_records, results, exp)
            print(f"{n:>6} {'read JSON records':<34} {t_json:>8.2f}")
            if uri:
                t_ml, _ = timed(load_mlflow_records, uri, exp)
                print(f"{n:>6} {'read MLflow records':<34} {t_ml:>8.2f}")
            t_tab, _ = timed(make_report, loaded, results / "report-tables", figures=False)
            print(f"{n:>6} {'tables (report without figures)':<34} {t_tab:>8.2f}")
            t_all, _ = timed(make_report, loaded, results / "report-all")
            print(f"{n:>6} {'report with figures':<34} {t_all:>8.2f}   figures {t_all - t_tab:.2f}")
            if uri:
                t_rep, _ = timed(report_from_results, results, exp, results / "report-ml", uri)
                print(f"{n:>6} {'report_from_results (MLflow+JSON)':<34} {t_rep:>8.2f}")
            t_pass = process_time(py)
            t_cli = process_time([sys.executable, "-m", "harness.cli", "report", "--results", str(results),
                                  "--experiment", exp, "--out", str(results / "report-cli"),
                                  *(["--tracking-uri", "none"] if not uri else [])])
            print(f"{n:>6} {'dmkd report (fresh process)':<34} {t_cli:>8.2f}   "
                  f"{t_cli / t_pass:.0f}x python -c pass ({t_pass:.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
