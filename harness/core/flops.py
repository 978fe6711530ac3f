"""A total-only FLOP counter: torch's own FLOP formulas without torch's module tracking.

``torch.utils.flop_counter.FlopCounterMode`` attributes every FLOP to the module that ran it; for
that it installs global module forward hooks and backward hooks on every module's tensors
(``ModuleTracker``), which cost time on every module call. The harness only needs the total.
:class:`FlopCounter` is a ``TorchDispatchMode`` that follows ``FlopCounterMode``'s dispatch rule by
rule (torch 2.14, ``torch/utils/flop_counter.py``), so its totals are the same:

- the metadata queries FlopCounterMode skips (``is_contiguous``, ``size``, ``stride``, ...) are
  skipped (``NotImplemented``);
- higher-order operators: ``cond`` counts as FlopCounterMode counts it (see :meth:`_cond`), Triton
  kernels by their formula in the registry; any other returns ``NotImplemented``;
- an operator (an ``OpOverload``; the registry is keyed by ``OpOverloadPacket``, so this test never
  matches and every operator is tried) other than ``prim.device`` is first decomposed
  (``OpOverload.decompose``: its CompositeImplicitAutograd kernel) with the mode re-entered, so that
  the decomposition's operators are counted; whether an operator has such a kernel depends on the
  operator only, so it is looked up once per operator instead of re-entering the mode on every call;
- otherwise the operator runs and, when its overload packet has a formula in
  ``torch.utils.flop_counter.flop_registry``, the formula is called as FlopCounterMode calls it,
  ``formula(*args, **kwargs, out_val=out)`` (the registered formulas take shapes through torch's
  ``shape_wrapper``).

Counts are kept per overload packet (what FlopCounterMode keeps under "Global"); the total is their
sum. Unlike FlopCounterMode a counter can be entered again after it was exited: counts accumulate,
which is how the step meter suspends a counter around ``ctx.counted`` work.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch._C import DispatchKey
from torch.utils import flop_counter as _torch_flop_counter
from torch.utils._python_dispatch import TorchDispatchMode


def _existing(*names: str) -> frozenset:
    """The operators of these ``namespace::op.overload`` names that this torch has (an older torch,
    such as a GPU image's, lacks some of the newer ones)."""
    out = set()
    for name in names:
        space, _, rest = name.partition("::")
        op, _, overload = rest.partition(".")
        try:
            out.add(getattr(getattr(getattr(torch.ops, space), op), overload))
        except (AttributeError, RuntimeError):
            continue
    return frozenset(out)


# FlopCounterMode's list of operators that are not computation (queries of sizes, strides, layout).
_SKIPPED = _existing(
    "aten::sym_is_contiguous.default", "aten::is_contiguous.default", "aten::is_contiguous.memory_format",
    "aten::is_strides_like_format.default", "aten::is_non_overlapping_and_dense.default", "aten::size.default",
    "aten::sym_size.default", "aten::stride.default", "aten::sym_stride.default", "aten::storage_offset.default",
    "aten::sym_storage_offset.default", "aten::numel.default", "aten::sym_numel.default", "aten::dim.default",
    "prim::layout.default",
)
_PRIM_DEVICE = torch.ops.prim.device.default
_CIA = DispatchKey.CompositeImplicitAutograd
_DECOMPOSES: dict[Any, bool] = {}  # OpOverload -> whether OpOverload.decompose can return a result


def _decomposes(func: Any) -> bool:
    """Whether ``func.decompose`` would not return NotImplemented at once (the two branches of
    ``OpOverload.decompose``: a Python or a C++ CompositeImplicitAutograd kernel)."""
    known = _DECOMPOSES.get(func)
    if known is None:
        known = _CIA in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _CIA)
        _DECOMPOSES[func] = known
    return known


class FlopCounter:
    """Total FLOPs (FlopCounterMode's formulas and totals) of the torch operations run inside it.

    ``with FlopCounter() as c: ...; c.get_total_flops()``. It may be entered again after it was
    exited (counts accumulate); it is not reentrant while entered."""

    def __init__(self) -> None:
        self.counts: dict[Any, int] = {}  # overload packet -> FLOPs (FlopCounterMode's "Global")
        self._mode: _TotalFlopMode | None = None

    def get_total_flops(self) -> int:
        return sum(self.counts.values())

    @property
    def active(self) -> bool:
        return self._mode is not None

    def __enter__(self) -> FlopCounter:  # noqa: PYI034
        if self._mode is not None:
            raise RuntimeError("FlopCounter is already entered")
        self._mode = _TotalFlopMode(self, _torch_flop_counter.flop_registry)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        mode, self._mode = self._mode, None
        assert mode is not None, "FlopCounter.__exit__ without __enter__"
        mode.__exit__(*exc)


class _TotalFlopMode(TorchDispatchMode):
    supports_higher_order_operators = True

    def __init__(self, counter: FlopCounter, registry: dict[Any, Callable[..., int]]) -> None:
        super().__init__()
        self.counter = counter
        self.registry = registry

    def _count(self, packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        formula = self.registry.get(packet)
        if formula is not None:
            counts = self.counter.counts
            counts[packet] = counts.get(packet, 0) + formula(*args, **kwargs, out_val=out)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs if kwargs else {}
        if func in _SKIPPED:
            return NotImplemented
        if isinstance(func, torch._ops.HigherOrderOperator):
            return self._higher_order(func, args, kwargs)
        if func is not _PRIM_DEVICE and func not in self.registry and _decomposes(func):
            with self:
                r = func.decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
        out = func(*args, **kwargs)
        return self._count(func._overloadpacket, out, args, kwargs)

    def _higher_order(self, func: Any, args: Any, kwargs: Any) -> Any:
        if func in {torch.ops.higher_order.triton_kernel_wrapper_mutation,
                    torch.ops.higher_order.triton_kernel_wrapper_functional}:
            from torch._higher_order_ops.triton_kernel_wrap import get_kernel
            from triton.runtime.jit import JITFunction

            kernel = get_kernel(kwargs["kernel_idx"])
            while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
                kernel = kernel.fn
            return self._count(kernel, None, args, kwargs)
        if func is torch.ops.higher_order.cond:
            return self._cond(*args)
        return NotImplemented

    def _cond(self, pred: Any, true_branch: Any, false_branch: Any, operands: Any) -> Any:
        """FlopCounterMode's ``cond``: both branches run; it means to keep the larger count of each
        operator, but its checkpoint is a shallow copy of its per-module dicts, so once its "Global"
        dict exists both branches add to it (the sum). Only while nothing has been counted yet does
        each operator get the larger of the two branches' counts."""
        counts = self.counter.counts
        if counts:
            with self:
                out = true_branch(*operands)
            if out is NotImplemented:
                return out
            with self:
                false_out = false_branch(*operands)
            return NotImplemented if false_out is NotImplemented else out
        self.counter.counts = {}
        with self:
            out = true_branch(*operands)
        true_counts, self.counter.counts = self.counter.counts, copy.copy(counts)
        if out is NotImplemented:
            return out
        with self:
            false_out = false_branch(*operands)
        if false_out is NotImplemented:
            return false_out
        merged = self.counter.counts
        for k in set(true_counts) | set(merged):
            merged[k] = max(true_counts.get(k, 0), merged.get(k, 0))
        return out


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """FLOPs of one call of ``fn`` and its result."""
    with FlopCounter() as counter:
        out = fn(*args, **kwargs)
    return counter.get_total_flops(), out
