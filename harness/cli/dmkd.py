"""The `dmkd` command: list, run, suite, report, tune, ablate.

Errors a user can cause print one line (``error: <problem> — <fix>``) and exit with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.core.errors import UserError
from harness.orchestration.console import print_records, write_report
from harness.orchestration.overrides import parse_sets, route_sets

DEFAULT_RESULTS = "results"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"error: {message} — see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=os.environ.get("DMKD_RESULTS", DEFAULT_RESULTS),
                   help="results folder (JSON records, checkpoints, MLflow sqlite store)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite under --results; 'none' disables)")
    p.add_argument("--data-root", default=None, help="folder with the data sets (else $DMKD_DATA, then defaults)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def _code_change(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-code-change", default="refuse", choices=["refuse", "restart", "resume"],
                   help="a checkpoint written by other code (another git revision or edited sources): refuse "
                        "(default, one line), restart from task 0, or resume with each task's code recorded")


def add_suite_options(s: argparse.ArgumentParser) -> None:
    """The `dmkd suite` options for coordination and launching."""
    from harness.orchestration.launch import LAUNCHERS
    from harness.orchestration.retry import GRACE_S, HEARTBEAT_S

    s.add_argument("--storage", default=None,
                   help="Optuna storage that coordinates the workers: sqlite under --results (default), "
                        "journal:<file> on a shared file system, postgresql://... across machines")
    s.add_argument("--heartbeat", default=str(HEARTBEAT_S),
                   help=f"seconds between a worker's heartbeats (default {HEARTBEAT_S})")
    s.add_argument("--grace", default=str(GRACE_S),
                   help=f"seconds of silence after which a worker's run is taken over (default {GRACE_S})")
    s.add_argument("--workers", default="1",
                   help="worker processes to start (default 1: this process); 'auto': as many as fit the cores")
    s.add_argument("--workers-per-gpu", type=int, default=None, metavar="K",
                   help="start K workers on each visible GPU (each sees only its GPU)")
    s.add_argument("--launcher", default="local", choices=LAUNCHERS,
                   help="local processes, Slurm jobs through submitit, or submitit's local executor")
    s.add_argument("--partition", default=None, help="Slurm partition")
    s.add_argument("--time", type=int, default=240, help="Slurm time limit per worker, minutes (default 240)")
    s.add_argument("--gpus-per-worker", type=int, default=0, help="Slurm: GPUs per worker job (default 0)")
    s.add_argument("--cpus-per-worker", type=int, default=2, help="Slurm: CPUs per worker job (default 2)")
    s.add_argument("--array-parallelism", type=int, default=None,
                   help="Slurm: at most this many of the --workers array tasks run at once")
    s.add_argument("--no-wait", action="store_true", help="Slurm: exit after submitting the workers")
    s.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a launched worker: no table
    s.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)


def _tuning_options(p: argparse.ArgumentParser, what: str) -> None:
    from harness.core.streams import PROTOCOLS

    p.add_argument("--protocol", default=None, choices=PROTOCOLS,
                   help=f"tuning protocol: {what}; see docs/tuning.md")
    p.add_argument("--first-tasks", type=int, default=None, metavar="K",
                   help="first-tasks: the number K of tasks tuning may read")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dmkd", description="dmkd-bench: continual-learning benchmark harness")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    ls = sub.add_parser("list", help="methods, scenarios and backbones")
    ls.add_argument("--method", default=None, help="print this method's options: default, accepts, search, meaning, source")
    ls.add_argument("--scenario", default=None, help="print this scenario's options")
    ls.add_argument("--protocol", action="store_true", help="print the protocol's fields")

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
    _code_change(r)
    _common(r)

    s = sub.add_parser("suite", help="run a suite YAML (methods x scenarios x seeds); resumable")
    s.add_argument("config")
    s.add_argument("--tuned", action="store_true", help="use the best parameters saved by `dmkd tune`")
    s.add_argument("--defaults", action="store_true",
                   help="run every method's documented defaults even where tuned settings are checked in")
    s.add_argument("--tuned-dir", default=None,
                   help="folder of `dmkd tune-suite` files (default: <suite folder>/tuned/<suite name>)")
    s.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    s.add_argument("--budget", default=None, metavar="MEMORY",
                   help="persistent-memory budget instead of the file's: none, aligned or a size such as 8MiB "
                        "(its own experiment and tuned settings)")
    _tuning_options(s, "which tuned files to run: those of tuning protocol P (default: the suite file's "
                    "tuning:, else end-of-stream)")
    s.add_argument("--sampler-seed", type=int, default=0,
                   help="run the tuned files of this TPE sampler seed (default 0)")
    _code_change(s)
    add_suite_options(s)
    _common(s)

    rep = sub.add_parser("report", help="write LEADERBOARD.md and report.html from recorded runs")
    rep.add_argument("--experiment", default=None)
    rep.add_argument("--out", default=None)
    _common(rep)

    sy = sub.add_parser("sync", help="copy into MLflow the recorded runs it lacks (a tracking server that was down)")
    sy.add_argument("--experiment", default=None, help="one experiment (default: every one under --results)")
    _common(sy)

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
    _tuning_options(t, "the stream the trials learn and are scored on (default end-of-stream)")
    _common(t)

    ts = sub.add_parser("tune-suite", help="tune every method of a suite with one budget; write configs/tuned/")
    ts.add_argument("config")
    ts.add_argument("--trials", type=int, default=20, help="trials per (method row, scenario), the same for all")
    ts.add_argument("--sampler-seed", default="0",
                    help="seed(s) of the TPE sampler, the same for all rows; 0,1,2 tunes once per seed, each into "
                         "its own folder (<protocol>/seed<S>/)")
    _tuning_options(ts, "the stream every row is tuned on (default: the suite file's tuning:, else end-of-stream)")
    ts.add_argument("--workers", default="1",
                    help="processes that share the rows (each row's study runs whole in one; the files do not "
                         "depend on it)")
    ts.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (default 1; part of the recorded command: float rounding "
                         "depends on it)")
    ts.add_argument("--seeds", default=None, help="comma-separated run seeds per trial (default: the suite's first)")
    ts.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    ts.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite under --results)")
    ts.add_argument("--out", default=None, help="output folder (default: <suite folder>/tuned/<suite name>)")
    ts.add_argument("--scenario", default=None,
                    help="tune only this scenario of the suite (one process per scenario: no study is shared)")
    ts.add_argument("--budget", default=None, metavar="MEMORY",
                    help="persistent-memory budget instead of the file's: none, aligned or a size such as 8MiB")
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
    _code_change(a)
    _common(a)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # An unreachable tracking server must cost seconds, not minutes of MLflow's retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # A tracking server's client would print a "View run" link for every run it ends; the table is the output.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
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
        from harness.cli.defaults import method_table, protocol_table, scenario_table

        tables = ([method_table(args.method)] if args.method else []) + (
            [scenario_table(args.scenario)] if args.scenario else []) + ([protocol_table()] if args.protocol else [])
        if tables:
            print("\n".join(tables), end="")
            return 0
        return cmd_list()
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "suite":
        return cmd_suite(args)
    if args.cmd == "report":
        return cmd_report(args)
    if args.cmd == "sync":
        return cmd_sync(args)
    if args.cmd == "tune":
        from harness.orchestration.tune import cmd_tune

        return cmd_tune(args)
    if args.cmd == "tune-suite":
        from harness.orchestration.tune import cmd_tune_suite

        return cmd_tune_suite(args)
    if args.cmd == "synth":
        return cmd_synth(args)
    if args.cmd == "ablate":
        from harness.orchestration.tune import cmd_ablate

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
    from harness.core.backbones import BACKBONES
    from harness.core.method import METHODS
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
    from harness.orchestration.tracking import Store

    return Store(Path(args.results), experiment, args.tracking_uri)


def cmd_run(args) -> int:
    from harness.core.config import hparams_from
    from harness.core.protocol import Protocol
    from harness.engine.runner import RunSpec
    from harness.orchestration.suite import execute, validate_specs

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
    from harness.engine.runner import get_scenario

    get_scenario(spec)  # data problems surface here, before anything is recorded
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"{spec.method_label()} on {spec.scenario}", unit="task", file=sys.stderr)

    def prog(k, T, record):
        bar.total = T
        bar.n = k
        bar.refresh()

    try:
        rec = execute(spec, store, progress=prog, on_code_change=args.on_code_change)
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

    from harness.engine.runner import run
    from harness.orchestration.suite import execute

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
    from harness.orchestration.launch import cmd_suite as launch

    return launch(args)


def cmd_report(args) -> int:
    write_report(args, args.experiment, args.out)
    return 0


def cmd_sync(args) -> int:
    """`dmkd sync`: MLflow ends up holding every finished or failed run of the JSON records."""
    from harness.core.errors import redact
    from harness.orchestration.suite import backfill_mlflow, mlflow_gaps
    from harness.orchestration.tracking import NO_MLFLOW, Store, tracking_reachable

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{(Path(args.results) / 'mlflow.db').resolve()}"
    if uri in NO_MLFLOW:
        raise UserError("dmkd sync needs an MLflow store to fill", "pass --tracking-uri http://HOST:PORT")
    if not tracking_reachable(uri):
        raise UserError(f"the MLflow server {redact(uri)} does not answer", "start it, or check --tracking-uri")
    from reports.load import experiment_dirs

    for d in experiment_dirs(Path(args.results), args.experiment):
        store = Store(Path(args.results), d.name, uri)
        records = store.records()
        copied = backfill_mlflow(store, records)
        left = mlflow_gaps(store, records)
        print(f"{d.name}: copied {len(copied)} run(s) into MLflow at {redact(uri)}"
              + (f" ({', '.join(copied)})" if copied else "")
              + (f"; {len(left)} still missing: {', '.join(left)}" if left else
                 f"; MLflow holds all {sum(r.get('status') in ('finished', 'failed') for r in records)} "
                 "finished or failed runs"))
        if left:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
