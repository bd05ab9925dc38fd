"""Herding selection of exemplars (Welling 2009, as used by iCaRL), with optional per-exemplar costs."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def herding_order(features: torch.Tensor, max_picks: int | None = None) -> torch.Tensor:
    """Order in which herding picks the samples of one class.

    Args:
        features: [n, d] features of the class's samples (L2-normalised here).
        max_picks: stop after this many picks (default: all n).
    Returns:
        int64 [min(n, max_picks)]: distinct sample indices; the mean of the first k picked features is,
        greedily, the closest to the class mean for every k.
    """
    feats = F.normalize(features.float(), dim=1)
    n = feats.shape[0]
    picks = n if max_picks is None else min(n, max_picks)
    mu = feats.mean(dim=0)
    running = torch.zeros_like(mu)
    available = torch.ones(n, dtype=torch.bool, device=feats.device)
    order = torch.empty(picks, dtype=torch.long)
    for k in range(1, picks + 1):
        # distance of the mean after adding each candidate: ||mu - (running + f_i) / k||
        dist = (mu[None, :] - (running[None, :] + feats) / k).norm(dim=1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        order[k - 1] = i
        available[i] = False
        running += feats[i]
    return order


def budget_prefix(costs: torch.Tensor, budget: float) -> int:
    """Length of the longest prefix of ``costs`` [n] (in pick order) whose sum is ≤ ``budget``.

    The pick that would exceed the budget is not added (SPEC.md §3 step 6). A small tolerance
    absorbs float rounding of sums like 0.25 * 4.
    """
    if costs.numel() == 0:
        return 0
    total = torch.cumsum(costs.double(), dim=0)
    return int((total <= budget + 1e-9).sum())
