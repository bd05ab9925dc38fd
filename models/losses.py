"""Loss terms shared by learners."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Knowledge distillation: cross-entropy between softened teacher and student, batch mean.

    logits, teacher_logits: [B, C]. As in PyCIL (no T² factor), so published defaults carry over.
    """
    log_p = F.log_softmax(logits.float() / T, dim=1)
    q = F.softmax(teacher_logits.float() / T, dim=1)
    return -(q * log_p).sum(dim=1).mean()
