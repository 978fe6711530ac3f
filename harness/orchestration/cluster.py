"""A suite on any number of workers: its cells are the trials of one Optuna study.

A cell is one run of the suite (method configuration x scenario x seed), named by ``RunSpec.key()``.
The first worker to open the suite creates the study ``suite-<name>-<hash of the resolved cells>``
and enqueues one trial per unfinished cell (the key in the trial's user attribute ``dmkd_cell``);
every worker, on this machine or another, pops the next waiting trial from the storage and runs its
cell with :func:`harness.orchestration.suite.execute`. The storage is the only coordinator:

- sqlite under the results folder by default (one machine), ``journal:<file>`` on a shared file
  system, ``postgresql://…`` across machines (see :func:`harness.orchestration.storage.make_storage`);
- a running worker records a heartbeat every ``heartbeat`` seconds; a cell whose worker is silent
  for ``grace`` seconds is failed by the next worker that looks (``fail_stale_trials``) and
  re-enqueued (``RetryHeartbeatStaleTrialCallback``). The new worker resumes it from the dead
  worker's last task checkpoint, ``<results>/<experiment>/checkpoints/<key>.pt``, so the results
  folder must be shared by all workers;
- the JSON record decides whether a cell is done, so a suite run again skips finished cells, and
  a second copy of a cell's trial (two workers enqueueing at once) yields to the lower-numbered one:
  every cell is executed by one worker at a time and finished once.

A worker with nothing left to pull waits for the cells other workers hold, saying so, and takes
over any whose heartbeat stops: it never waits silently, and never for longer than the others
work plus ``grace``. The worker that sees the last cell done closes the suite's MLflow runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any

from harness.core.errors import UserError
from harness.orchestration.suite import DONE, GRACE_S, HEARTBEAT_S, check_heartbeat

if TYPE_CHECKING:
    from harness.engine.runner import RunSpec
    from harness.orchestration.suite import SuiteConfig
    from harness.orchestration.tracking import Store

CELL = "dmkd_cell"

try:  # Optuna >= 4.9 renamed the callback; keep working with the older name
    from optuna.storages import RetryHeartbeatStaleTrialCallback as _Retry
except ImportError:  # pragma: no cover
    from optuna.storages import RetryFailedTrialCallback as _Retry


# ---------------------------------------------------------------------------------------------
# Identity of a suite's study, heartbeat settings
# ---------------------------------------------------------------------------------------------
def cells_hash(specs: list[RunSpec]) -> str:
    """A stable hash of every resolved cell (where the data lives and the device are left out)."""
    import dataclasses

    rows = []
    for s in specs:
        d = dataclasses.asdict(s)
        d.pop("data_root", None)
        d.pop("device", None)
        rows.append({"key": s.key(), **d})
    blob = json.dumps(rows, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def study_name(cfg: SuiteConfig, specs: list[RunSpec]) -> str:
    """Two suites that differ in any resolved field (a protocol value too) never share a study."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cfg.name)[:80]
    return f"suite-{safe}-{cells_hash(specs)[:16]}"


def open_storage(url: str | None, store: Store, heartbeat: int, grace: int):
    from harness.orchestration.storage import make_storage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks heartbeats experimental
        return make_storage(url, store.results_dir, heartbeat_interval=heartbeat, grace_period=grace,
                            stale_callback=_Retry(max_retry=None))


