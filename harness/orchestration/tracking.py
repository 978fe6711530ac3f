"""Where results go: one plain JSON record per run (the source of truth) and MLflow (nested runs).

Layout under the results folder::

    results/mlflow.db                          MLflow sqlite store (default tracking URI)
    results/mlartifacts/                       MLflow artifacts
    results/<experiment>/runs/<key>.json       one record per run; status running|finished|failed
    results/<experiment>/checkpoints/<key>.pt  resumable state after the last completed task
    results/<experiment>/claims/<key>.lock     held (flock) by the one process running that key

MLflow nesting: suite -> (method configuration, scenario) -> seed. A run is marked FINISHED in
MLflow only when it is; a killed run stays RUNNING until resumed. When MLflow fails (an
unreachable tracking URI, a locked database), the problem is reported once and the JSON records
carry on, so no number is ever lost.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from harness.core.errors import UserError, one_line, redact

NO_MLFLOW = ("none", "off", "false", "")
# MLflow 3's UI opens an experiment by its kind: without this tag it guesses "GenAI apps & agents"
# and shows a traces overview; with it, the experiment opens on its training runs.
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON so that a crash never leaves a half-written file behind; a full disk or an
    unwritable folder is a UserError, and the temporary file is removed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def _write_error(path: Path, e: OSError) -> UserError:
    if e.errno == errno.ENOSPC:
        return UserError(f"no space left on the device holding {path.parent}; {path.name} was not written "
                         "(what was recorded before is intact: the record stays 'running' after the last task "
                         "written, and the run resumes from its last checkpoint)",
                         "free disk space or pass another --results folder, then run the command again")
    return UserError(f"cannot write {path} ({e.strerror or e})", "pass a writable folder with --results")


def _save_error(path: Path, e: Exception) -> UserError:
    """A write that failed with an error that is not an OSError (torch.save's RuntimeError): the
    previous checkpoint and the record as last written (status running) are intact."""
    import shutil

    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    return UserError(f"writing {path} failed ({type(e).__name__}: {one_line(e, 120)}; {free}); nothing was "
                     "overwritten: the record stays 'running' after the last task written and the run resumes "
                     "from its last checkpoint", "free disk space or pass another --results folder, then run "
                     "the command again")


_EXPERIMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_experiment_name(name: str) -> str:
    """An experiment is a folder directly under --results: no path separators, no '..'."""
    if not isinstance(name, str) or not _EXPERIMENT.fullmatch(name) or ".." in name:
        raise UserError(f"experiment name {name!r} is not a plain folder name",
                        "use letters, digits, '.', '_' and '-' (at most 100), starting with a letter or digit")
    return name


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_results_dir(results_dir: Path) -> Path:
    """Create the results folder or fail with one clear line when it cannot be written."""
    results_dir = Path(results_dir).expanduser()
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        probe = results_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"results folder {results_dir} is not writable ({e.strerror})",
                        "pass a writable folder with --results") from None
    return results_dir


class Store:
    """Results of one experiment: JSON records, checkpoints and (optionally) MLflow."""

    def __init__(self, results_dir: Path | str, experiment: str, tracking_uri: str | None = None) -> None:
        self.results_dir = check_results_dir(Path(results_dir))
        self.experiment = check_experiment_name(experiment)
        self.dir = self.results_dir / experiment
        for sub in ("runs", "checkpoints", "claims"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if tracking_uri is None:
            tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.results_dir.resolve()}/mlflow.db"
        self.mlflow = MlflowSink(tracking_uri, experiment, self.results_dir) if tracking_uri not in NO_MLFLOW else None
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    # ---- records ----------------------------------------------------------------------------
    def record_path(self, key: str) -> Path:
        return self.dir / "runs" / f"{key}.json"

    def load_record(self, key: str) -> dict[str, Any] | None:
        p = self.record_path(key)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def save_record(self, record: dict[str, Any]) -> None:
        """Write a run's record. A finished record is never replaced by an unfinished one or by the
        record of another configuration; a record that is not a RunRecord is never written."""
        from harness.engine.record import RunRecord

        RunRecord.from_dict(record, f"for {self.record_path(str(record.get('key')))}")
        old = self.load_record(record["key"])
        if old is not None and old.get("status") == "finished" and (
                record.get("status") != "finished" or old.get("config_hash") != record.get("config_hash")):
            raise RuntimeError(f"refusing to overwrite the finished record {self.record_path(record['key'])}")
        atomic_write_json(self.record_path(record["key"]), record)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted((self.dir / "runs").glob("*.json")):
            if p.name.startswith("."):  # a temporary file left by a kill mid-write
                continue
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
        return out

    # ---- one process per key ----------------------------------------------------------------
    def claim_path(self, key: str) -> Path:
        return self.dir / "claims" / f"{key}.lock"

    @contextlib.contextmanager
    def claim(self, key: str, poll_s: float = 1.0, report_s: float = 60.0) -> Iterator[bool]:
        """Hold the key's claim while the block runs: whoever runs a key (a suite, another suite, a
        single run, an ablation), no two processes run it at once. A second comer waits, saying so,
        until the holder ends; it then finds the holder's record (finished, failed, or running with a
        checkpoint when the holder died). Yields whether it had to wait.

        The claim is an OS file lock (flock through filelock): the kernel releases it when its holder
        exits, even by kill -9, so a dead holder never blocks a key."""
        from filelock import FileLock, Timeout

        path = self.claim_path(key)
        owner = path.with_suffix(".owner")
        lock = FileLock(str(path))
        waited = False
        try:
            lock.acquire(timeout=0)
        except Timeout:
            waited = True
            last = time.monotonic()
            print(f"run {key} is running in another process ({self._owner(owner)}); waiting for it to end, then "
                  "its record is used", file=sys.stderr)
            while True:
                try:
                    lock.acquire(timeout=poll_s)
                    break
                except Timeout:
                    if time.monotonic() - last >= report_s:
                        print(f"still waiting for run {key} ({self._owner(owner)})", file=sys.stderr)
                        last = time.monotonic()
        except OSError as e:
            raise _write_error(path, e) from None
        try:
            with contextlib.suppress(OSError):
                owner.write_text(f"worker {self.worker_id}, since {time.strftime('%Y-%m-%dT%H:%M:%S')}")
            yield waited
        finally:
            with contextlib.suppress(OSError):
                owner.unlink()
            lock.release()  # the lock file stays: removing it would let a waiter and a newcomer both hold one

    @staticmethod
    def _owner(path: Path) -> str:
        try:
            return path.read_text()[:200] or "owner unknown"
        except OSError:
            return "owner unknown"

    # ---- checkpoints ------------------------------------------------------------------------
    CHECKPOINT_FORMAT = "dmkd-checkpoint/2"

    def checkpoint_path(self, key: str) -> Path:
        return self.dir / "checkpoints" / f"{key}.pt"

    def save_checkpoint(self, key: str, config_hash: str, state: dict[str, Any]) -> None:
        """Atomically write the resumable state of a run, tagged with its configuration hash."""
        path = self.checkpoint_path(key)
        tmp = path.with_suffix(f".pt.tmp-{os.getpid()}")
        try:
            torch.save({"format": self.CHECKPOINT_FORMAT, "key": key, "config_hash": config_hash, "state": state},
                       tmp)
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise _write_error(path, e) from None
            if isinstance(e, Exception):  # torch.save reports a full disk as RuntimeError (iostream error)
                raise _save_error(path, e) from None
            raise

    def load_checkpoint(self, key: str, config_hash: str) -> dict[str, Any] | None:
        """The resumable state of the run with this key and configuration, or None.

        Loaded with ``weights_only=True``: tensors and plain containers only, never code. A file
        that is unreadable, of another configuration or missing any part of the state is moved
        aside (``*.pt.bad``) with a warning, and the run starts from task 0."""
        from harness.engine.checkpoints import STATE_KEYS

        path = self.checkpoint_path(key)
        if not path.exists():
            return None
        problem = None
        try:
            ck = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any unreadable file means "start again"
            ck, problem = None, f"unreadable ({type(e).__name__})"
        if problem is None:
            if not isinstance(ck, dict) or ck.get("format") != self.CHECKPOINT_FORMAT:
                problem = "not a dmkd-bench checkpoint of this version"
            elif ck.get("config_hash") != config_hash or ck.get("key") != key:
                problem = "written by another configuration"
            elif not isinstance(ck.get("state"), dict) or not STATE_KEYS <= set(ck["state"]):
                problem = "incomplete"
        if problem is not None:
            bad = path.with_suffix(".pt.bad")
            try:
                os.replace(path, bad)
            except OSError:
                bad = path
            print(f"warning: checkpoint {path} is {problem}; moved to {bad.name}, the run restarts from task 0",
                  file=sys.stderr)
            return None
        return ck["state"]

    def drop_checkpoint(self, key: str) -> None:
        self.checkpoint_path(key).unlink(missing_ok=True)


class MlflowSink:
    """Nested MLflow runs through MlflowClient; every call is guarded so failures never lose data."""

    def __init__(self, uri: str, experiment: str, results_dir: Path) -> None:
        self.uri = uri
        self.experiment = experiment
        self.results_dir = results_dir
        self._client = None
        self._exp_id: str | None = None
        self.disabled = False
        self.warned = False

    def _warn(self, err: Exception) -> None:
        if not self.warned:
            print(f"warning: MLflow tracking at {redact(self.uri)} failed ({type(err).__name__}: "
                  f"{one_line(err, 200)}); results are still written as JSON under {self.results_dir}",
                  file=sys.stderr)
            self.warned = True

    def _guard(self, fn, *args, retries: int = 5, **kwargs):
        """Call MLflow; a locked or busy store is retried, any other failure warns once and turns
        tracking off (tracking must never break a run; the JSON records are kept either way)."""
        if self.disabled:
            return None
        from harness.orchestration.retry import retrying

        try:
            return retrying(retries, 0.2, when=_locked)(fn)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never break a run
            self._warn(e)
            if "locked" not in str(e).lower():
                self.disabled = True
            return None

    def _reachable(self) -> bool:
        """An http(s) tracking server must answer /health within a few seconds, else we fall back."""
        try:
            return tracking_reachable(self.uri)
        except Exception as e:  # noqa: BLE001
            self._warn(e)
            return False

    @property
    def client(self):
        if self._client is None:
            if not self._reachable():
                self.disabled = True
                raise ConnectionError(f"tracking server {redact(self.uri)} is unreachable")
            import logging

            logging.getLogger("alembic").setLevel(logging.WARNING)
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:///"):
                open_sqlite_store(Path(self.uri[len("sqlite:///"):]))
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self) -> str | None:
        if self._exp_id is None:
            def get_or_create():
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is not None:
                    if EXPERIMENT_KIND not in exp.tags:
                        self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
                    return exp.experiment_id
                # A tracking server keeps artifacts where it was told to (its artifact root, served to
                # every client); a local store keeps them under the results folder.
                art = None if self.uri.startswith(("http://", "https://")) else (
                    self.results_dir.resolve() / "mlartifacts").as_uri()
                try:
                    return self.client.create_experiment(self.experiment, artifact_location=art,
                                                         tags={EXPERIMENT_KIND: TRAINING_KIND})
                except Exception:  # noqa: BLE001 - created meanwhile by another worker
                    return self.client.get_experiment_by_name(self.experiment).experiment_id

            self._exp_id = self._guard(get_or_create)
        return self._exp_id

    def find_or_create(self, tags: dict[str, str], name: str, parent: str | None = None) -> str | None:
        """The run with these tags (reused across resumes and workers), else a new one."""
        exp = self.experiment_id()
        if exp is None:
            return None

        # Runs are found by a hex digest of their identifying tags: tag values (suite names, labels)
        # may hold quotes or anything else that an MLflow filter string cannot carry.
        ident = hashlib.sha256(json.dumps(tags, sort_keys=True).encode()).hexdigest()[:32]

        def first(runs):  # the earliest created; every worker picks the same one
            return min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)).info.run_id

        def go():
            query = f"tags.`dmkd.id` = '{ident}'"
            found = self.client.search_runs([exp], filter_string=query, max_results=50)
            if found:
                return first(found)
            all_tags = dict(tags)
            all_tags["dmkd.id"] = ident
            all_tags["mlflow.runName"] = name
            if parent:
                all_tags["mlflow.parentRunId"] = parent
            mine = self.client.create_run(exp, tags=all_tags, run_name=name).info.run_id
            # Two workers that looked at once both created the run: the later copy is deleted.
            winner = first(self.client.search_runs([exp], filter_string=query, max_results=50))
            if winner != mine:
                self.client.delete_run(mine)
            return winner

        return self._guard(go)

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if not run_id:
            return
        from mlflow.entities import Param

        existing = self._guard(lambda: self.client.get_run(run_id).data.params) or {}
        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items() if k[:250] not in existing]
        for i in range(0, len(items), 100):
            self._guard(self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str | None, values: dict[str, float], step: int) -> None:
        if not run_id or not values:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in values.items() if not math.isnan(float(v))]
        for i in range(0, len(items), 500):
            self._guard(self.client.log_batch, run_id, metrics=items[i : i + 500])

    def log_dict(self, run_id: str | None, obj: Any, name: str) -> None:
        if run_id:
            self._guard(self.client.log_dict, run_id, json.loads(json.dumps(obj, default=_json_default)), name)

    def set_status(self, run_id: str | None, status: str) -> None:
        if run_id:
            self._guard(self.client.set_terminated, run_id, status=status)

    def ensure_terminated(self, run_id: str, status: str) -> None:
        """Set a run's terminal status unless it already has one."""
        info = self._guard(lambda: self.client.get_run(run_id).info)
        if info is not None and info.status in ("RUNNING", "SCHEDULED"):
            self.set_status(run_id, status)

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if run_id:
            for k, v in tags.items():
                self._guard(self.client.set_tag, run_id, k, v)


