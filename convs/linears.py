"""Classifier heads and the pure functions learners use to grow them.

Every head maps features [B, in_dim] to a dict with at least ``"logits"`` [B, out_dim], has
``out_dim`` and ``weight_rows() -> [out_dim, in_dim]``: the class weight rows that the CAM uses
(SPEC §3 step 1: normalised for cosine heads, raw for the plain linear head).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import ConfigError


class SimpleLinear(nn.Module):
    """Bias-free linear head: logits = x W^T.

    x [B, in_dim] -> {"logits": [B, out_dim]}. No bias so that the CAM ``w_y · F(x)`` is the
    head's own class score map (SPEC §3 step 1).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PyCIL's SimpleLinear init (gain 1: the head is followed by no nonlinearity).
        nn.init.kaiming_uniform_(self.weight, nonlinearity="linear")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": F.linear(x, self.weight)}

    def weight_rows(self) -> torch.Tensor:
        """[out_dim, in_dim] raw weight rows."""
        return self.weight

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"


class CosineLinear(nn.Module):
    """Cosine classifier (LUCIR): logits = sigma * <x/|x|, w_c/|w_c|>.

    x [B, in_dim] -> {"logits": [B, out_dim] scaled, "cosine": [B, out_dim] unscaled}; the raw
    cosines feed LUCIR's margin-ranking loss. ``sigma`` is a learnable scalar initialised to 1, or
    None (``sigma=False``), in which case logits == cosine.
    """

    def __init__(self, in_dim: int, out_dim: int, sigma: bool = True) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.sigma = nn.Parameter(torch.ones(())) if sigma else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LUCIR's init; the scale of the rows does not matter after normalisation.
        stdv = 1.0 / math.sqrt(self.in_dim)
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.sigma is not None:
            nn.init.ones_(self.sigma)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cosine = F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))
        logits = cosine if self.sigma is None else self.sigma * cosine
        return {"logits": logits, "cosine": cosine}

    def weight_rows(self) -> torch.Tensor:
        """[out_dim, in_dim] L2-normalised weight rows."""
        return F.normalize(self.weight, dim=1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, sigma={self.sigma is not None}"


class SplitCosineLinear(nn.Module):
    """LUCIR's cosine head split into old-class rows ``fc1`` and new-class rows ``fc2``.

    Both halves are :class:`CosineLinear` without their own scale; one shared learnable ``sigma``
    (init 1, or None with ``sigma=False``) scales both. The split lets a learner treat old and new
    rows differently (e.g. freeze ``fc1``, imprint ``fc2``).

    x [B, in_dim] -> {"logits": sigma * cosine, "cosine": [B, old_out + new_out]} with classes in
    order old then new.
    """

    def __init__(self, in_dim: int, old_out: int, new_out: int, sigma: bool = True) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = old_out + new_out
        self.fc1 = CosineLinear(in_dim, old_out, sigma=False)
        self.fc2 = CosineLinear(in_dim, new_out, sigma=False)
        self.sigma = nn.Parameter(torch.ones(())) if sigma else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cosine = torch.cat([self.fc1(x)["cosine"], self.fc2(x)["cosine"]], dim=1)
        logits = cosine if self.sigma is None else self.sigma * cosine
        return {"logits": logits, "cosine": cosine}

    def weight_rows(self) -> torch.Tensor:
        """[out_dim, in_dim] L2-normalised weight rows, old classes first."""
        return torch.cat([self.fc1.weight_rows(), self.fc2.weight_rows()], dim=0)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, old_out={self.fc1.out_dim}, new_out={self.fc2.out_dim}, "
                f"sigma={self.sigma is not None}")


# ---------------------------------------------------------------- growing heads (pure: new objects)

def expand_linear(head: SimpleLinear, new_out: int, *, in_dim: int | None = None) -> SimpleLinear:
    """A fresh SimpleLinear with ``new_out`` outputs (the new TOTAL, not the increment) whose first
    ``head.out_dim`` rows equal ``head``'s.

    ``in_dim`` (default ``head.in_dim``) may grow too, for heads over concatenated backbones
    (DER, FOSTER): the old block is copied into the first ``head.in_dim`` columns and every other
    entry keeps its fresh initialisation, as PyCIL does. The old head is not modified.

    Raises:
        ConfigError: ``new_out <= head.out_dim`` (most likely the increment was passed instead of
            the total) or ``in_dim < head.in_dim``.
    """
    in_dim = head.in_dim if in_dim is None else in_dim
    if new_out <= head.out_dim:
        raise ConfigError(f"expand_linear: new_out={new_out} must exceed the current "
                          f"out_dim={head.out_dim} (it is the new total number of classes)")
    if in_dim < head.in_dim:
        raise ConfigError(f"expand_linear: in_dim={in_dim} < current in_dim={head.in_dim}")
    new = SimpleLinear(in_dim, new_out).to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight[: head.out_dim, : head.in_dim] = head.weight
    return new


def merge_split_cosine(head: SplitCosineLinear) -> CosineLinear:
    """One CosineLinear holding ``fc1``'s rows then ``fc2``'s and the shared sigma.

    Raw (unnormalised) weights are concatenated, so logits and cosines are unchanged.
    """
    merged = CosineLinear(head.in_dim, head.out_dim, sigma=head.sigma is not None)
    merged = merged.to(device=head.fc1.weight.device, dtype=head.fc1.weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(torch.cat([head.fc1.weight, head.fc2.weight], dim=0))
        if head.sigma is not None:
            merged.sigma.copy_(head.sigma)
    return merged


def split_cosine(head: CosineLinear | SplitCosineLinear, num_new: int) -> SplitCosineLinear:
    """LUCIR's head update for a new phase: all current rows become ``fc1`` (old classes), ``num_new``
    freshly initialised rows become ``fc2``; sigma is kept.

    A SplitCosineLinear is merged first, so a phase's split is always [all old | new].
    """
    if isinstance(head, SplitCosineLinear):
        head = merge_split_cosine(head)
    if num_new <= 0:
        raise ConfigError(f"split_cosine: num_new={num_new} must be positive")
    split = SplitCosineLinear(head.in_dim, head.out_dim, num_new, sigma=head.sigma is not None)
    split = split.to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        split.fc1.weight.copy_(head.weight)
        if head.sigma is not None:
            split.sigma.copy_(head.sigma)
    return split
