"""Nearest-mean-of-exemplars classification (iCaRL), on L2-normalised features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, d] normalised mean of the normalised ``features`` [N, d] of each class (labels [N]).

    A class with no sample gets a zero row (it can never be the nearest mean of a normalised feature
    by cosine similarity unless every class is empty).
    """
    feats = F.normalize(features.float(), dim=1)
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels.to(feats.device), feats)
    return F.normalize(sums, dim=1)


def nme_logits(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[N, C] cosine similarity of the normalised ``features`` [N, d] to the class ``means`` [C, d]."""
    return F.normalize(features.float(), dim=1) @ means.T
