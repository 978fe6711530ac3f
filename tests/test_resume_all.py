"""Every registered method resumes exactly: a run resumed from its checkpoint after task 1 ends with
the uninterrupted run's accuracy matrix. A method whose state is not checkpointed (an anchor, a
teacher, a buffer, a generator) fails here, whatever its author remembered."""

import io

import pytest
import torch

from harness.engine.runner import RunObserver, RunSpec, resolve_method, run
from tests.conftest import needs_fmnist

SMALL = {"max_train_per_task": 300, "max_test_per_task": 100, "n_tasks": 5}


def _native_methods() -> list[str]:
    import methods  # noqa: F401  (registers every method)
    from harness.core.method import METHODS

    return sorted(n for n in METHODS if not n.startswith("avl-") and not n.startswith("_"))


class _Grab(RunObserver):
    """Keeps the checkpoint the runner offers after task 1, serialised as the harness stores it."""

    def __init__(self) -> None:
        self.saved: bytes | None = None

    def on_task_end(self, record, task_id, state_fn) -> None:
        if task_id == 1:
            buf = io.BytesIO()
            torch.save(state_fn(), buf)
            self.saved = buf.getvalue()


def _cases() -> list[tuple[str, dict]]:
    cases = []
    for name in _native_methods():
        field = resolve_method(name).HParams.__dataclass_fields__.get("n_nodes")
        cases.append((name, {"n_nodes": 2} if field is not None and field.default > 1 else {}))
    return cases + [("dmkd", {"training": "decentralized", "n_nodes": 2})]


@needs_fmnist
@pytest.mark.parametrize("name,mset", _cases(), ids=lambda v: v if isinstance(v, str) else ",".join(map(str, v.values())))
def test_every_method_resumes_to_the_uninterrupted_numbers(name, mset):
    spec = RunSpec(name, "split-fmnist", 0, method_set=mset, scenario_set=SMALL)
    grab = _Grab()
    full = run(spec, observer=grab)
    assert grab.saved is not None
    resumed = run(spec, resume_state=torch.load(io.BytesIO(grab.saved), weights_only=True))
    assert resumed.get("resumed_from_task") == 2
    assert resumed["acc"] == full["acc"], f"{name}: a resumed run differs from the uninterrupted one"
