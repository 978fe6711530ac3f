"""The `dmkd` command: list, run, suite, report, tune, ablate.

Errors a user can cause print one line (``error: <problem> — <fix>``) and exit with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from harness.errors import UserError

DEFAULT_RESULTS = "results"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"error: {message} — see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(2)


def _parse_value(text: str) -> Any:
    from harness.yamlio import load_yaml_text

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
    from harness.api import Protocol
    from harness.runner import resolve_method
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=os.environ.get("DMKD_RESULTS", DEFAULT_RESULTS),
                   help="results folder (JSON records, checkpoints, MLflow sqlite store)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite under --results; 'none' disables)")
    p.add_argument("--data-root", default=None, help="folder with the data sets (else $DMKD_DATA, then defaults)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dmkd", description="dmkd-bench: continual-learning benchmark harness")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    ls = sub.add_parser("list", help="methods, scenarios and backbones")
    ls.add_argument("--method", default=None, help="print this method's options: default, meaning, source")

    r = sub.add_parser("run", help="run one method on one scenario")
    r.add_argument("--method", required=True)
    r.add_argument("--scenario", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--epochs", type=int, default=None)
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="method/scenario/protocol option")
    r.add_argument("--experiment", default="adhoc")
    r.add_argument("--download", action="store_true",
                   help="fetch missing CIFAR-10/100 with torchvision's download (online machines only)")
    r.add_argument("--nodes-backend", default=None, choices=["inprocess", "distributed"],
                   help="decentralized methods: run nodes in one process or one process per node (torchrun)")
    _common(r)

    s = sub.add_parser("suite", help="run a suite YAML (methods x scenarios x seeds); resumable")
    s.add_argument("config")
    s.add_argument("--tuned", action="store_true", help="use the best parameters saved by `dmkd tune`")
    s.add_argument("--defaults", action="store_true",
                   help="run every method's documented defaults even where tuned settings are checked in")
    s.add_argument("--tuned-dir", default=None,
                   help="folder of `dmkd tune-suite` files (default: <suite folder>/tuned/<suite name>)")
    s.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    from harness.launch import add_suite_options

    add_suite_options(s)
    _common(s)

    rep = sub.add_parser("report", help="write LEADERBOARD.md and report.html from recorded runs")
    rep.add_argument("--experiment", default=None)
    rep.add_argument("--out", default=None)
    _common(rep)

    t = sub.add_parser("tune", help="Optuna study on the validation split")
    t.add_argument("--method", required=True)
    t.add_argument("--scenario", required=True)
    t.add_argument("--trials", type=int, default=20)
    t.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite under --results)")
    t.add_argument("--study", default=None)
    t.add_argument("--seeds", default="0", help="comma-separated seeds averaged per trial")
    t.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    t.add_argument("--objective", default="auto", choices=["auto", "class_il", "task_il", "domain_il"],
                   help="setting whose validation accuracy is maximised (auto: class-IL, or domain-IL)")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--set", action="append", metavar="KEY=VALUE")
    _common(t)

    ts = sub.add_parser("tune-suite", help="tune every method of a suite with one budget; write configs/tuned/")
    ts.add_argument("config")
    ts.add_argument("--trials", type=int, default=20, help="trials per (method row, scenario), the same for all")
    ts.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler, the same for all")
    ts.add_argument("--seeds", default=None, help="comma-separated run seeds per trial (default: the suite's first)")
    ts.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    ts.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite under --results)")
    ts.add_argument("--out", default=None, help="output folder (default: <suite folder>/tuned/<suite name>)")
    _common(ts)
    g = sub.add_parser("synth", help="write a synthetic data set in its real on-disk format and size")
    g.add_argument("name", help="cifar10, cifar100, tinyimagenet, pacs, officehome or all")
    g.add_argument("--out", required=True, help="data root to write under (then pass it as --data-root)")
    g.add_argument("--scale", type=float, default=1.0, help="fraction of the real image counts (default 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    a = sub.add_parser("ablate", help="grid over DMKD's switches (Optuna GridSampler)")
    a.add_argument("config")
    a.add_argument("--storage", default=None)
    _common(a)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # An unreachable tracking server must cost seconds, not minutes of MLflow's retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        print(e.line(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept, unfinished ones resume from their checkpoint", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "list":
        if getattr(args, "method", None):
            from harness.defaults import method_table

            print(method_table(args.method), end="")
            return 0
        return cmd_list()
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "suite":
        return cmd_suite(args)
    if args.cmd == "report":
        return cmd_report(args)
    if args.cmd == "tune":
        from harness.tune import cmd_tune

        return cmd_tune(args)
    if args.cmd == "tune-suite":
        from harness.tune import cmd_tune_suite

        return cmd_tune_suite(args)
    if args.cmd == "synth":
        return cmd_synth(args)
    if args.cmd == "ablate":
        from harness.tune import cmd_ablate

        return cmd_ablate(args)
    raise UserError(f"unknown command {args.cmd}")


def cmd_synth(args) -> int:
    from scenarios.synth import generate

    counts = generate(args.name, Path(args.out), args.scale, args.seed)
    for name, c in counts.items():
        print(f"{name}: {', '.join(f'{k} {v:,}' for k, v in c.items())} images (synthetic) under {args.out}")
    return 0


def cmd_list() -> int:
    import methods  # noqa: F401
    import scenarios  # noqa: F401
    from harness.api import METHODS
    from harness.backbones import BACKBONES
    from scenarios.base import SCENARIOS

    print("methods:")
    for name, cls in sorted(METHODS.items()):
        print(f"  {name:<14} {cls.DESCRIPTION or (cls.__doc__ or '').strip().splitlines()[0]}")
    print("scenarios:")
    for name, sp in SCENARIOS.items():
        print(f"  {name:<20} {sp.description}  [backbone {sp.default_backbone}{'' if sp.runs_on_cpu else ', GPU'}]")
    print("backbones:")
    for name in BACKBONES:
        print(f"  {name}")
    return 0


def _store(args, experiment: str):
    from harness.tracking import Store

    return Store(Path(args.results), experiment, args.tracking_uri)


def cmd_run(args) -> int:
    from harness.api import Protocol, hparams_from
    from harness.runner import RunSpec
    from harness.suite import execute, validate_specs

    m_set, s_set, p_set = route_sets(parse_sets(args.set), args.method, args.scenario)
    if args.download:
        from scenarios.base import scenario_option_names

        if "download" not in scenario_option_names(args.scenario):
            raise UserError(f"--download is not available for {args.scenario}",
                            "only split-cifar10 and split-cifar100 download; the error of a missing data set "
                            "says what to fetch for the others")
        s_set["download"] = True
    if args.epochs is not None:
        p_set["epochs"] = args.epochs
    if args.nodes_backend:
        m_set.setdefault("backend", args.nodes_backend)
    protocol = hparams_from(Protocol, p_set)
    spec = RunSpec(args.method, args.scenario, args.seed, m_set, s_set, protocol, device=args.device,
                   data_root=args.data_root)
    validate_specs([spec])
    rank = int(os.environ.get("RANK", "0"))
    if args.nodes_backend == "distributed" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_distributed(spec, args, rank)
    store = _store(args, args.experiment)
    from harness.runner import get_scenario

    get_scenario(spec)  # data problems surface here, before anything is recorded
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"{spec.method_label()} on {spec.scenario}", unit="task", file=sys.stderr)

    def prog(k, T, record):
        bar.total = T
        bar.n = k
        bar.refresh()

    try:
        rec = execute(spec, store, progress=prog)
    finally:
        bar.close()
    if rec.get("reused"):
        print(f"this exact configuration has already run to the end; its record is kept as it is "
              f"(delete {store.record_path(spec.key())} to run it again)", file=sys.stderr)
    print_records([rec])
    print(f"record: {store.record_path(spec.key())}")
    return 0 if rec.get("status") == "finished" else 1


def _run_distributed(spec, args, rank: int) -> int:
    """Under torchrun: every rank trains its node; rank 0 alone records the run (JSON + MLflow)."""
    import torch.distributed as dist

    from harness.runner import run
    from harness.suite import execute

    try:
        if rank == 0:
            store = _store(args, args.experiment)
            # No checkpoints: a resumable state would need every rank's node state.
            rec = execute(spec, store, resume=False, checkpoint=False)
            print_records([rec])
            print(f"record: {store.record_path(spec.key())}")
        else:
            rec = run(spec)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if rec.get("status") == "finished" else 1


def cmd_suite(args) -> int:
    from harness.launch import cmd_suite as launch

    return launch(args)


def _write_report(args, experiment: str | None, out: str | None = None) -> None:
    try:
        from reports.build import report_from_results
    except ImportError:
        print("(report package not available; skipping the report)", file=sys.stderr)
        return
    from harness.errors import redact
    from harness.tracking import NO_MLFLOW, tracking_reachable

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


def cmd_report(args) -> int:
    _write_report(args, args.experiment, args.out)
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
