"""Optuna storages and studies from a URL: sqlite under the results folder (default), a journal file
(``journal:<path>``, with a heartbeat of our own), or any RDB URL (PostgreSQL across machines).
Problems are one UserError line with the password of the URL masked."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat

from harness.core.errors import UserError, one_line, redact
from harness.orchestration.retry import retrying


def make_storage(url: str | None, results_dir: Path, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, stale_callback=None):
    """An Optuna storage from a URL: sqlite:///..., postgresql://..., journal:<file>; default sqlite.

    With ``heartbeat_interval``, running trials record heartbeats and a trial silent for
    ``grace_period`` seconds is failed and handed to ``stale_callback`` (suites re-queue it).
    """
    import optuna

    hb = {} if heartbeat_interval is None else {"heartbeat_interval": heartbeat_interval,
                                                "grace_period": grace_period,
                                                "heartbeat_stale_trial_callback": stale_callback}
    if url is None:
        results_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(results_dir / 'optuna.db').resolve()}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:"):]).expanduser()
        if not path.parent.is_dir():
            raise UserError(f"the folder of the Optuna journal {path} does not exist",
                            "create it first, or pass journal:<path> in an existing folder")
        try:
            backend = JournalFileBackend(str(path))
        except OSError as e:
            raise UserError(f"cannot open the Optuna journal {path} ({e.strerror or e})",
                            "pass a journal file in a writable folder") from None
        if hb:
            return JournalHeartbeatStorage(backend, **hb)
        return optuna.storages.JournalStorage(backend)
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        if (db.exists() and not os.access(db, os.W_OK)) or (not db.exists() and not os.access(db.parent, os.W_OK)):
            raise UserError(f"the Optuna storage {db} is not writable", "pass a writable --storage (or --results)")
    engine = {"pool_pre_ping": True} if not url.startswith("sqlite") else {"connect_args": {"timeout": 60}}
    cls = RDBHeartbeatStorage if hb else optuna.storages.RDBStorage
    try:  # workers starting together race to create the tables: retried with jittered waits
        return retrying(6, 0.3)(lambda: cls(url, engine_kwargs=engine, **hb))()
    except Exception as e:  # noqa: BLE001 - any failure to open becomes one line
        raise UserError(f"cannot open Optuna storage {redact(url)} ({type(e).__name__}: {one_line(e, 160)})",
                        "check the URL, that the database server is reachable and the driver installed") from None


def create_study(**kwargs):
    """create_study(load_if_exists=True), retried: concurrent workers may race to create it."""
    import optuna

    try:
        return retrying(5, 0.5)(lambda: optuna.create_study(load_if_exists=True, **kwargs))()
    except Exception as e:  # noqa: BLE001 - any storage failure becomes one line
        raise UserError(f"cannot create the Optuna study {kwargs.get('study_name')!r} "
                        f"({type(e).__name__}: {one_line(e, 200)})",
                        "check that the storage is writable and reachable") from None


def is_surplus(trial) -> bool:
    """A trial handed back unused (the budget was taken, or no cell waited): not part of a study's
    count. User attribute since this release; studies made before marked it as a system attribute."""
    return bool(trial.user_attrs.get("surplus") or trial.system_attrs.get("surplus"))


def trial_id(storage, study, number: int) -> int:
    """The storage's id of trial ``number`` of ``study``, through the storage's public methods."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


@contextlib.contextmanager
def heartbeat(storage, tid: int):
    """Record the running trial's heartbeat every ``storage.get_heartbeat_interval()`` seconds, in a
    daemon thread, while the block runs (what Optuna's own optimize loop does; we ask and tell)."""
    import threading

    interval = storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) else None
    if interval is None:
        yield
        return
    stop = threading.Event()
    storage.record_heartbeat(tid)

    def beat() -> None:
        while not stop.wait(interval):
            storage.record_heartbeat(tid)

    thread = threading.Thread(target=beat, name=f"heartbeat-{tid}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class SilenceClock:
    """Death judged by the reader's clock alone: a running trial is stale once its heartbeat value
    has stayed the same for ``grace`` seconds of the reader's monotonic clock. What the value is (a
    writer's date, a database's date, a counter) does not matter, only that it changes with every
    beat: a heartbeat dated in the future (a writer's clock ahead, a clock stepped back) cannot hide
    a death, and one dated in the past cannot fake one."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._seen: dict[int, tuple[Any, float]] = {}

    def stale(self, beats: list[tuple[int, Any]]) -> list[int]:
        """``beats``: (trial id, heartbeat value) of every running trial that has a heartbeat."""
        now = time.monotonic()
        out = []
        for tid, beat in beats:
            seen = self._seen.get(tid)
            if seen is None or seen[0] != beat:
                self._seen[tid] = (beat, now)
            elif now - seen[1] > self.grace:
                out.append(tid)
        return out


class RDBHeartbeatStorage(RDBStorage):
    """An RDB storage (sqlite, PostgreSQL) whose stale trials are found by :class:`SilenceClock`.

    Optuna compares the stored heartbeat date with the database's ``now()``; with sqlite both are the
    clock of whichever process runs the statement, so a worker whose clock runs ahead writes dates
    from the future that never look stale, and its death would never be noticed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._silence = SilenceClock(self.grace_period or 2 * (self.heartbeat_interval or 1))

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        import sqlalchemy
        from optuna.storages._rdb import models
        from optuna.trial import TrialState

        query = (sqlalchemy.select(models.TrialHeartbeatModel.trial_id, models.TrialHeartbeatModel.heartbeat)
                 .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
                 .where(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING))
        with self.engine.connect() as con:
            rows = [(int(tid), beat) for tid, beat in con.execute(query)]
        return self._silence.stale(rows)


class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
    """A journal-file storage with Optuna's heartbeat protocol (the journal has none of its own).

    A worker writes a changing value into the running trial's system attributes; another worker
    calls a trial stale when it has seen that value unchanged for ``grace_period`` seconds of its
    own monotonic clock (:class:`SilenceClock`), so clocks that disagree between machines cannot
    fake or hide a death.
    """

    ATTR = "dmkd_heartbeat"

    def __init__(self, backend, heartbeat_interval: int, grace_period: int, heartbeat_stale_trial_callback=None):
        super().__init__(backend)
        self._hb_interval = heartbeat_interval
        self._grace = grace_period
        self._stale_cb = heartbeat_stale_trial_callback
        self._silence = SilenceClock(grace_period)
        self._beats = 0

    def record_heartbeat(self, trial_id: int) -> None:
        self._beats += 1
        with contextlib.suppress(Exception):  # the trial finished meanwhile: nothing to keep alive
            self.set_trial_system_attr(trial_id, self.ATTR, [time.time(), self._beats])

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        from optuna.trial import TrialState

        beats = [(self.get_trial_id_from_study_id_trial_number(study_id, t.number), t.system_attrs.get(self.ATTR))
                 for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))]
        return self._silence.stale(beats)

    def get_heartbeat_interval(self) -> int | None:
        return self._hb_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_cb
