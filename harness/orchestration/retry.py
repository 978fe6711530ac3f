"""Retries through tenacity: the storages and MLflow's sqlite store are shared by concurrent workers,
and a call that meets a lock or a table being created is tried again after a jittered wait. Also the
timing of workers that share a storage (heartbeat, grace), here in the lowest layer so that the
command line can show the defaults without importing the suite (torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

HEARTBEAT_S = 10  # seconds between a suite worker's heartbeats (harness/orchestration/cluster.py)
GRACE_S = 60  # seconds of silence after which a worker counts as dead


def retrying(attempts: int, step_s: float, when: Callable[[BaseException], bool] | None = None) -> Any:
    """A decorator: up to ``attempts`` calls, waiting step_s, 2·step_s, ... plus up to step_s of jitter
    between them; ``when(exc)`` says which exceptions are retried (default: every Exception). The
    last exception is re-raised."""
    import tenacity

    retry = tenacity.retry_if_exception(when) if when is not None else tenacity.retry_if_exception_type(Exception)
    return tenacity.retry(stop=tenacity.stop_after_attempt(attempts), reraise=True, retry=retry,
                          wait=tenacity.wait_incrementing(start=step_s, increment=step_s) + tenacity.wait_random(0, step_s))