# ---------------------------------------------------------------------------------------------
# The study of a suite
# ---------------------------------------------------------------------------------------------
def _open_study(storage, name: str, pending: list[str]):
    """Create the study and enqueue its cells once (the creator does it), or load it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = None
    if study is not None:
        for key in pending:
            study.enqueue_trial({}, user_attrs={CELL: key})
        study.set_user_attr("dmkd_enqueued", len(pending))
        return study
    for attempt in range(50):
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:  # the creator has not committed it yet
            time.sleep(0.2)
            continue
        # The creator enqueues right after creating; give it a moment, then top up ourselves.
        if "dmkd_enqueued" in study.user_attrs or attempt >= 25:
            return study
        time.sleep(0.2)
    raise UserError(f"Optuna study {name} cannot be opened", "check the storage (--storage)")


def _states(study) -> dict[str, list]:
    out: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        k = t.user_attrs.get(CELL)
        if k is not None:
            out.setdefault(k, []).append(t)
    return out


def _top_up(study, keys: list[str], store: Store) -> int:
    """Enqueue every unfinished cell that no trial waits for or runs (a crash, a user error)."""
    from optuna.trial import TrialState

    by_cell = _states(study)
    n = 0
    for key in keys:
        if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in by_cell.get(key, [])):
            continue
        # Read after the trials: a record is written before its trial completes, so a cell that
        # finished meanwhile is seen as finished here and not queued again.
        if (store.load_record(key) or {}).get("status") in DONE:
            continue
        study.enqueue_trial({}, user_attrs={CELL: key})
        n += 1
    return n


def _fail_orphans(study, storage, seen: dict[int, float], grace: int) -> None:
    """A trial popped by a worker that died before its first heartbeat has no heartbeat to go
    stale: fail it (and re-queue its cell) once it has run that long without naming its worker."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from harness.orchestration.storage import trial_id

    now = time.monotonic()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" in t.user_attrs or CELL not in t.user_attrs:
            continue
        first = seen.setdefault(t.number, now)
        if now - first <= grace:
            continue
        tid = trial_id(storage, study, t.number)
        try:
            failed = storage.set_trial_state_values(tid, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # another worker got there first
            continue
        cb = storage.get_heartbeat_stale_trial_callback()
        if failed and cb is not None:
            cb(study, storage.get_trial(tid))


def _pop(study):
    """The next waiting cell's trial, or None when no trial waits."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return None
    trial = study.ask()
    if CELL not in trial.user_attrs:  # the last waiting trial went to another worker meanwhile
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial


def _is_duplicate(study, trial, key: str) -> bool:
    """A lower-numbered trial of the same cell waits or runs: that one does the cell."""
    from optuna.trial import TrialState

    return any(t.number < trial.number and t.state in (TrialState.WAITING, TrialState.RUNNING)
               for t in _states(study).get(key, []))


def _value(rec: dict[str, Any]) -> float:
    for m in (rec.get("metrics") or {}).values():
        v = m.get("final_avg_acc")
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return 0.0


def prepare(cfg: SuiteConfig, store: Store, storage_url: str | None, heartbeat: int, grace: int) -> str:
    """Open the storage and create the suite's study with its cells queued (launchers do this
    before starting workers, so that a bad storage is one error line and workers never race)."""
    specs = cfg.specs()
    name = study_name(cfg, specs)
    storage = open_storage(storage_url, store, heartbeat, grace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _open_study(storage, name, [s.key() for s in specs if (store.load_record(s.key()) or {}).get("status")
                                    not in DONE])
    return name


# ---------------------------------------------------------------------------------------------
# The worker loop
# ---------------------------------------------------------------------------------------------
def run_suite(cfg: SuiteConfig, store: Store, *, storage_url: str | None = None, heartbeat: int = HEARTBEAT_S,
              grace: int = GRACE_S, show_progress: bool = True, poll_s: float = 2.0,
              report_s: float = 60.0) -> list[dict[str, Any]]:
    """Work on the suite's cells until every one is done; returns the records of all its cells."""
    import optuna
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    from harness.orchestration.storage import heartbeat as heartbeat_of
    from harness.orchestration.storage import trial_id
    from harness.orchestration.suite import execute

    heartbeat, grace = check_heartbeat(heartbeat, grace)
    specs = cfg.specs()
    by_key = {s.key(): s for s in specs}
    keys = list(by_key)

    def pending() -> list[str]:
        return [k for k in keys if (store.load_record(k) or {}).get("status") not in DONE]

    storage = open_storage(storage_url, store, heartbeat, grace)
    name = study_name(cfg, specs)
    study = _open_study(storage, name, pending())
    ml = store.mlflow
    suite_id = ml.find_or_create({"dmkd.kind": "suite", "dmkd.suite": cfg.name}, f"suite {cfg.name}") if ml else None
    group_ids: dict[tuple[str, str, str], str | None] = {}
    bar = tqdm(total=len(keys), desc=f"suite {cfg.name}", unit="run", disable=not show_progress, file=sys.stderr)
    last_report = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")  # we run trials with ask/tell
        optuna.storages.fail_stale_trials(study)
        _top_up(study, pending(), store)
        orphans: dict[int, float] = {}
        while True:
            optuna.storages.fail_stale_trials(study)  # a dead worker's cell goes back to the queue
            trial = _pop(study)
            if trial is None:
                left = pending()
                bar.n = len(keys) - len(left)
                bar.refresh()
                if not left:
                    break
                by_cell = _states(study)
                held = [k for k in left if any(t.state == TrialState.RUNNING for t in by_cell.get(k, []))]
                if len(held) < len(left) and _top_up(study, left, store):
                    continue  # cells that nothing waited for or ran (a crash, an error) are queued again
                _fail_orphans(study, storage, orphans, grace)
                if time.monotonic() - last_report >= report_s:
                    print(f"worker {store.worker_id}: waiting for {len(held)} cell(s) running on other workers "
                          f"({', '.join(held[:3])}{', …' if len(held) > 3 else ''}); a worker silent for "
                          f"{grace} s is taken over", file=sys.stderr)
                    last_report = time.monotonic()
                time.sleep(poll_s)
                continue
            key = trial.user_attrs[CELL]
            with heartbeat_of(storage, trial_id(storage, study, trial.number)):
                trial.set_user_attr("worker", store.worker_id)
                rec = store.load_record(key)
                if key not in by_key or _is_duplicate(study, trial, key) or (rec or {}).get("status") in DONE:
                    # A second copy of a cell (two workers queued it at once) or one done meanwhile.
                    trial.set_user_attr("duplicate", True)
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                rec = _execute(execute, study, trial, key, by_key[key], cfg, store, group_ids, suite_id,
                               show_progress)
            if rec.get("status") == "finished":
                study.tell(trial, _value(rec))
            else:
                trial.set_user_attr("run_failed", str(rec.get("error", ""))[:500])
                study.tell(trial, state=TrialState.FAIL)
            bar.n = len(keys) - len(pending())
            bar.refresh()
    bar.close()
    close_mlflow(store, cfg, keys)
    return [r for r in (store.load_record(k) for k in keys) if r is not None]


