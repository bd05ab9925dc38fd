"""utils/masked_adam.py: clipped Adam whose step a device flag keeps or drops."""
from __future__ import annotations

import math

import pytest
import torch

from utils.masked_adam import MaskedAdam


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(6,), (4,), (2, 3), (5,)]]


def _grads(step: int, params, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [scale * torch.randn(p.shape, generator=g) for p in params]


def _reference(params, grads_per_step, lr, max_norm, wd, skip=(), lrs=None):
    """torch.nn.utils.clip_grad_norm_ then torch.optim.Adam, with the skipped steps left out."""
    opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
    for k, grads in enumerate(grads_per_step):
        if k in skip:
            continue
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[k]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
        opt.step()


@pytest.mark.parametrize("max_norm", [0.5, 100.0])   # clipping active / never active
def test_masked_adam_equals_clip_then_torch_adam(max_norm):
    mine, ref = _params(), _params()
    steps = [_grads(k, mine, scale=3.0) for k in range(6)]
    lrs = [0.01 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    opt = MaskedAdam(mine, lr=0.01, max_norm=max_norm, weight_decay=5e-4)
    for k, grads in enumerate(steps):
        opt.set_lr(lrs[k])
        opt.step(grads, torch.tensor(True))
    _reference(ref, steps, 0.01, max_norm, 5e-4, lrs=lrs)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert float(opt.steps) == 6


def test_a_step_flagged_off_changes_nothing_even_with_nonfinite_gradients():
    mine, ref = _params(), _params()
    steps = [_grads(k, mine) for k in range(5)]
    steps[2][1][0] = float("nan")
    steps[3][0][2] = float("inf")
    opt = MaskedAdam(mine, lr=0.01, max_norm=1.0, weight_decay=5e-4)
    for k, grads in enumerate(steps):
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        before = [p.detach().clone() for p in mine], opt.exp_avg.clone(), opt.exp_avg_sq.clone()
        opt.step(grads, finite)
        if k in (2, 3):
            assert all(torch.equal(a, p.detach()) for a, p in zip(before[0], mine))
            assert torch.equal(before[1], opt.exp_avg) and torch.equal(before[2], opt.exp_avg_sq)
    _reference(ref, steps, 0.01, 1.0, 5e-4, skip={2, 3})
    for a, b in zip(mine, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert float(opt.steps) == 3


def test_a_parameter_without_gradient_is_left_alone_as_torch_adam_leaves_it():
    mine, ref = _params(), _params()
    steps = [[None if i == 1 else g for i, g in enumerate(_grads(k, mine))] for k in range(4)]
    opt = MaskedAdam(mine, lr=0.05, max_norm=1.0, weight_decay=1e-2)
    untouched = mine[1].detach().clone()
    for grads in steps:
        opt.step(grads, torch.tensor(True))
    _reference(ref, steps, 0.05, 1.0, 1e-2)
    assert torch.equal(mine[1].detach(), untouched)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert not opt.exp_avg[6:10].any()        # the moments of the parameter without gradient stay 0
