"""Nearest-mean-of-exemplars classification (iCaRL), on L2-normalised features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                normalized: bool = False) -> torch.Tensor:
    """[C, d] normalised mean of the normalised ``features`` [N, d] of each class (labels [N]).

    ``normalized``: the rows are already normalised, or are sums of normalised features (an exemplar's
    and its mirror's, iCaRL's and LUCIR's flipped class means: normalise(Σ n(f) + n(f′))), and are
    summed as given; normalising such a sum again would weight the exemplars unequally.
    A class with no sample gets a zero row (:func:`nme_logits` never predicts it).
    """
    feats = features.float() if normalized else F.normalize(features.float(), dim=1)
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels.to(feats.device), feats)
    return F.normalize(sums, dim=1)


def nme_logits(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[N, C] cosine similarity of the normalised ``features`` [N, d] to the class ``means`` [C, d];
    -inf for a class whose mean is a zero row (no exemplar): a cosine of 0 would beat every class
    when a feature's cosines are all negative (LUCIR's features, its last ReLU removed, can be)."""
    logits = F.normalize(features.float(), dim=1) @ means.T
    return logits.masked_fill(means.norm(dim=1) == 0, float("-inf"))
