"""Weight alignment (Zhao et al. 2020, "WA"), as DER and FOSTER use it after training a phase.

The classifier's new-class rows grow larger norms than the old-class rows (the new classes have far
more training samples), which biases predictions towards them. Alignment rescales the new rows so
that their mean norm matches the old rows' mean norm.
"""
from __future__ import annotations

import torch


def alignment_gamma(weight: torch.Tensor, num_old: int, wa_value: float = 1.0) -> float:
    """The factor applied to the new-class rows of ``weight``.

    weight: [C, d], rows of the old classes first (``num_old`` of them), then the new classes.
    gamma = mean_c<num_old ||w_c|| / mean_c>=num_old ||w_c|| · wa_value^(num_old / num_new)
    (PyCIL's ``weight_align``; ``wa_value`` = 1, the default everywhere, is plain WA).
    """
    num_new = weight.shape[0] - num_old
    if num_old <= 0 or num_new <= 0:
        raise ValueError(f"alignment needs old and new rows, got num_old={num_old} of {weight.shape[0]} rows")
    norms = weight.detach().float().norm(dim=1)
    gamma = norms[:num_old].mean() / norms[num_old:].mean()
    return float(gamma) * wa_value ** (num_old / num_new)


def align_weights(weight: torch.Tensor, num_old: int, wa_value: float = 1.0) -> torch.Tensor:
    """A copy of ``weight`` [C, d] whose new-class rows (index ≥ ``num_old``) are multiplied by
    :func:`alignment_gamma`; the old rows are unchanged."""
    gamma = alignment_gamma(weight, num_old, wa_value)
    out = weight.detach().clone()
    out[num_old:] *= gamma
    return out
