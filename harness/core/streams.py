"""Tuning protocols: which stream, and which part of it, hyperparameter tuning may read.

- ``end-of-stream``: every task of the evaluation stream, scored on their validation data after the
  whole stream has been trained. No learner on a stream has future tasks' data when it chooses its
  settings, so this is the optimistic bound (what most continual-learning papers report).
- ``first-tasks`` (K): the stream made of the evaluation stream's first K tasks only, their training
  and validation data; scored on those K tasks' validation data (Chaudhry et al., ICLR 2019, A-GEM).
- ``held-out-stream``: another stream of the same scenario family (another class order, other
  permutations, other rotations, another domain order), scored on that stream's validation data; the
  evaluation stream is never read.

A held-out stream is built from a *stream seed* in [2**31, 2**32), and an evaluation stream from a
run seed in [0, 2**31 - 1] (the run seeds' range, harness/engine/runner.py MAX_SEED), so the two can
never be the same draw: every random choice a scenario makes (class order, permutations, caps,
validation carve) comes from a torch generator seeded with one of them plus a fixed offset per
purpose, and torch's CPU generator keeps only the low 32 bits of its seed, so two streams draw alike
for a purpose exactly when their seeds agree modulo 2**32, which a stream seed and a run seed never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.core.errors import UserError

END_OF_STREAM = "end-of-stream"
FIRST_TASKS = "first-tasks"
HELD_OUT_STREAM = "held-out-stream"
PROTOCOLS = (END_OF_STREAM, FIRST_TASKS, HELD_OUT_STREAM)
HELD_OUT_BASE = 2**31  # evaluation (run) seeds are < 2**31; held-out stream seeds start here


def held_out_seed(seed: int) -> int:
    """The stream seed of the held-out stream that tuning with run seed ``seed`` learns."""
    return HELD_OUT_BASE + int(seed)


def is_held_out(stream_seed: int) -> bool:
    """Whether a scenario is being built as a held-out (tuning) stream rather than an evaluation stream."""
    return int(stream_seed) >= HELD_OUT_BASE


def base_seed(stream_seed: int) -> int:
    """The run seed a stream seed was derived from (itself for an evaluation stream)."""
    return int(stream_seed) - HELD_OUT_BASE if is_held_out(stream_seed) else int(stream_seed)


@dataclass(frozen=True)
class TuningProtocol:
    """A tuning protocol and, for ``first-tasks``, its K."""

    protocol: str = END_OF_STREAM
    first_tasks: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UserError(f"unknown tuning protocol {self.protocol!r}", f"choose one of: {', '.join(PROTOCOLS)}")
        if self.protocol == FIRST_TASKS:
            k = self.first_tasks
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise UserError(f"tuning protocol first-tasks needs a number of tasks K >= 1, got {k!r}",
                                "e.g. --protocol first-tasks --first-tasks 2")
        elif self.first_tasks is not None:
            raise UserError(f"first_tasks={self.first_tasks} applies to the first-tasks protocol only, "
                            f"not {self.protocol}", "drop --first-tasks, or use --protocol first-tasks")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TuningProtocol:
        d = dict(d or {})
        return cls(str(d.get("protocol", END_OF_STREAM)), d.get("first_tasks"))

    def as_dict(self) -> dict[str, Any]:
        """``{"protocol": P}``, plus ``first_tasks`` for first-tasks (what files and records carry)."""
        return {"protocol": self.protocol} | ({"first_tasks": self.first_tasks} if self.protocol == FIRST_TASKS
                                              else {})

    @property
    def slug(self) -> str:
        """Folder name of its tuned files: end-of-stream, first-tasks-K or held-out-stream."""
        return f"{FIRST_TASKS}-{self.first_tasks}" if self.protocol == FIRST_TASKS else self.protocol

    def describe(self) -> str:
        if self.protocol == FIRST_TASKS:
            return (f"first-tasks K={self.first_tasks} (tuned on the first {self.first_tasks} task(s) of the "
                    "stream only, their training and validation data)")
        if self.protocol == HELD_OUT_STREAM:
            return ("held-out-stream (tuned on another stream of the same scenario family, from stream seeds "
                    "disjoint from the evaluation seeds; the evaluation stream never read)")
        return "end-of-stream (tuned on every task's validation data after the whole stream: the optimistic bound)"

    def stream(self) -> dict[str, Any] | None:
        """The tuning stream a run of this protocol learns (None: the evaluation stream itself)."""
        return None if self.protocol == END_OF_STREAM else self.as_dict()


def describe(d: dict[str, Any] | None) -> str:
    """Short text of a recorded protocol dict: 'end-of-stream', 'first-tasks K=2', 'held-out-stream'."""
    p = TuningProtocol.from_dict(d)
    return f"{FIRST_TASKS} K={p.first_tasks}" if p.protocol == FIRST_TASKS else p.protocol