def _execute(execute, study, trial, key, spec, cfg, store, group_ids, suite_id, show_progress) -> dict[str, Any]:
    """Run one cell; an interrupt or crash hands the cell back to the queue before propagating."""
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    from harness.orchestration.suite import group_run

    ml = store.mlflow
    gkey = (spec.method_label(), spec.scenario, spec.group_hash())
    if ml is not None and gkey not in group_ids:
        group_ids[gkey] = group_run(store, cfg, spec, suite_id)
    task_bar = tqdm(desc=f"  {spec.method_label()} / {spec.scenario} / seed {spec.seed}", unit="task", leave=False,
                    disable=not show_progress, file=sys.stderr)

    def prog(k, T, record):
        task_bar.total = T
        task_bar.n = k
        task_bar.refresh()

    try:
        extra = {"suite": cfg.name, "worker": store.worker_id}
        job = slurm_job()
        if job:
            extra["slurm_job"] = job
        if cfg.reference:
            extra["reference"] = cfg.reference
        return execute(spec, store, group_ids.get(gkey), progress=prog, extra=extra,
                       on_code_change=cfg.on_code_change)
    except BaseException as e:
        # Back to the queue: another worker (or this suite run again) resumes it from its checkpoint.
        trial.set_user_attr("interrupted", type(e).__name__)
        trial.set_user_attr("error", f"{type(e).__name__}: {str(e)[:400]}")
        study.tell(trial, state=TrialState.FAIL)
        if isinstance(e, KeyboardInterrupt):
            study.enqueue_trial({}, user_attrs={CELL: key})
        raise
    finally:
        task_bar.close()


def slurm_job() -> str | None:
    """The Slurm job this worker runs in (``<array job>_<task>`` for an array task), else None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def close_mlflow(store: Store, cfg: SuiteConfig, keys: list[str]) -> None:
    """When every cell is done: no suite, group or seed run of the suite stays RUNNING in MLflow."""
    ml = store.mlflow
    if ml is None:
        return
    recs = {k: store.load_record(k) for k in keys}
    if not all(r is not None and r.get("status") in DONE for r in recs.values()):
        return
    exp = ml.experiment_id()
    if exp is None:
        return
    running = ml._guard(lambda: ml.client.search_runs([exp], filter_string="attributes.status = 'RUNNING'",
                                                     max_results=50000)) or []
    for r in running:
        tags = r.data.tags
        kind = tags.get("dmkd.kind")
        if kind in ("suite", "group") and tags.get("dmkd.suite") == cfg.name:
            ml.set_status(r.info.run_id, "FINISHED")
        elif kind == "run" and tags.get("dmkd.key") in recs:
            rec = recs[tags["dmkd.key"]]
            if rec.get("mlflow_run_id") in (None, r.info.run_id):
                ml.set_status(r.info.run_id, "FINISHED" if rec["status"] == "finished" else "FAILED")


__all__ = ["check_heartbeat", "close_mlflow", "run_suite", "study_name"]
