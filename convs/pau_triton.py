"""The three levels of ``convs/pau_closed_form.py`` as fused Triton kernels (one launch each, plus one
small sum of the blocks' partial coefficient sums).

Same signatures and formulas as the torch functions there (1-D float32 tensors in memory order;
a [6], b [4]); each element is read once and every polynomial is evaluated by Horner's scheme
with its derivatives. Each block of ``BLOCK`` elements writes its partial sums of the 10
coefficient gradients to its own row, and the rows are added by one ``sum`` in a fixed order, so
the results are deterministic (no atomics). Used for CUDA tensors (``kernels_for``); the tests run
them on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:      # pragma: no cover - torch's CUDA wheels ship Triton
    triton = None

__all__ = ["available", "why_unavailable", "value", "grad", "grad_grad", "BLOCK", "NUM_WARPS", "NAME"]

NAME = "Triton kernels"

BLOCK = 1024
# 8 warps: 4 elements a thread. ptxas for sm_90 (Triton 3.8): 26-30 / 40 / 64-73 registers for the
# three kernels (with and without aligned vector loads), no spills; with 4 warps the level-2 kernel
# took 136, which leaves room for a fifth of an SM's warps.
NUM_WARPS = 8
_MAX_ELEMENTS = 2 ** 31 - BLOCK      # element offsets are int32


_probed: dict[str, str | None] = {}     # device → None (the kernels run there) or why not


def available(device: torch.device | None = None) -> bool:
    """Whether Triton imports and, given ``device``, whether the three kernels build, run and agree
    with the torch formulas there (tried once per device by :func:`why_unavailable`)."""
    return why_unavailable(device) is None


def why_unavailable(device: torch.device | None = None) -> str | None:
    """None where the kernels run (see :func:`available`), else the reason. On a device the first
    call runs each level on a whole number of blocks and on a ragged size, waits for the device,
    and compares with ``pau_closed_form``'s torch formulas: a machine whose Triton cannot build
    or launch them, or builds them wrong, gets the torch formulas, not a failed bilevel step."""
    if triton is None:
        return "Triton does not import"
    if device is None:
        return None
    key = str(device)
    if key not in _probed:
        try:
            _probed[key] = _probe(torch.device(device))
        except Exception as exc:  # noqa: BLE001 - any failure to build or launch: use the torch formulas
            text = str(exc).strip()
            _probed[key] = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return _probed[key]


def _probe(device: torch.device) -> str | None:
    from convs import pau_closed_form as cf
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([0.03, 0.62, 2.38, 3.07, 1.52, 0.25]) + 0.1 * torch.randn(6, generator=gen)
    b = torch.tensor([-1.19, 4.41, 0.91, 0.35]) + 0.1 * torch.randn(4, generator=gen)
    ha, hb = torch.randn(6, generator=gen), torch.randn(4, generator=gen)
    worst = 0.0
    for n in (2 * BLOCK, BLOCK + 17):       # n % 16 == 0 and not: Triton builds each separately
        x, g, hx = (torch.randn(n, generator=gen) * 3 for _ in range(3))
        on_cpu = [cf.value(x, a, b), *cf.grad(g, x, a, b), *cf.grad_grad(hx, ha, hb, g, x, a, b)]
        x, g, hx, a_d, b_d, ha_d, hb_d = (t.to(device) for t in (x, g, hx, a, b, ha, hb))
        here = [value(x, a_d, b_d), *grad(g, x, a_d, b_d), *grad_grad(hx, ha_d, hb_d, g, x, a_d, b_d)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for got, want in zip(here, on_cpu):
            worst = max(worst, float((got.cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30)))
    return None if worst < 1e-4 else f"the kernels differ from the torch formulas by {worst:.2g} (relative)"


if triton is not None:
    @triton.jit
    def _numerator(x, a_ptr):
        """P, P', P''/2 at x (Horner with derivatives)."""
        p = tl.zeros_like(x) + tl.load(a_ptr + 5)
        dp = tl.zeros_like(x)
        hp = tl.zeros_like(x)
        for k in tl.static_range(4, -1, -1):
            hp = hp * x + dp
            dp = dp * x + p
            p = p * x + tl.load(a_ptr + k)
        return p, dp, hp

    @triton.jit
    def _denominator(u, b_ptr):
        """Q, dQ/du, (d²Q/du²)/2 at u = |x| (Q = 1 + Σ |b_k| u^k)."""
        q = tl.zeros_like(u) + tl.abs(tl.load(b_ptr + 3))
        dq = tl.zeros_like(u)
        hq = tl.zeros_like(u)
        for k in tl.static_range(2, -1, -1):
            hq = hq * u + dq
            dq = dq * u + q
            q = q * u + tl.abs(tl.load(b_ptr + k))
        hq = hq * u + dq
        dq = dq * u + q
        q = q * u + 1.0
        return q, dq, hq

    @triton.jit
    def _sign(t):
        return tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))

    @triton.jit
    def _value_kernel(x_ptr, a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        p = tl.zeros_like(x) + tl.load(a_ptr + 5)
        for k in tl.static_range(4, -1, -1):
            p = p * x + tl.load(a_ptr + k)
        u = tl.abs(x)
        q = tl.zeros_like(u) + tl.abs(tl.load(b_ptr + 3))
        for k in tl.static_range(2, -1, -1):
            q = q * u + tl.abs(tl.load(b_ptr + k))
        q = q * u + 1.0
        tl.store(y_ptr + offs, p / q, mask=mask)

    @triton.jit
    def _grad_kernel(g_ptr, x_ptr, a_ptr, b_ptr, gx_ptr, part_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)      # 0 outside: adds nothing to the sums
        u = tl.abs(x)
        sx = _sign(x)
        p, dp, hp = _numerator(x, a_ptr)
        q, dq, hq = _denominator(u, b_ptr)
        inv_q = 1.0 / q
        tl.store(gx_ptr + offs, g * (dp - p * dq * sx * inv_q) * inv_q, mask=mask)
        t = g * inv_q                    # ∂/∂a_k = Σ t x^k
        xk = tl.zeros_like(x) + 1.0
        for k in tl.static_range(0, 6):
            tl.store(part_ptr + pid * 10 + k, tl.sum(t * xk, axis=0))
            xk = xk * x
        w = t * p * inv_q                # ∂/∂b_k = −sign(b_k) Σ w u^k (the sign in the wrapper)
        uk = u
        for k in tl.static_range(0, 4):
            tl.store(part_ptr + pid * 10 + 6 + k, tl.sum(w * uk, axis=0))
            uk = uk * u

    @triton.jit
    def _grad_grad_kernel(hx_ptr, ha_ptr, hbs_ptr, g_ptr, x_ptr, a_ptr, b_ptr, dg_ptr, dx_ptr, part_ptr, n,
                          BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        hx = tl.load(hx_ptr + offs, mask=mask, other=0.0)
        u = tl.abs(x)
        sx = _sign(x)
        p, dp, hp = _numerator(x, a_ptr)
        q, dq, hq = _denominator(u, b_ptr)
        ddp = 2.0 * hp
        qx = dq * sx
        qxx = 2.0 * hq * sx * sx
        # A(x) = Σ ha_k x^k and A'; B(u) = Σ hbs_k u^k (k = 1..4) and dB/dx.
        pa, dpa, _ = _numerator(x, ha_ptr)
        pb = tl.zeros_like(u) + tl.load(hbs_ptr + 3)
        dpb = tl.zeros_like(u)
        for k in tl.static_range(2, -1, -1):
            dpb = dpb * u + pb
            pb = pb * u + tl.load(hbs_ptr + k)
        dpb = (dpb * u + pb) * sx
        pb = pb * u
        inv_q = 1.0 / q
        r1 = (dp - p * qx * inv_q) * inv_q
        r2 = (ddp - (2.0 * dp * qx + p * qxx - 2.0 * p * qx * qx * inv_q) * inv_q) * inv_q
        f = (pa - p * pb * inv_q) * inv_q
        df = (dpa - pa * qx * inv_q - (dp * pb + p * dpb - 2.0 * p * pb * qx * inv_q) * inv_q) * inv_q
        tl.store(dg_ptr + offs, hx * r1 + f, mask=mask)
        tl.store(dx_ptr + offs, g * (hx * r2 + df), mask=mask)
        ghq = g * hx * inv_q
        w2 = g * (hx * qx + pb) * inv_q * inv_q
        xk = tl.zeros_like(x) + 1.0       # x^(j−1) for term j: j ghq x^(j−1) − w2 x^j
        tl.store(part_ptr + pid * 10, tl.sum(-w2, axis=0))
        for j in tl.static_range(1, 6):
            tl.store(part_ptr + pid * 10 + j, tl.sum((j * ghq - w2 * x) * xk, axis=0))
            xk = xk * x
        w3 = g * (2.0 * p * (hx * qx + pb) * inv_q - hx * dp - pa) * inv_q * inv_q
        w4 = -g * hx * p * sx * inv_q * inv_q
        uk = tl.zeros_like(u) + 1.0       # u^(j−1) for term j: (w3 u + j w4) u^(j−1)
        for j in tl.static_range(1, 5):
            tl.store(part_ptr + pid * 10 + 5 + j, tl.sum((w3 * u + j * w4) * uk, axis=0))
            uk = uk * u


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def _too_large(n: int) -> bool:
    return n > _MAX_ELEMENTS


def _on(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device, which a run on ``cuda:1``
    outside torchrun does not change."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def value(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Level 0 (``pau_closed_form.value``): x [N] → R(x) [N] (into ``out`` when given)."""
    if _too_large(x.numel()):
        from convs import pau_closed_form
        return pau_closed_form.value(x, a, b, out=out)
    y = torch.empty_like(x) if out is None else out
    with _on(x.device):
        _value_kernel[(_blocks(x.numel()),)](x, a, b, y, x.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


def grad(g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gx: torch.Tensor | None = None):
    """Level 1 (``pau_closed_form.grad``): (g, x [N]; a [6]; b [4]) → (gx [N], ga [6], gb [4])."""
    n = x.numel()
    if _too_large(n):
        from convs import pau_closed_form
        return pau_closed_form.grad(g, x, a, b, gx=gx)
    gx = torch.empty_like(x) if gx is None else gx
    part = torch.empty((_blocks(n), 10), dtype=torch.float32, device=x.device)
    with _on(x.device):
        _grad_kernel[(_blocks(n),)](g, x, a, b, gx, part, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    sums = part.sum(0)
    return gx, sums[:6].clone(), -torch.sign(b) * sums[6:]


def grad_grad(hx: torch.Tensor, ha: torch.Tensor, hb: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
              a: torch.Tensor, b: torch.Tensor, d_g: torch.Tensor | None = None, d_x: torch.Tensor | None = None):
    """Level 2 (``pau_closed_form.grad_grad``): → (∂g [N], ∂x [N], ∂a [6], ∂b [4])."""
    n = x.numel()
    if _too_large(n):
        from convs import pau_closed_form
        return pau_closed_form.grad_grad(hx, ha, hb, g, x, a, b, d_g=d_g, d_x=d_x)
    sb = torch.sign(b)
    d_g = torch.empty_like(x) if d_g is None else d_g
    d_x = torch.empty_like(x) if d_x is None else d_x
    part = torch.empty((_blocks(n), 10), dtype=torch.float32, device=x.device)
    with _on(x.device):
        _grad_grad_kernel[(_blocks(n),)](hx, ha, (hb * sb).contiguous(), g, x, a, b, d_g, d_x, part, n,
                                         BLOCK=BLOCK, num_warps=NUM_WARPS)
    sums = part.sum(0)
    return d_g, d_x, sums[:6].clone(), sb * sums[6:]
