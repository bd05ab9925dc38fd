"""The safe PAU with its first and second derivatives written out: one autograd function per level.

``R(x) = P(x) / Q(x)``, ``P(x) = Σ_{k=0..5} a_k x^k``, ``Q(x) = 1 + Σ_{k=1..4} |b_k| |x|^k`` (``convs/pau.py``).

Differentiated by autograd, the Horner steps of ``PAU`` cost an element-wise op each forward,
several each backward (every scalar coefficient's gradient a reduction over the whole tensor), and
more again for the gradient of that backward, which CIM's bilevel step takes (SPEC §3.2: the inner step's gradient is
differentiated w.r.t. φ). Here each level is one function of closed-form expressions:

* level 0, :func:`value`: ``y = R(x)``;
* level 1, :func:`grad` (the backward of level 0, for upstream ``g``): ``∂/∂x = g R'(x)``,
  ``∂/∂a_k = Σ g x^k / Q``, ``∂/∂b_k = −sign(b_k) Σ g P |x|^k / Q²``;
* level 2, :func:`grad_grad` (the backward of level 1, for upstreams ``hx, ha, hb``): its gradients
  w.r.t. ``g``, ``x``, ``a`` and ``b``.

Level 2 is not differentiated again (``once_differentiable``): the bilevel step needs no third
derivative. On a CUDA device with Triton each level is one fused kernel (``convs/pau_triton.py``)
and its coefficient sums are block partial sums added in a fixed order (deterministic); elsewhere
the same formulas run as torch ops (below), which is also what the kernels are tested against.
The derivatives of ``|x|`` and ``|b_k|`` at 0 are taken as autograd takes them (``sign(0) = 0``).

Every level works on 1-D float32 tensors in memory order; :func:`pau_closed_form` maps any dense
layout (contiguous, channels_last) onto them and back without copies.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["pau_closed_form", "value", "grad", "grad_grad", "kernels_for"]


# ---- the formulas as torch ops (1-D float32; a [6], b [4]) -------------------------------------------
def _exponents(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponents of P's terms (0..5) and of Q's (1..4), as x's dtype on x's device."""
    return (torch.arange(6, dtype=x.dtype, device=x.device), torch.arange(1, 5, dtype=x.dtype, device=x.device))