def flatten(prefix: str, obj: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nested dicts -> 'a.b.c' keys (MLflow params)."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


def tracking_reachable(uri: str, timeout: float = 5.0) -> bool:
    """True unless ``uri`` is an http(s) server that does not answer /health within ``timeout``."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - unreachable, refused, timed out, not an MLflow server
        return False


def open_sqlite_store(path: Path) -> None:
    """Make sure the MLflow sqlite store at ``path`` exists and is complete, safely against kills.

    MLflow creates a new store's tables in a series of migrations; a process killed during them
    leaves a store that every later open fails on ("table ... already exists"). Here a new store
    is created under a temporary name and renamed into place only once complete, one process at a
    time (file lock). A store left half-made by older versions (no runs in it) is moved aside and
    created anew; one that holds runs is never touched."""
    from filelock import FileLock

    path = path.expanduser().resolve()
    from mlflow.tracking import MlflowClient

    with FileLock(str(path.parent / ".mlflow-init.lock")):
        if path.exists():
            if _sqlite_store_complete(path) and _store_opens(f"sqlite:///{path}"):
                return
            if _sqlite_run_count(path) > 0:
                return  # it holds runs: never moved; MLflow's own error will say what is wrong
            aside = path.with_name(f"{path.name}.incomplete-{int(time.time())}")
            os.replace(path, aside)
            print(f"warning: MLflow store {path} was left half-created (a process was killed while making "
                  f"it); moved to {aside.name} and created anew", file=sys.stderr)
        for stale in path.parent.glob(f".{path.name}.creating-*"):
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}")
        client.search_experiments(max_results=1)  # runs every migration
        engine = getattr(getattr(getattr(client, "_tracking_client", None), "store", None), "engine", None)
        if engine is not None:
            engine.dispose()
        os.replace(tmp, path)


def _store_opens(uri: str) -> bool:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 - any failure to open: the store is not usable as it is
        return False


def _sqlite_store_complete(path: Path) -> bool:
    """A complete store has its alembic version and its core tables."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            names = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            if not {"alembic_version", "experiments", "runs", "metrics", "params", "tags"} <= names:
                return False
            return con.execute("select count(*) from alembic_version").fetchone()[0] == 1
        finally:
            con.close()
    except sqlite3.Error:
        return False


def _sqlite_run_count(path: Path) -> int:
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            return int(con.execute("select count(*) from runs").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0  # no runs table: nothing was ever recorded in it


def _locked(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, Exception) and ("locked" in msg or "busy" in msg)
