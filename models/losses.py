"""Loss terms shared by learners."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


MaskCount = Callable[[torch.Tensor], torch.Tensor]


def mask_count(mask: torch.Tensor) -> torch.Tensor:
    """The divisor of a mean over the bool ``mask`` [B] in one process: its count (at least 1)."""
    return mask.sum().clamp(min=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None, count: MaskCount | None = None) -> torch.Tensor:
    """Mean of per-sample ``values`` [B] over the bool ``mask`` [B]; None = the plain mean; an empty
    mask gives 0 (a batch with no sample for a term contributes nothing to it). ``count``: the
    divisor for a mask (``Batch.mask_count``: under DDP the global batch's count, so that the ranks'
    terms average to the global batch's); None = :func:`mask_count`."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / (count or mask_count)(mask)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                  count: MaskCount | None = None) -> torch.Tensor:
    """Cross-entropy of logits [B, C] and labels [B], mean over the samples of ``mask`` (all if None,
    then exactly ``F.cross_entropy``; ``count`` as in :func:`masked_mean`)."""
    if mask is None:
        return F.cross_entropy(logits, y)
    return masked_mean(F.cross_entropy(logits, y, reduction="none"), mask, count)


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, T: float,
            mask: torch.Tensor | None = None, count: MaskCount | None = None) -> torch.Tensor:
    """Knowledge distillation: cross-entropy between softened teacher and student, mean over the
    samples of ``mask`` (all if None).

    logits, teacher_logits: [B, C]. As in PyCIL (no T² factor), so published defaults carry over.
    """
    log_p = F.log_softmax(logits.float() / T, dim=1)
    q = F.softmax(teacher_logits.float() / T, dim=1)
    return masked_mean(-(q * log_p).sum(dim=1), mask, count)


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Class-balanced weights from per-class sample counts (Cui et al. 2019, as FOSTER uses them).

    counts: [C] real numbers of training samples per class (old classes: their exemplars; new
    classes: their images). w_c = (1 − β) / (1 − β^{n_c}), normalised so that Σ_c w_c = C.
    A class with no samples is treated as having one (its weight stays finite).
    Returns float32 [C] on ``counts``' device.
    """
    n = counts.double().clamp(min=1.0)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64, device=n.device), n))
    return (w / w.sum() * n.numel()).float()


def inverse_count_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per-class weights that make every class weigh alike over a pass of data with ``counts``.

    counts: [C] samples per class. w_c = N / (C' · n_c) for the C' classes with n_c > 0 (0 for
    the others), N = Σ n_c: each present class's samples then sum to N / C', and a sample weighs
    1 on average (all ones when the counts are equal, so a weighted mean is the plain one).
    Returns float32 [C] on ``counts``' device.
    """
    n = counts.double()
    present = n > 0
    w = torch.where(present, n.sum() / (present.sum().clamp(min=1) * n.clamp(min=1)), torch.zeros_like(n))
    return w.float()


def balanced_kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, T: float,
                     weights: torch.Tensor, mask: torch.Tensor | None = None,
                     count: MaskCount | None = None) -> torch.Tensor:
    """FOSTER's class-balanced distillation ("BKD"): the teacher's softened probabilities are
    reweighted per class and renormalised before the cross-entropy with the student's.

    logits, teacher_logits: [B, C]; weights: [C] (from :func:`class_balanced_weights`). Mean over
    the samples of ``mask`` (all if None).
    """
    log_p = F.log_softmax(logits.float() / T, dim=1)
    q = F.softmax(teacher_logits.float() / T, dim=1) * weights
    q = q / q.sum(dim=1, keepdim=True)
    return masked_mean(-(q * log_p).sum(dim=1), mask, count)
