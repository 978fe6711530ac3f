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
    """The final table of a run or suite per (scenario, setting, method): mean over seeds of every
    console column of the registry (harness/engine/record.py), each written by its kind (0.816, 478 k,
    127 GFLOP, 1.79 GiB, 6.31 s), and the 95% Student-t half-width of the final accuracy (blank for
    one seed). Without pandas (minimal installs) one plain line per run."""
    import math

    from harness.engine.record import RunRecord, codes_of, columns

    try:
        import pandas as pd
    except ImportError:
        pd = None

    if pd is not None:
        from reports.tables import row_label, t_half_width
    else:  # reports needs pandas and scipy; the plain lines need only the record

        def row_label(r):
            return r.get("label")

    cols = columns("console")
    rows = []
    by_row: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if isinstance(r, dict) and r.get("status") == "finished":
            by_row.setdefault((str(r.get("scenario")), row_label(r)), []).append(r)
    mixed = {k for k, rr in by_row.items() if len(codes_of(rr)) > 1}  # tasks run under different code
    for r in records:
        rec = RunRecord.from_dict(r, f"of run {r.get('key')}") if isinstance(r, dict) else r
        if rec.status != "finished":
            rows.append({"scenario": rec.scenario, "setting": "-", "method": rec.label, "seed": rec.seed,
                         cols[0].name: float("nan"), "status": rec.status})
            continue
        for s in rec.metrics or {}:
            label = row_label(r) + (" ‡" if (rec.scenario, row_label(r)) in mixed else "")
            row: dict[str, Any] = {"scenario": rec.scenario, "setting": s, "method": label, "seed": rec.seed}
            for c in cols:
                v = c.value(rec, s)
                row[c.name] = float("nan") if v is None else v
            rows.append(row | {"status": "finished"})
    if not rows:
        print("no runs")
        return
    kind_of = {c.name: c for c in cols}
    if pd is None:  # minimal installs (the GPU machine): one plain line per row
        for row in rows:
            print("  ".join(f"{kind_of[k].header}={kind_of[k].fmt(v)}" if k in kind_of else f"{k}={v}"
                            for k, v in row.items()))
        return
    df = pd.DataFrame(rows)
    num = [c.name for c in cols if c.name in df]
    g = df.groupby(["scenario", "setting", "method"], sort=False)
    means = g[num].mean()
    table = pd.DataFrame(index=means.index)
    table["seeds"] = g.size()
    first = kind_of.get("final_avg_acc", cols[0])
    std = g[first.name].std(ddof=1)
    half = [t_half_width(sd, int(n)) if n > 1 and not math.isnan(sd) else float("nan")
            for sd, n in zip(std, table["seeds"])]
    for name in num:
        table[name] = [kind_of[name].fmt(v) for v in means[name]]
        if name == first.name:
            table["±95%"] = ["" if math.isnan(h) else kind_of[name].fmt(h) for h in half]
    table = table.replace("–", "").rename(columns={c.name: c.header for c in cols})
    with pd.option_context("display.max_rows", 500, "display.width", 250):
        print(table.to_string(na_rep=""))
    kinds = sorted({str((r.get("costs") or {}).get("peak_memory_kind")) for r in records
                    if r.get("status") == "finished"})
    if kinds:
        print(f"±95%: half-width of the 95% Student-t interval of {first.header} over seeds (blank: one seed); "
              f"peak: the run's own ({', '.join(kinds)}); persistent: bytes carried from task to task; "
              "budget: share of the memory budget")
    if mixed:
        print("‡: the row's tasks ran under different code (each task's code is in its record); its numbers mix "
              "those versions")