def _polys(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """Powers of x and |x|, and P, P', P'', Q, Q_u, Q_uu (derivatives of Q w.r.t. u = |x|).

    Shapes: x [N], a [6], b [4] → xp [6, N] (x^0..x^5), up [5, N] (u^0..u^4), the rest [N]."""
    xp = _powers(x, 6)
    up = _powers(x.abs(), 5)
    c = b.abs()
    k_a, k_b = _exponents(x)
    p = a @ xp
    dp = (a[1:] * k_a[1:]) @ xp[:5]
    ddp = (a[2:] * k_a[2:] * (k_a[2:] - 1)) @ xp[:4]
    q = 1 + c @ up[1:]
    dq = (c * k_b) @ up[:4]
    ddq = (c[1:] * k_b[1:] * (k_b[1:] - 1)) @ up[:3]
    return xp, up, p, dp, ddp, q, dq, ddq


def _powers(t: torch.Tensor, n: int) -> torch.Tensor:
    """[n, N]: t^0 … t^(n−1) of a 1-D tensor t."""
    out = torch.empty((n,) + t.shape, dtype=t.dtype, device=t.device)
    out[0] = 1
    for k in range(1, n):
        torch.mul(out[k - 1], t, out=out[k])
    return out


def value(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Level 0. x [N] float32 → R(x) [N] (Horner's scheme, in place after the first step), into
    ``out`` [N] when given."""
    u = x.abs()
    num = (x * a[5]).add_(a[4])
    for k in (3, 2, 1, 0):
        num.mul_(x).add_(a[k])
    c = b.abs()
    den = (u * c[3]).add_(c[2])
    for k in (1, 0):
        den.mul_(u).add_(c[k])
    return torch.div(num, den.mul_(u).add_(1.0), out=num if out is None else out)


def grad(g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gx: torch.Tensor | None = None):
    """Level 1: the gradients of ``Σ g · R(x)`` (the one w.r.t. x into ``gx`` when given).

    Shapes: g, x [N]; a [6]; b [4] → (gx [N], ga [6], gb [4])."""
    xp, up, p, dp, _, q, dq, _ = _polys(x, a, b)
    sx = torch.sign(x)
    inv_q = q.reciprocal()
    r_prime = (dp - p * dq * sx * inv_q) * inv_q
    g_q = g * inv_q
    ga = xp @ g_q
    gb = -torch.sign(b) * (up[1:] @ (g_q * p * inv_q))
    return torch.mul(g, r_prime, out=gx), ga, gb


def grad_grad(hx: torch.Tensor, ha: torch.Tensor, hb: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
              a: torch.Tensor, b: torch.Tensor, d_g: torch.Tensor | None = None, d_x: torch.Tensor | None = None):
    """Level 2: the gradients of ``Σ hx · gx + ha · ga + hb · gb`` (the outputs of :func:`grad`)
    w.r.t. g, x, a and b (the first two into ``d_g`` and ``d_x`` when given).

    Shapes: hx, g, x [N]; ha, a [6]; hb, b [4] → (∂g [N], ∂x [N], ∂a [6], ∂b [4])."""
    xp, up, p, dp, ddp, q, dq, ddq = _polys(x, a, b)
    sx = torch.sign(x)
    sb = torch.sign(b)
    inv_q = q.reciprocal()
    k_a, k_b = _exponents(x)
    qx = dq * sx                       # dQ/dx
    qxx = ddq * sx * sx                # d²Q/dx² (0 at x = 0, as autograd's |x|)
    poly_a = ha @ xp                   # A(x) = Σ ha_k x^k
    dpoly_a = (ha[1:] * k_a[1:]) @ xp[:5]
    hbs = hb * sb
    poly_b = hbs @ up[1:]       # B(u) = Σ hb_k sign(b_k) u^k
    dpoly_b = (hbs * k_b) @ up[:4] * sx  # dB/dx
    r1 = (dp - p * qx * inv_q) * inv_q                                                # R'
    r2 = (ddp - (2 * dp * qx + p * qxx - 2 * p * qx * qx * inv_q) * inv_q) * inv_q    # R''
    f = (poly_a - p * poly_b * inv_q) * inv_q                                         # F = A/Q − P B/Q²
    df = (dpoly_a - poly_a * qx * inv_q
          - (dp * poly_b + p * dpoly_b - 2 * p * poly_b * qx * inv_q) * inv_q) * inv_q  # F'
    d_g = torch.add(hx * r1, f, out=d_g)
    d_x = torch.mul(g, hx * r2 + df, out=d_x)
    ghq = g * hx * inv_q
    w2 = g * (hx * qx + poly_b) * inv_q * inv_q
    d_a = torch.cat([torch.zeros_like(a[:1]), k_a[1:] * (xp[:5] @ ghq)]) - xp @ w2
    w3 = g * (2 * p * (hx * qx + poly_b) * inv_q - hx * dp - poly_a) * inv_q * inv_q
    w4 = -g * hx * p * sx * inv_q * inv_q
    d_b = sb * (up[1:] @ w3 + k_b * (up[:4] @ w4))
    return d_g, d_x, d_a, d_b


class _TorchKernels:
    """The formulas above as torch ops: any device, the reference of the Triton kernels."""
    NAME = "torch ops"
    value = staticmethod(value)
    grad = staticmethod(grad)
    grad_grad = staticmethod(grad_grad)


def kernels_for(device: torch.device):
    """The level functions for tensors on ``device``: the fused Triton kernels on a CUDA device where
    they run (``pau_triton.available``), the torch formulas otherwise."""
    if device.type == "cuda":
        from convs import pau_triton
        if pau_triton.available(device):
            return pau_triton
    return _TorchKernels


# ---- layouts: every level works on the tensors' memory in order ----------------------------------------
def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is laid out as contiguous or channels_last (both fill their memory in some order,
    with no gaps or overlaps); every other layout is copied first."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[N]: a dense tensor's memory in order (a view)."""
    return t.as_strided((t.numel(),), (1,))


def _in_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (same shape as ``ref``) with ``ref``'s strides: itself, or a copy."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def _float32(x: torch.Tensor):
    """The levels compute in float32 whatever autocast is on around them (a matrix product under
    bf16 autocast would round the coefficients' sums)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class _PAUGrad(torch.autograd.Function):
    """Level 1 as a function of (g, x, a, b); its own backward is level 2. Its outputs are tensors of
    their own (like x), not views, so callers may modify them in place."""

    @staticmethod
    def forward(ctx, g, x, a, b):
        ctx.save_for_backward(g, x, a, b)
        gx = torch.empty_like(x)
        with _float32(x):
            _, ga, gb = kernels_for(x.device).grad(_flat(g), _flat(x), a, b, gx=_flat(gx))
        return gx, ga, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, hx, ha, hb):
        g, x, a, b = ctx.saved_tensors
        hx = torch.zeros_like(x) if hx is None else _in_layout_of(hx, x)
        ha = torch.zeros_like(a) if ha is None else ha.contiguous()
        hb = torch.zeros_like(b) if hb is None else hb.contiguous()
        d_g, d_x = torch.empty_like(x), torch.empty_like(x)
        with _float32(x):
            _, _, d_a, d_b = kernels_for(x.device).grad_grad(_flat(hx), ha, hb, _flat(g), _flat(x), a, b,
                                                             d_g=_flat(d_g), d_x=_flat(d_x))
        return d_g, d_x, d_a, d_b


def _value_like(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Level 0 into a new tensor with x's shape and layout."""
    y = torch.empty_like(x)
    with _float32(x):
        kernels_for(x.device).value(_flat(x), a, b, out=_flat(y))
    return y


class _PAU(torch.autograd.Function):
    """Level 0 as a function of (x, a, b); its backward is :class:`_PAUGrad`, so it is differentiable
    once more."""

    @staticmethod
    def forward(ctx, x, a, b):
        ctx.save_for_backward(x, a, b)
        return _value_like(x, a, b)

    @staticmethod
    def backward(ctx, g):
        x, a, b = ctx.saved_tensors
        return _PAUGrad.apply(_in_layout_of(g, x), x, a, b)


def pau_closed_form(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """R(x) in float32 with closed-form first and second derivatives.

    Shapes: x any shape, float32 (a contiguous or channels_last layout is kept; others are made
    contiguous); numerator [6], denominator [4] → [same as x], float32, x's layout."""
    if not _dense(x):
        x = x.contiguous()
    a = numerator.float().contiguous()
    b = denominator.float().contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad):
        return _PAU.apply(x, a, b)
    return _value_like(x, a, b)
