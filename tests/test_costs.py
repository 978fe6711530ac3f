"""FLOP counting: the total-only counter against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness.core.backbones import build_backbone
from harness.core.flops import FlopCounter
from methods.common import batch_mean_fisher, diagonal_fisher


def _both(fn):
    """(FlopCounterMode's total, FlopCounter's total) of fn(), each on a fresh call."""
    with FlopCounterMode(display=False) as ref:
        fn()
    with FlopCounter() as new:
        fn()
    return ref.get_total_flops(), new.get_total_flops()


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def test_counter_equals_flopcountermode_on_an_mlp_step():
    torch.manual_seed(0)
    model = build_backbone("mlp", (1, 28, 28), 10)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    ref, new = _both(_train_step(model, x, y))
    macs = 784 * 400 + 400 * 400 + 400 * 10
    assert ref == new == 32 * (2 * macs + 2 * macs + 2 * (400 * 400 + 400 * 10))


def test_counter_equals_flopcountermode_on_a_small_resnet_step():
    torch.manual_seed(0)
    model = build_backbone("resnet18-reduced", (3, 16, 16), 10)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    ref, new = _both(_train_step(model, x, y))
    assert ref == new > 0
    model.eval()
    with torch.no_grad():
        ref, new = _both(lambda: model(x))
    assert ref == new > 0


@pytest.mark.parametrize("per_sample", ["vmap", "linear"])
def test_counter_equals_flopcountermode_on_per_sample_fisher_passes(per_sample):
    """EWC's per-sample gradients (torch.func vmap(grad) or the closed form for Linear layers)."""
    torch.manual_seed(0)
    model = build_backbone("mlp", (1, 28, 28), 10)
    batches = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    ref, new = _both(lambda: diagonal_fisher(model, batches, per_sample=per_sample))
    assert ref == new > 0
    ref, new = _both(lambda: batch_mean_fisher(model, batches))
    assert ref == new > 0


def test_counter_equals_flopcountermode_on_decomposed_ops_and_cond():
    """Operators that reach the mode only through their decomposition (matmul of 3-D tensors,
    einsum, F.linear on 3-D input) and torch.cond, whose count follows FlopCounterMode's rule
    (the larger branch while nothing was counted yet, both branches after)."""
    torch.manual_seed(0)
    a, b, w = torch.randn(4, 5, 6), torch.randn(6, 7), torch.randn(3, 6)

    def ops():
        torch.matmul(a, b)
        torch.einsum("bij,jk->bik", a, b)
        F.linear(a, w)
        F.scaled_dot_product_attention(a, a, a)

    ref, new = _both(ops)
    assert ref == new > 0

    def true_fn(x):
        return (x @ x.T) @ x

    def false_fn(x):
        return x @ x.T @ x @ x.T @ x

    x = torch.randn(4, 4)
    for prefix in (False, True):
        def with_cond(prefix=prefix):
            if prefix:
                x @ x
            torch.cond(x.sum() > 0, true_fn, false_fn, (x,))
        ref, new = _both(with_cond)
        assert ref == new > 0


def test_counter_accumulates_when_entered_again():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    c = FlopCounter()
    with c:
        a @ b
    a @ b  # not counted
    with c:
        a @ b
    assert c.get_total_flops() == 2 * (2 * 3 * 4 * 5)
    with pytest.raises(RuntimeError, match="already entered"), c, c:
        pass
