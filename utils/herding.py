"""Herding selection of exemplars (Welling 2009, as used by iCaRL), with optional per-exemplar costs:
the variant that picks each sample once (PyCIL's, ``herding_order``) and Welling's iteration as the
original iCaRL and LUCIR code run it (``welling_herding_order``)."""
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


# The original iCaRL and LUCIR code's cap on Welling herding's iterations per class.
WELLING_MAX_ITERATIONS = 1000


def welling_herding_order(features: torch.Tensor, max_picks: int | None = None,
                          max_iterations: int = WELLING_MAX_ITERATIONS) -> torch.Tensor:
    """Order of Welling's herding (2009) as the original iCaRL and LUCIR code run it.

    w starts at the class mean μ of the L2-normalised features f; each iteration picks
    i = argmax_i ⟨w, f_i⟩ (the lowest index on ties) and moves w ← w + μ − f_i. Unlike
    :func:`herding_order`, an already picked sample can win again: it keeps its first place and
    the iteration still moves w. It stops after ``max_picks`` distinct samples (default n) or
    ``max_iterations`` iterations, whichever comes first, so the order can be shorter than asked.

    Args:
        features: [n, d] features of the class's samples.
    Returns:
        int64 [k], k ≤ min(n, max_picks): distinct sample indices in the order first picked.
    """
    feats = F.normalize(features.float(), dim=1)
    n = feats.shape[0]
    picks = n if max_picks is None else min(n, max_picks)
    mu = feats.mean(dim=0)
    w = mu.clone()
    picked = torch.zeros(n, dtype=torch.bool, device=feats.device)
    order: list[int] = []
    for _ in range(max_iterations):
        if len(order) >= picks:
            break
        i = int((feats @ w).argmax())
        if not picked[i]:
            picked[i] = True
            order.append(i)
        w += mu - feats[i]
    return torch.tensor(order, dtype=torch.long)


# config key ``herding``: its values and the order each gives
HERDING = {"distinct": herding_order, "welling": welling_herding_order}


def budget_prefix(costs: torch.Tensor, budget: float) -> int:
    """Length of the longest prefix of ``costs`` [n] (in pick order) whose sum is ≤ ``budget``.

    The pick that would exceed the budget is not added (SPEC.md §3 step 6). A small tolerance
    absorbs float rounding of sums like 0.25 * 4.
    """
    if costs.numel() == 0:
        return 0
    total = torch.cumsum(costs.double(), dim=0)
    return int((total <= budget + 1e-9).sum())
