"""Tests for convs/pau_closed_form.py: the PAU's closed-form first and second derivatives (CPU)."""
from __future__ import annotations

import pytest
import torch

from convs import pau_closed_form as cf
from convs.pau import PAU, RELU_INIT_DENOMINATOR, RELU_INIT_NUMERATOR, pau_parameters


def _coefficients(dtype=torch.float64, seed=0):
    """The ReLU fit moved a little; b1 stays negative, so the sign of b matters."""
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor(RELU_INIT_NUMERATOR, dtype=dtype) + 0.1 * torch.randn(6, generator=g, dtype=dtype)
    b = torch.tensor(RELU_INIT_DENOMINATOR, dtype=dtype) + 0.1 * torch.randn(4, generator=g, dtype=dtype)
    return a, b


def _direct(x, a, b):
    """R(x) = P(x) / Q(x) term by term (no Horner), differentiable by autograd."""
    return sum(a[k] * x ** k for k in range(6)) / (1 + sum(b.abs()[k] * x.abs() ** (k + 1) for k in range(4)))


def _x(n=4000, dtype=torch.float64, seed=1):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 4   # |x| up to ~15
    x[:3] = 0.0                                  # |x|'s kink: autograd's sign(0) = 0
    return x


def test_each_level_equals_autograd_of_the_direct_formula():
    """Known answers in float64: level 1 = autograd's gradient of Σ g R(x); level 2 = autograd's
    gradient of Σ hx·gx + ha·ga + hb·gb (a double backward), w.r.t. g, x, a, b."""
    a, b = _coefficients()
    x = _x()
    gen = torch.Generator().manual_seed(2)
    g, hx = torch.randn(x.shape, generator=gen, dtype=x.dtype), torch.randn(x.shape, generator=gen, dtype=x.dtype)
    ha, hb = torch.randn(6, generator=gen, dtype=x.dtype), torch.randn(4, generator=gen, dtype=x.dtype)
    torch.testing.assert_close(cf.value(x, a, b), _direct(x, a, b), rtol=1e-12, atol=1e-12)

    xr, ar, br, gr = (t.clone().requires_grad_() for t in (x, a, b, g))
    first = torch.autograd.grad((gr * _direct(xr, ar, br)).sum(), [xr, ar, br], create_graph=True)
    for got, want in zip(cf.grad(g, x, a, b), first):
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
    dot = (hx * first[0]).sum() + (ha * first[1]).sum() + (hb * first[2]).sum()
    second = torch.autograd.grad(dot, [gr, xr, ar, br])
    for got, want in zip(cf.grad_grad(hx, ha, hb, g, x, a, b), second):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_and_gradgradcheck(layout):
    a, b = _coefficients()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    inputs = (x.requires_grad_(), a.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(cf._PAU.apply, inputs)
    assert torch.autograd.gradgradcheck(cf._PAU.apply, inputs)
    y = cf._PAU.apply(*inputs)
    assert y.stride() == x.stride()                      # the output keeps the input's layout


def test_gradients_arriving_in_another_layout_are_read_in_the_inputs():
    """A gradient whose strides differ from x's (channels_last, expanded from a mean) is read
    element by element, not memory by memory."""
    a, b = _coefficients()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).requires_grad_()
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    (gx,) = torch.autograd.grad(cf._PAU.apply(x, a, b), x, g)
    (want,) = torch.autograd.grad(_direct(x, a, b), x, g)
    torch.testing.assert_close(gx, want)
    (gx,) = torch.autograd.grad(cf._PAU.apply(x, a, b).mean(), x)
    (want,) = torch.autograd.grad(_direct(x, a, b).mean(), x)
    torch.testing.assert_close(gx, want)


@pytest.mark.parametrize("view", ["transposed", "strided", "expanded"])
def test_inputs_in_other_layouts_are_read_element_by_element(view):
    """Neither contiguous nor channels_last: the input is copied to a contiguous one first, so the
    values and gradients are those of the same elements in any layout."""
    a, b = _coefficients(torch.float32)
    base = (torch.randn(6, 10, generator=torch.Generator().manual_seed(4)) * 3).requires_grad_()
    make = {"transposed": lambda t: t.t(), "strided": lambda t: t[:, ::2],
            "expanded": lambda t: t[:1].expand(4, 10)}[view]
    x = make(base)                                     # float32, as the PAU hands it over
    assert not cf._dense(x)
    got = cf.pau_closed_form(x, a, b)
    assert got.shape == x.shape
    x64 = make(base.detach().double().requires_grad_())
    torch.testing.assert_close(got.double(), _direct(x64, a.double(), b.double()).detach(), rtol=1e-5, atol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), base)
    (g_want,) = torch.autograd.grad(_direct(make(base), a, b).sum(), base)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_the_output_can_be_changed_in_place():
    """Its outputs are tensors of their own, not views made inside an autograd function (which
    autograd refuses to let anyone modify in place), as the autograd PAU's are."""
    a, b = _coefficients(torch.float32)
    x = torch.randn(3, 8, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    y = cf.pau_closed_form(x, a.requires_grad_(), b.requires_grad_())
    assert y.stride() == x.stride()
    y.add_(1.0)
    torch.relu_(y)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    gx.mul_(2.0)                                           # level 1's output too
    assert torch.isfinite(gx).all()


def test_the_levels_ignore_autocast():
    """Under bf16 autocast the matrix products of the torch formulas would run in bf16 (measured:
    1.3 % off in the input's gradient); the levels switch it off."""
    a, b = _coefficients(torch.float32)
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(5)) * 3).requires_grad_()
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = torch.autograd.grad(cf.pau_closed_form(x, ar, br).pow(2).sum(), [x, ar, br])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(cf.pau_closed_form(x, ar, br).pow(2).sum(), [x, ar, br])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_the_fused_module_equals_the_autograd_module_to_second_order():
    """PAU(kernel="fused") against PAU() in float32: values, and φ's gradient through an inner
    gradient step on a small conv net (the bilevel step's pattern), to float32 rounding."""
    def run(kernel):
        torch.manual_seed(0)
        p = PAU(kernel)
        with torch.no_grad():
            a, b = _coefficients(torch.float32)
            p.numerator.copy_(a)
            p.denominator.copy_(b)
        conv1, conv2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        x = torch.randn(4, 3, 8, 8)

        def net(w):
            return p(conv2(p(torch.nn.functional.conv2d(x, w, conv1.bias, padding=1)))).mean((2, 3))
        w = conv1.weight
        inner = net(w).pow(2).mean()
        (gw,) = torch.autograd.grad(inner, w, create_graph=True)
        outer = net(w - 0.5 * gw).sum()
        with torch.no_grad():
            y = p(x)
        return y, torch.autograd.grad(outer, pau_parameters(p))
    y_auto, g_auto = run("autograd")
    y_fused, g_fused = run("fused")
    torch.testing.assert_close(y_fused, y_auto, rtol=1e-6, atol=1e-6)
    for f, a in zip(g_fused, g_auto):               # measured: 3e-7 and 1.4e-7 of the largest
        assert float((f - a).abs().max()) < 1e-5 * float(a.abs().max())


def test_the_fused_module_keeps_dtypes_and_refuses_unknown_kernels():
    p = PAU("fused")
    x = torch.randn(4, 8)
    assert p(x.half()).dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = p(x.bfloat16())
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), PAU()(x).detach(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="kernel"):
        PAU("triton")


def test_the_torch_kernels_serve_every_device_but_cuda():
    assert cf.kernels_for(torch.device("cpu")) is cf._TorchKernels
