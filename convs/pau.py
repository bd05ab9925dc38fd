"""Safe Padé Activation Unit (PAU) of degrees (5, 4), plain PyTorch.

``R(x) = (a0 + a1 x + ... + a5 x^5) / (1 + |b1||x| + |b2||x|^2 + |b3||x|^3 + |b4||x|^4)``

One scalar rational function applied elementwise to a tensor of any shape. The 10 coefficients
(``numerator`` [6] = a0..a5, ``denominator`` [4] = b1..b4) are learnable; they are the φ of the
CIM model (SPEC §3.1). The initialisation is the ReLU fit on [-3, 3] of the public
rational-activations library, so at init ``R ≈ ReLU`` (max error ≈ 0.02996 on [-3, 3],
reached at x = 0 where R(0) = a0).

Evaluation is in float32 (also under autocast / half inputs; the result is cast back to the input
dtype), in one of two ways (``PAU.kernel``):

* ``"autograd"`` (default): Horner's scheme, fused multiply-adds when a gradient is needed,
  in-place steps when not (inference). It is built from ordinary differentiable ops, so gradients
  of any order flow (``torch.autograd.grad(..., create_graph=True)`` works), as the bilevel step
  needs.
* ``"fused"``: ``convs/pau_closed_form.py``, the first and second derivatives written out, each
  level one Triton kernel on a GPU (the same formulas as torch ops elsewhere, where they are
  slower than autograd). Differentiable twice, which is what the bilevel step takes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from convs.pau_closed_form import pau_closed_form

__all__ = ["PAU", "pau_parameters", "RELU_INIT_NUMERATOR", "RELU_INIT_DENOMINATOR", "KERNELS"]

KERNELS = ("autograd", "fused")

# ReLU fit on [-3, 3], degrees (5, 4), "safe" PAU (SPEC §3.1; rational-activations library).
RELU_INIT_NUMERATOR = (0.029963801610813613, 0.6168978366891341, 2.37534759733888,
                       3.0659900472408443, 1.5246831881677423, 0.2528070864040542)
RELU_INIT_DENOMINATOR = (-1.191550121923625, 4.4080487697236626, 0.9110357113686055,
                         0.34884977946384615)


class PAU(nn.Module):
    """Safe Padé Activation Unit, degrees (5, 4), initialised to approximate ReLU.

    Parameters:
        numerator: ``[6]`` = ``(a0, ..., a5)``.
        denominator: ``[4]`` = ``(b1, ..., b4)`` (used through their absolute values).

    Attributes:
        kernel: ``"autograd"`` or ``"fused"`` (module docstring). A plain attribute, not saved in
            state dicts: the CIM plugin sets it from its ``pau_kernel`` key.

    Shape: input of any shape → output of the same shape and dtype.
    """

    def __init__(self, kernel: str = "autograd") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"PAU kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.numerator = nn.Parameter(torch.tensor(RELU_INIT_NUMERATOR, dtype=torch.float32))
        self.denominator = nn.Parameter(torch.tensor(RELU_INIT_DENOMINATOR, dtype=torch.float32))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reset the coefficients to the ReLU fit."""
        self.numerator.copy_(torch.tensor(RELU_INIT_NUMERATOR))
        self.denominator.copy_(torch.tensor(RELU_INIT_DENOMINATOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        if self.kernel == "fused":
            out = pau_closed_form(xf, self.numerator, self.denominator)
            return out if dtype == torch.float32 else out.to(dtype)
        a = self.numerator.float()
        b = self.denominator.float().abs()
        ax = xf.abs()
        # Horner: P(x) = a0 + x (a1 + x (a2 + x (a3 + x (a4 + x a5)))),
        #         Q(x) = 1 + |x| (|b1| + |x| (|b2| + |x| (|b3| + |x| |b4|))).
        if torch.is_grad_enabled() and (xf.requires_grad or self.numerator.requires_grad
                                        or self.denominator.requires_grad):
            # Differentiable to any order: each step one fused multiply-add.
            num = torch.addcmul(a[-2], a[-1], xf)
            for k in range(a.numel() - 3, -1, -1):
                num = torch.addcmul(a[k], num, xf)
            den = torch.addcmul(b[-2], b[-1], ax)
            for k in range(b.numel() - 3, -1, -1):
                den = torch.addcmul(b[k], den, ax)
            out = num / torch.addcmul(torch.ones_like(b[0]), den, ax)
        else:
            # Inference (CAMs and boxes): the same steps in place in three buffers, several times
            # faster on CPU than allocating a tensor per step.
            num = (xf * a[-1]).add_(a[-2])
            for k in range(a.numel() - 3, -1, -1):
                num.mul_(xf).add_(a[k])
            den = (ax * b[-1]).add_(b[-2])
            for k in range(b.numel() - 3, -1, -1):
                den.mul_(ax).add_(b[k])
            out = num.div_(den.mul_(ax).add_(1.0))
        return out if dtype == torch.float32 else out.to(dtype)

    def extra_repr(self) -> str:
        return f"degrees=(5, 4), safe, kernel={self.kernel!r}"


def pau_parameters(module: nn.Module) -> list[nn.Parameter]:
    """All ``numerator`` / ``denominator`` parameters of every :class:`PAU` inside ``module``
    (φ), in module order, each parameter once (shared PAUs are not repeated)."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in module.modules():
        if isinstance(m, PAU):
            for p in (m.numerator, m.denominator):
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params
