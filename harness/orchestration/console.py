"""What a command prints at its end: the table of its runs, and the report it writes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from harness.core.errors import UserError


def write_report(args, experiment: str | None, out: str | None = None) -> None:
    try:
        from reports.build import report_from_results
    except ImportError:
        print("(report package not available; skipping the report)", file=sys.stderr)
        return
    from harness.core.errors import redact
    from harness.orchestration.tracking import NO_MLFLOW, tracking_reachable

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and (Path(args.results) / "mlflow.db").exists():
        uri = f"sqlite:///{(Path(args.results) / 'mlflow.db').resolve()}"
    if uri in NO_MLFLOW:
        uri = None  # JSON records only
    if uri is not None and not tracking_reachable(uri):
        print(f"warning: the MLflow server {redact(uri)} does not answer; the report uses the JSON records",
              file=sys.stderr)
        uri = None
    try:
        paths = report_from_results(Path(args.results), experiment=experiment, out=out, tracking_uri=uri)
    except UserError:
        raise
    except OSError as e:
        where = out or Path(args.results) / "report"
        raise UserError(f"cannot write the report to {where} ({e.strerror or e})",
                        "pass a writable folder with --out") from None
    except Exception as e:  # noqa: BLE001 - an unreadable tracking store must not cost the report
        print(f"warning: reading runs from MLflow at {redact(uri)} failed ({type(e).__name__}); using the JSON "
              "records", file=sys.stderr)
        try:
            paths = report_from_results(Path(args.results), experiment=experiment, out=out, tracking_uri=None)
        except OSError as e2:
            raise UserError(f"cannot write the report to {out or Path(args.results) / 'report'} "
                            f"({e2.strerror or e2})", "pass a writable folder with --out") from None
    for name, p in (paths or {}).items():
        print(f"{name}: {p}")


def print_records(records: list[dict[str, Any]]) -> None:
    """The final table of a run or suite per (scenario, setting, method): mean over seeds, the 95%
    Student-t half-width of the final accuracy (blank for one seed), measured passes per task, the
    run's own peak memory and the analytic footprint. Without pandas (minimal installs) one plain
    line per run."""
    import math

    try:
        import pandas as pd
    except ImportError:
        pd = None

    if pd is not None:
        from reports.tables import passes_of, row_label, t_half_width
    else:  # reports needs pandas and scipy; the plain lines need only the record

        def passes_of(r):
            p = r.get("costs", {}).get("passes_per_task")
            return None if p is None else [p]

        def row_label(r):
            return r.get("label")

    rows = []
    for r in records:
        if r.get("status") != "finished":
            rows.append({"scenario": r.get("scenario"), "setting": "-", "method": r.get("label"),
                         "seed": r.get("seed"), "final_acc": float("nan"), "status": r.get("status")})
            continue
        c = r["costs"]
        passes = passes_of(r)
        for s, m in r["metrics"].items():
            rows.append({"scenario": r["scenario"], "setting": s, "method": row_label(r), "seed": r["seed"],
                         "final_acc": m["final_avg_acc"], "avg_inc_acc": m["avg_inc_acc"],
                         "forgetting": m["forgetting"], "bwt": m["bwt"], "fwt": m.get("fwt", float("nan")),
                         "passes/task": float("nan") if passes is None else sum(passes) / len(passes),
                         "params": c["params_total"], "train_GFLOPs": c["train_flops_total"] / 1e9,
                         "peak_MiB": c.get("peak_memory_bytes", float("nan")) / 2**20,
                         "footprint_MiB": c.get("footprint_bytes", float("nan")) / 2**20,
                         "train_s": c["train_time_s"], "status": "finished"})
    if not rows:
        print("no runs")
        return
    if pd is None:  # minimal installs (the GPU machine): one plain line per row
        for row in rows:
            print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return
    df = pd.DataFrame(rows)
    num = [c for c in ("final_acc", "avg_inc_acc", "forgetting", "bwt", "fwt", "passes/task", "params", "train_GFLOPs",
                       "peak_MiB", "footprint_MiB", "train_s") if c in df]
    g = df.groupby(["scenario", "setting", "method"], sort=False)
    table = g[num].mean()
    table.insert(0, "seeds", g.size())
    std = g["final_acc"].std(ddof=1)
    table.insert(2, "±95%", [t_half_width(sd, int(n)) if n > 1 and not math.isnan(sd) else float("nan")
                             for sd, n in zip(std, table["seeds"])])
    with pd.option_context("display.max_rows", 500, "display.width", 220, "display.float_format", "{:.4f}".format):
        print(table.to_string(na_rep=""))
    kinds = sorted({str(r.get("costs", {}).get("peak_memory_kind")) for r in records if r.get("status") == "finished"})
    if kinds:
        print(f"±95%: half-width of the 95% Student-t interval of final_acc over seeds (blank: one seed); "
              f"peak: the run's own ({', '.join(kinds)}); footprint: parameters + buffers + method state")
