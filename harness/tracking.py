"""Where results go: one plain JSON record per run (the source of truth) and MLflow (nested runs).

Layout under the results folder::

    results/mlflow.db                          MLflow sqlite store (default tracking URI)
    results/mlartifacts/                       MLflow artifacts
    results/<experiment>/runs/<key>.json       one record per run; status running|finished|failed
    results/<experiment>/checkpoints/<key>.pt  resumable state after the last completed task

MLflow nesting: suite -> (method configuration, scenario) -> seed. A run is marked FINISHED in
MLflow only when it is; a killed run stays RUNNING until resumed. When MLflow fails (an
unreachable tracking URI, a locked database), the problem is reported once and the JSON records
carry on, so no number is ever lost.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from harness.errors import UserError

NO_MLFLOW = ("none", "off", "false", "")


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON so that a crash never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        self.experiment = experiment
        self.dir = self.results_dir / experiment
        for sub in ("runs", "checkpoints"):
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
        atomic_write_json(self.record_path(record["key"]), record)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted((self.dir / "runs").glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return out

    # ---- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self, key: str) -> Path:
        return self.dir / "checkpoints" / f"{key}.pt"

    def save_checkpoint(self, key: str, state: dict[str, Any]) -> None:
        path = self.checkpoint_path(key)
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, key: str) -> dict[str, Any] | None:
        path = self.checkpoint_path(key)
        if not path.exists():
            return None
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # noqa: BLE001 - a corrupt checkpoint means "start the run again"
            print(f"warning: checkpoint {path} is unreadable; the run restarts from task 0", file=sys.stderr)
            return None

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
            print(f"warning: MLflow tracking at {self.uri} failed ({type(err).__name__}: {str(err)[:200]}); "
                  f"results are still written as JSON under {self.results_dir}", file=sys.stderr)
            self.warned = True

    def _guard(self, fn, *args, retries: int = 5, **kwargs):
        if self.disabled:
            return None
        for attempt in range(retries):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - tracking must never break a run
                msg = str(e).lower()
                if ("locked" in msg or "busy" in msg) and attempt < retries - 1:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                self._warn(e)
                if "locked" not in msg:
                    self.disabled = True
                return None
        return None

    def _reachable(self) -> bool:
        """An http(s) tracking server must answer /health within a few seconds, else we fall back."""
        if not self.uri.startswith(("http://", "https://")):
            return True
        import urllib.request

        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5) as r:
                return r.status == 200
        except Exception as e:  # noqa: BLE001
            self._warn(e)
            return False

    @property
    def client(self):
        if self._client is None:
            if not self._reachable():
                self.disabled = True
                raise ConnectionError(f"tracking server {self.uri} is unreachable")
            import logging

            logging.getLogger("alembic").setLevel(logging.WARNING)
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:"):
                # Workers starting together would race to create the database's tables (MLflow
                # migrates a new sqlite store on first use): one at a time, under a file lock.
                import fcntl

                with open(self.results_dir / ".mlflow-init.lock", "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    client = MlflowClient(tracking_uri=self.uri)
                    client.search_experiments(max_results=1)  # forces the store (and its tables) into being
                    self._client = client
            else:
                self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self) -> str | None:
        if self._exp_id is None:
            def get_or_create():
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is not None:
                    return exp.experiment_id
                art = (self.results_dir.resolve() / "mlartifacts").as_uri()
                try:
                    return self.client.create_experiment(self.experiment, artifact_location=art)
                except Exception:  # noqa: BLE001 - created meanwhile by another worker
                    return self.client.get_experiment_by_name(self.experiment).experiment_id

            self._exp_id = self._guard(get_or_create)
        return self._exp_id

    def find_or_create(self, tags: dict[str, str], name: str, parent: str | None = None) -> str | None:
        """The run with these tags (reused across resumes and workers), else a new one."""
        exp = self.experiment_id()
        if exp is None:
            return None

        def go():
            flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
            found = self.client.search_runs([exp], filter_string=flt, max_results=1)
            if found:
                return found[0].info.run_id
            all_tags = dict(tags)
            all_tags["mlflow.runName"] = name
            if parent:
                all_tags["mlflow.parentRunId"] = parent
            return self.client.create_run(exp, tags=all_tags, run_name=name).info.run_id

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
