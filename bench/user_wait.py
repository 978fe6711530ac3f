"""What a user waits for, each against its reference, measured in one run of this script.

Rows (docs/performance.md has the targets):

- ``dmkd --help`` and an argument error, against ``python -c pass``;
- ``dmkd list``, against ``python -c "import torch"`` (target: at most torch + 1 s);
- ``dmkd report`` on 72 runs (synthetic records made from a real one, bench/report_scale.py) read from
  the MLflow sqlite store and the JSON records, against ``python -c pass``;
- EWC's and DIMAT's runs against FT's on the same scenario (bench/method_cost.py's runs, thread CPU
  clock; ``--max-train`` caps the samples per task);
- with ``--full``: ``bash scripts/quick.sh`` and ``bash scripts/test.sh`` (minutes; on a fresh clone
  they include the set-up).

Each command runs ``--repeat`` times, alternating with its reference (A B A B), and the medians are
printed: wall seconds and the CPU seconds of the process and its children (the CPU time is what a
shared machine moves least).

    OMP_NUM_THREADS=1 python bench/user_wait.py [--repeat 3] [--max-train 2000] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
DMKD = [sys.executable, "-m", "harness.cli"]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def once(argv: list[str], cwd: Path = REPO) -> tuple[float, float]:
    """(wall s, CPU s) of one process run to its end."""
    c0, t0 = _children_cpu(), time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0, _children_cpu() - c0


def paired(a: list[str], b: list[str], repeat: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Medians of (wall, CPU) of A and of B, run in turn A B A B ... after one warm-up of each."""
    once(a), once(b)
    ra, rb = [], []
    for _ in range(repeat):
        ra.append(once(a))
        rb.append(once(b))
    med = lambda rs: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
    return med(ra), med(rb)


def row(what: str, a: tuple[float, float], ref_name: str, b: tuple[float, float], target: str) -> None:
    print(f"| {what} | {a[0]:.2f} s wall, {a[1]:.2f} s CPU | {ref_name}: {b[0]:.2f} s wall, {b[1]:.2f} s CPU | "
          f"{a[0] / b[0]:.2f}x wall, {a[1] / max(b[1], 1e-9):.2f}x CPU; CPU {a[1] - b[1]:+.2f} s | {target} |",
          flush=True)


def report_rows(repeat: int, tmp: Path) -> None:
    from bench import report_scale as rs

    seed = rs.a_real_record(tmp)
    results, exp = tmp / "report-72", "synthetic-72"
    recs = [rs.make_record(seed, lab, sc, s, exp) for lab, sc, s in rs.grid(72)]
    rs.write_mlflow(recs, results, exp)
    rs.write_json(recs, results, exp)
    cmd = [*DMKD, "report", "--results", str(results), "--experiment", exp, "--out", str(results / "out")]
    a, b = paired(cmd, [sys.executable, "-c", "pass"], repeat)
    row("`dmkd report`, 72 runs (MLflow store + JSON)", a, "`python -c pass`", b, "≤ 10 s, plots ≤ 5 s")
    a, b = paired([*cmd[:-2], "--tracking-uri", "none", "--out", str(results / "out2")],
                  [sys.executable, "-c", "pass"], repeat)
    row("`dmkd report`, 72 runs (JSON records only)", a, "`python -c pass`", b, "≤ 10 s")


def method_rows(max_train: int) -> None:
    out = Path(tempfile.mkdtemp()) / "cost.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "method_cost.py"), "--methods", "ewc,dimat-p4",
                    "--scenarios", "split-fmnist", "--json", str(out),
                    *(["--max-train", str(max_train)] if max_train else [])],
                   cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    ft = rows["ft"]
    for label, target in (("ewc", "≤ 1.6x FT"), ("dimat-p4", "≤ 2x FT, or the bench says why")):
        r = rows[label]
        print(f"| {label} run vs FT's (split-fmnist, thread CPU) | {r['wall_s']:.2f} s (train {r['train_s']:.2f}) | "
              f"FT: {ft['wall_s']:.2f} s (train {ft['train_s']:.2f}) | {r['wall_s'] / ft['wall_s']:.2f}x run, "
              f"{r['train_s'] / ft['train_s']:.2f}x training | {target} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-train", type=int, default=2000, help="samples per task of the method runs (0: all)")
    ap.add_argument("--skip", default="", help="comma-separated: cli, report, methods")
    ap.add_argument("--full", action="store_true", help="also time scripts/quick.sh and scripts/test.sh")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; OMP_NUM_THREADS={ENV['OMP_NUM_THREADS']}")
    print("| what the user waits for | time | reference | ratio | target |\n|---|---|---|---|---|")
    py, torch_ = [sys.executable, "-c", "pass"], [sys.executable, "-c", "import torch"]
    if "cli" not in skip:
        a, b = paired([*DMKD, "--help"], py, args.repeat)
        row("`dmkd --help`", a, "`python -c pass`", b, "≤ 0.5 s, no torch")
        a, b = paired([*DMKD, "run", "--method"], py, args.repeat)
        row("`dmkd run --method` (argument error)", a, "`python -c pass`", b, "≤ 0.5 s, no torch")
        a, b = paired([*DMKD, "list"], torch_, args.repeat)
        row("`dmkd list`", a, "`import torch`", b, "≤ torch + 1 s")
    with tempfile.TemporaryDirectory() as tmp:
        if "report" not in skip:
            report_rows(args.repeat, Path(tmp))
    if "methods" not in skip:
        method_rows(args.max_train)
    if args.full:
        for script, target in (("scripts/quick.sh", "≤ 6 min in all"), ("scripts/test.sh", "≤ 10 min")):
            w, c = once(["bash", script])
            print(f"| `bash {script}` | {w:.0f} s wall, {c:.0f} s CPU | - | - | {target} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
