"""Tests for convs/pau.py (CPU, fast)."""

import torch
import torch.nn as nn

from convs.pau import PAU, RELU_INIT_DENOMINATOR, RELU_INIT_NUMERATOR, pau_parameters


def _reference(x, a, b):
    """Direct (non-Horner) float64 evaluation of the safe PAU."""
    x = x.double()
    a = a.double()
    b = b.double().abs()
    num = sum(a[k] * x ** k for k in range(6))
    den = 1 + sum(b[k] * x.abs() ** (k + 1) for k in range(4))
    return num / den


def test_init_values_and_parameter_count():
    p = PAU()
    assert p.numerator.shape == (6,) and p.denominator.shape == (4,)
    assert sum(t.numel() for t in p.parameters()) == 10
    torch.testing.assert_close(p.numerator.detach(), torch.tensor(RELU_INIT_NUMERATOR))
    torch.testing.assert_close(p.denominator.detach(), torch.tensor(RELU_INIT_DENOMINATOR))
    assert RELU_INIT_NUMERATOR[0] == 0.029963801610813613
    assert RELU_INIT_DENOMINATOR[0] == -1.191550121923625


def test_close_to_relu_on_minus3_3():
    p = PAU()
    x = torch.linspace(-3, 3, 60001)
    with torch.no_grad():
        err = (p(x) - torch.relu(x)).abs().max().item()
    # Measured: 0.029964 (at x = 0, where R(0) = a0); SPEC says "within ~0.03".
    assert err < 0.0305


def test_matches_direct_formula_and_shape():
    p = PAU()
    with torch.no_grad():
        p.numerator.add_(torch.randn(6) * 0.1)
        p.denominator.add_(torch.randn(4) * 0.1)
    x = torch.randn(2, 3, 4, 5) * 4
    y = p(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), _reference(x, p.numerator, p.denominator),
                               rtol=1e-5, atol=1e-5)
    # The in-place inference path gives the same values and leaves its input alone.
    x_before = x.clone()
    with torch.no_grad():
        y_inference = p(x)
    assert torch.equal(x, x_before)
    torch.testing.assert_close(y_inference.double(), _reference(x, p.numerator, p.denominator),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_inference, y.detach(), rtol=1e-6, atol=1e-6)


def test_half_input_and_autocast():
    p = PAU()
    x = torch.randn(4, 8)
    y = p(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), p(x), rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = p(x.bfloat16())
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()


def test_second_order_gradients():
    p = PAU()
    x = torch.randn(64) * 2
    loss = p(x).pow(2).sum()
    (g_num,) = torch.autograd.grad(loss, p.numerator, create_graph=True)
    assert g_num.requires_grad and torch.isfinite(g_num).all()
    gg_num, gg_den = torch.autograd.grad(g_num.sum(), [p.numerator, p.denominator])
    assert torch.isfinite(gg_num).all() and torch.isfinite(gg_den).all()
    assert gg_num.abs().sum() > 0 and gg_den.abs().sum() > 0


def test_gradient_through_input_grad_to_phi():
    """BOP pattern: inner grad w.r.t. a weight with create_graph, outer grad reaches φ."""
    p = PAU()
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(16, 8)
    inner = p(x @ w).pow(2).mean()
    (gw,) = torch.autograd.grad(inner, w, create_graph=True)
    w_plus = w - 0.1 * gw
    outer = p(x @ w_plus).sum()
    grads = torch.autograd.grad(outer, pau_parameters(p))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_pau_parameters_nested():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.act1 = PAU()
            self.inner = nn.Sequential(nn.Linear(2, 2), PAU())

    model = nn.Sequential(PAU(), Block(), nn.ModuleList([Block(), nn.ReLU()]))
    phi = pau_parameters(model)
    assert len(phi) == 2 * 5 and sum(t.numel() for t in phi) == 50
    ids = {id(t) for t in phi}
    paus = [m for m in model.modules() if isinstance(m, PAU)]
    assert ids == {id(t) for m in paus for t in (m.numerator, m.denominator)}
    others = {id(t) for n, t in model.named_parameters()
              if not (n.endswith("numerator") or n.endswith("denominator"))}
    assert not (ids & others)
    shared = PAU()
    assert len(pau_parameters(nn.Sequential(shared, shared))) == 2
