"""The core: everything a method or a scenario may import (and nothing above it).

``from harness.core import Method, register, ...`` is the public façade; the names load lazily from
their modules (listed below), so importing one small module of the core (``harness.core.errors``)
does not import torch, and the façade adds no import edge between the core's modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {
    "harness.core.data": ("CLASS_IL", "TASK_IL", "DOMAIN_IL", "ALL_SETTINGS", "DataSource", "TensorSource", "Task",
                          "Scenario"),
    "harness.core.protocol": ("Protocol",),
    "harness.core.context": ("RunContext", "TrainingDiverged", "check_finite"),
    "harness.core.method": ("HParams", "Method", "METHODS", "register", "tensor_bytes"),
    "harness.core.config": ("Search", "documented", "hparams_from", "require", "choice", "split_params"),
    "harness.core.accuracy": ("seen_classes_accuracy",),
    "harness.core.errors": ("UserError",),
    "harness.core.nodes_method": ("NodesMethod", "NodesParams"),
}
_MODULE_OF = {name: mod for mod, names in _HOME.items() for name in names}
__all__ = [
    "ALL_SETTINGS",
    "CLASS_IL",
    "DOMAIN_IL",
    "METHODS",
    "TASK_IL",
    "DataSource",
    "HParams",
    "Method",
    "NodesMethod",
    "NodesParams",
    "Protocol",
    "RunContext",
    "Scenario",
    "Search",
    "Task",
    "TensorSource",
    "TrainingDiverged",
    "UserError",
    "check_finite",
    "choice",
    "documented",
    "hparams_from",
    "register",
    "require",
    "seen_classes_accuracy",
    "split_params",
    "tensor_bytes",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'harness.core' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


if TYPE_CHECKING:
    from harness.core.accuracy import seen_classes_accuracy
    from harness.core.config import Search, choice, documented, hparams_from, require, split_params
    from harness.core.context import RunContext, TrainingDiverged, check_finite
    from harness.core.data import (
        ALL_SETTINGS,
        CLASS_IL,
        DOMAIN_IL,
        TASK_IL,
        DataSource,
        Scenario,
        Task,
        TensorSource,
    )
    from harness.core.errors import UserError
    from harness.core.method import METHODS, HParams, Method, register, tensor_bytes
    from harness.core.nodes_method import NodesMethod, NodesParams
    from harness.core.protocol import Protocol
