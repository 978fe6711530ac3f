"""Launching suite workers: in this process, as N local processes, or as Slurm jobs (submitit).

Every worker runs the same loop (harness/orchestration/cluster.py) against the same Optuna storage and results
folder, so the launchers differ only in where the processes start:

- ``--workers N`` (``auto``: as many as fit the cores): N local processes, each with
  ``cores // N`` threads (OMP_NUM_THREADS and torch's intra-op threads), so N x threads fits;
- ``--workers-per-gpu K``: K workers on each visible GPU, each seeing one (CUDA_VISIBLE_DEVICES);
- ``--launcher slurm``: N Slurm array tasks submitted through submitit (partition, time, GPUs and
  CPUs per worker, array parallelism); the results folder and the storage must be on storage all
  nodes share (a journal file on a shared file system, or PostgreSQL). ``--launcher submitit-local``
  runs the same code path through submitit's local executor, without a scheduler (used by tests).

The launching process waits for its workers, then prints the suite's table and the wall time and
writes the report, as a single worker does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.core.errors import UserError

LAUNCHERS = ("local", "slurm", "submitit-local")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return []


def n_workers(workers: str, n_cells: int, cores: int) -> int:
    """--workers as a number: 'auto' is as many as fit the cores (never more than the runs)."""
    if workers == "auto":
        return max(1, min(cores, n_cells))
    try:
        n = int(workers)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--workers must be a whole number >= 1 or 'auto', got {workers!r}", "e.g. --workers 2")
    return n


def plan_workers(workers: str, per_gpu: int | None, n_cells: int, cores: int | None = None,
                 gpus: list[str] | None = None) -> list[dict[str, str]]:
    """One environment per local worker: its thread count (cores // workers) and, with per_gpu, its GPU."""
    cores = cores or available_cores()
    devices: list[str] = []
    if per_gpu is not None:
        if per_gpu < 1:
            raise UserError(f"--workers-per-gpu must be >= 1, got {per_gpu}", "e.g. --workers-per-gpu 2")
        gpus = visible_gpus() if gpus is None else gpus
        if not gpus:
            raise UserError("--workers-per-gpu: no GPU is visible", "run on a GPU machine or use --workers N")
        devices = [g for g in gpus for _ in range(per_gpu)]  # K workers packed on each GPU
        n = len(devices)
    else:
        n = n_workers(workers, n_cells, cores)
    threads = max(1, cores // n)
    out = []
    for i in range(n):
        env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[i]
        out.append(env)
    return out


def worker_argv(args: argparse.Namespace, threads: int | None) -> list[str]:
    """The `dmkd suite` arguments of one launched worker (paths made absolute)."""
    argv = ["suite", str(Path(args.config).resolve()), "--results", str(Path(args.results).resolve()), "--worker",
            "--heartbeat", str(args.heartbeat), "--grace", str(args.grace), "--device", args.device,
            "--on-code-change", args.on_code_change]
    for opt, val in (("--storage", args.storage), ("--tracking-uri", args.tracking_uri),
                     ("--data-root", args.data_root)):
        if val is not None:
            argv += [opt, val]
    if args.tuned:
        argv.append("--tuned")
    if args.defaults:
        argv.append("--defaults")
    if args.tuned_dir is not None:
        argv += ["--tuned-dir", str(Path(args.tuned_dir).resolve())]
    if getattr(args, "budget", None) is not None:
        argv += ["--budget", args.budget]
    for opt, val in (("--protocol", getattr(args, "protocol", None)), ("--first-tasks", getattr(args, "first_tasks", None)),
                     ("--sampler-seed", getattr(args, "sampler_seed", None))):
        if val is not None:
            argv += [opt, str(val)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv


def set_threads(n: int | None) -> None:
    if n is None:
        return
    import torch

    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[k] = str(n)
    torch.set_num_threads(n)


def cmd_suite(args: argparse.Namespace) -> int:
    """`dmkd suite`: work in this process, or launch workers and collect the suite when they end."""
    import importlib.util

    from harness.orchestration.suite import check_heartbeat, load_suite, run_sequential
    from harness.orchestration.tracking import Store

    t0 = time.monotonic()
    heartbeat, grace = check_heartbeat(args.heartbeat, args.grace)
    from harness.engine.budget import use_probe_cache

    use_probe_cache(Path(args.results) / "budget_probes.json")  # shared by the workers of the suite
    cfg = load_suite(args.config, getattr(args, "budget", None))
    cfg.on_code_change = args.on_code_change
    if args.data_root:
        cfg.data_root = args.data_root
    if args.device != "auto":
        cfg.device = args.device
    if args.tuned and args.defaults:
        raise UserError("--tuned and --defaults contradict each other", "pass one of them")
    if args.tuned:
        from harness.orchestration.tuned import load_best_params

        cfg.tuned = load_best_params(Path(args.results), cfg)
    elif not args.defaults:
        from harness.orchestration.tuned import load_tuned_suite, tuned_dir, tuning_from_args

        tuning = tuning_from_args(args, cfg)
        where = tuned_dir(cfg, args.tuned_dir, tuning, getattr(args, "sampler_seed", 0) or 0)
        cfg.tuned = load_tuned_suite(cfg, where)
        if cfg.tuned and not args.worker:
            print(f"using tuned settings ({tuning.slug}) from {where} for {len(cfg.tuned)} (row, scenario) pairs "
                  "(--defaults runs the documented defaults)", file=sys.stderr)
        elif not cfg.tuned and args.tuned_dir:
            raise UserError(f"no tuned settings for this suite under {where}", "run `dmkd tune-suite` first")
    specs = cfg.specs()
    if not args.worker:
        from harness.orchestration.suite import preflight

        preflight(specs)  # every scenario builds before the first run trains
    local = args.workers == "1" and args.workers_per_gpu is None
    if importlib.util.find_spec("optuna") is None:  # a minimal install: one worker, in suite order
        if not (local and args.launcher == "local" and args.storage is None):
            raise UserError("optuna is not installed, and it is what coordinates several workers",
                            "pip install optuna, or run one worker without --storage")
        set_threads(args.threads)
        run_sequential(cfg, Store(Path(args.results), cfg.experiment, args.tracking_uri),
                       show_progress=not args.worker)
        return _finish(args, cfg, specs, t0, f"1 worker without a coordinator, {_threads_now()} thread(s)")
    from harness.orchestration.cluster import prepare, run_suite

    if args.launcher != "local":
        prepare(cfg, Store(Path(args.results), cfg.experiment, "none"), args.storage, heartbeat, grace)
        return _slurm(args, cfg, specs, t0)
    if local:
        set_threads(args.threads)
        store = Store(Path(args.results), cfg.experiment, args.tracking_uri)
        run_suite(cfg, store, storage_url=args.storage, heartbeat=heartbeat, grace=grace,
                  show_progress=not args.worker)
        return 0 if args.worker else _finish(args, cfg, specs, t0, f"1 worker, {_threads_now()} thread(s)")
    plan = plan_workers(args.workers, args.workers_per_gpu, len(specs))
    prepare(cfg, Store(Path(args.results), cfg.experiment, "none"), args.storage, heartbeat, grace)
    threads = int(plan[0]["OMP_NUM_THREADS"])
    procs = []
    print(f"starting {len(plan)} workers x {threads} thread(s) on {available_cores()} cores", file=sys.stderr)
    for env in plan:
        e = dict(os.environ, **env)
        procs.append(subprocess.Popen([sys.executable, "-m", "harness.cli", *worker_argv(args, threads)], env=e))
    try:
        _wait(procs, cfg, specs, args, show=not args.worker)
    except KeyboardInterrupt:
        for p in procs:
            p.wait()
        raise
    codes = [p.returncode for p in procs]
    if args.worker:
        return 0 if all(c == 0 for c in codes) else 1
    return _finish(args, cfg, specs, t0, f"{len(plan)} workers x {threads} thread(s)", codes)


def _threads_now() -> int:
    import torch

    return torch.get_num_threads()


def _wait(procs: list[subprocess.Popen], cfg, specs, args, show: bool) -> None:
    """Wait for local workers, with one progress bar over the suite's records."""
    from tqdm.auto import tqdm

    from harness.orchestration.suite import records_done
    from harness.orchestration.tracking import Store

    store = None
    bar = tqdm(total=len(specs), desc=f"suite {cfg.name}", unit="run", disable=not show, file=sys.stderr)
    while any(p.poll() is None for p in procs):
        time.sleep(1.0)
        if store is None and (Path(args.results) / cfg.experiment / "runs").is_dir():
            store = Store(Path(args.results), cfg.experiment, "none")
        if store is not None:
            n = len(specs) - len(records_done(store, specs)[1])
            if n != bar.n:
                bar.n = n
                bar.refresh()
    bar.close()


def _finish(args, cfg, specs, t0: float, how: str, codes: list[int] | None = None) -> int:
    """The suite's table, report and wall time, once its workers have ended."""
    from harness.orchestration.console import print_records, write_report
    from harness.orchestration.suite import records_done
    from harness.orchestration.tracking import Store

    store = Store(Path(args.results), cfg.experiment, "none")
    records, left = records_done(store, specs)
    print_records(records)
    if left:
        bad = [c for c in (codes or []) if c != 0]
        print(f"error: {len(left)} of {len(specs)} runs are not finished"
              + (f" (worker exit status {', '.join(map(str, bad))})" if bad else "")
              + " — run the same command again: they resume from their checkpoints", file=sys.stderr)
    elif not args.no_report:
        write_report(args, cfg.experiment)
    print(f"wall time: {time.monotonic() - t0:.1f} s ({how}, {len(specs)} runs)")
    failed = [r for r in records if r.get("status") == "failed"]
    return 1 if failed or left else 0


# ---------------------------------------------------------------------------------------------
# Slurm through submitit
# ---------------------------------------------------------------------------------------------
class SuiteWorker:
    """One Slurm (or submitit-local) job: a suite worker using the CPUs the job was given.

    submitit calls ``checkpoint`` when Slurm warns that the job's time limit is near (or that it is
    preempted) and then requeues the job: the worker process is ended, its cell is taken over from
    its last task checkpoint (by the other workers, or by this job when it starts again), and the
    requeued job works on whatever cells are left. Nothing else needs saving: the storage holds the
    queue, the results folder the checkpoints."""

    def __init__(self, argv: list[str], cpus: int) -> None:
        self.argv, self.cpus = list(argv), cpus

    def __call__(self) -> int:
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK") or self.cpus)
        rc = subprocess.run([sys.executable, "-m", "harness.cli", *self.argv, "--threads", str(max(1, threads))],
                            check=False).returncode
        if rc != 0:
            raise RuntimeError(f"suite worker exited with status {rc}")
        return rc

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SuiteWorker(self.argv, self.cpus))


def signal_delay_s(time_min: int) -> int:
    """Seconds before the time limit at which Slurm tells a job to requeue itself: submitit's 90 s,
    or half of a limit under 3 minutes (Slurm acts on time limits about every 30 s, so the warning
    then still comes before the end)."""
    return max(5, min(90, time_min * 30))


def _slurm(args, cfg, specs, t0: float) -> int:
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm needs submitit", "pip install submitit") from None
    workers = n_workers(args.workers, len(specs), len(specs))  # 'auto': one job per run
    storage = args.storage or ""
    if args.launcher == "slurm" and not storage.startswith(("postgresql", "mysql", "journal:")):
        print("warning: the default sqlite storage is unreliable on a network file system; pass "
              "--storage journal:<file on shared storage> or --storage postgresql://...", file=sys.stderr)
    folder = Path(args.results).resolve() / "submitit" / cfg.name
    cluster = "slurm" if args.launcher == "slurm" else "local"
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {"timeout_min": args.time, "cpus_per_task": args.cpus_per_worker,
                              "name": f"dmkd-{cfg.name}"[:60]}
    if cluster == "slurm":
        params["slurm_signal_delay_s"] = signal_delay_s(args.time)
    if args.gpus_per_worker:
        params["gpus_per_node"] = args.gpus_per_worker
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.array_parallelism:
        params["slurm_array_parallelism"] = args.array_parallelism
    ex.update_parameters(**params)
    base = worker_argv(args, None)
    if args.workers_per_gpu:
        base += ["--workers-per-gpu", str(args.workers_per_gpu)]
    jobs = ex.submit_array([SuiteWorker(base, args.cpus_per_worker) for _ in range(workers)])
    print(f"submitted {len(jobs)} worker job(s) through submitit ({cluster}): "
          f"{', '.join(j.job_id for j in jobs)}; logs under {folder}", file=sys.stderr)
    if args.no_wait:
        print("the workers run on; `dmkd report` (or this command again) collects the suite", file=sys.stderr)
        return 0
    idle = _wait_jobs(jobs, cfg, specs, args) if cluster == "slurm" else set()
    codes = []
    for j in jobs:
        if j.job_id in idle:
            codes.append(0)
            continue
        try:
            codes.append(j.result())
        except Exception as e:  # noqa: BLE001 - a worker failed; the others may have done its runs
            print(f"worker job {j.job_id} failed: {str(e).strip().splitlines()[-1][:300]}", file=sys.stderr)
            codes.append(1)
    return _finish(args, cfg, specs, t0, f"{len(jobs)} {cluster} worker job(s)", codes)


def _wait_jobs(jobs, cfg, specs, args, poll_s: float = 5.0) -> set[str]:
    """Wait for the Slurm jobs. Once every cell is done, a job still waiting in the queue (one that
    requeued itself at its time limit, say) would only start to find nothing left: it is cancelled.
    Returns the ids of the jobs cancelled so."""
    from harness.orchestration.suite import records_done
    from harness.orchestration.tracking import Store

    store = Store(Path(args.results), cfg.experiment, "none")
    cancelled: set[str] = set()
    while not all(j.job_id in cancelled or j.done(force_check=True) for j in jobs):
        time.sleep(poll_s)
        if records_done(store, specs)[1]:
            continue
        for j in jobs:
            if j.job_id not in cancelled and j.get_info(mode="force").get("State") in ("PENDING", "REQUEUED"):
                j.cancel(check=False)
                cancelled.add(j.job_id)
                print(f"worker job {j.job_id} was queued to start again with no cell left to run: cancelled",
                      file=sys.stderr)
    return cancelled
