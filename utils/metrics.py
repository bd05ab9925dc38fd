"""Accuracy metrics of class-incremental learning (pure functions, percentages).

Definitions (SPEC.md §1): accuracy per task uses the real phase boundaries; average incremental
accuracy is the mean of the per-phase top-1 values including phase 0; forgetting is the mean, over
the tasks learnt before the last phase, of (best accuracy on that task before the last phase − its
accuracy after the last phase); ``forgetting_pycil`` takes the best over every phase, the last
included (PyCIL's, never negative).
"""
from __future__ import annotations

from typing import Sequence

import torch


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [N]: whether ``targets`` [N] is among the ``k`` largest of ``logits`` [N, C]."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1)


def _percent(hits: torch.Tensor) -> float | None:
    return None if hits.numel() == 0 else round(100.0 * hits.float().mean().item(), 4)


def accuracy_report(logits: torch.Tensor, targets: torch.Tensor, task_bounds: Sequence[tuple[int, int]],
                    k: int = 5) -> dict:
    """Accuracies of one model after one phase.

    Args:
        logits: [N, C] scores over the C classes seen so far.
        targets: [N] labels in [0, C).
        task_bounds: the phases' class ranges ``[(first, last_exclusive), ...]``; the last one is
            the current phase's new classes.
    Returns:
        ``{"top1", "top5", "per_task": [...], "old", "new"}`` in percent (``old`` is None in phase 0).
        ``top5`` holds top-``k``.
    """
    correct = logits.argmax(dim=1) == targets
    in_topk = topk_hits(logits, targets, k)
    per_task = [_percent(correct[(targets >= lo) & (targets < hi)]) for lo, hi in task_bounds]
    first_new = task_bounds[-1][0]
    return {
        "top1": _percent(correct),
        "top5": _percent(in_topk),
        "per_task": per_task,
        "old": _percent(correct[targets < first_new]) if first_new > 0 else None,
        "new": _percent(correct[targets >= first_new]),
    }


def average_incremental_accuracy(top1_per_phase: Sequence[float | None]) -> float | None:
    """Mean of the per-phase top-1 accuracies, phase 0 included (phases without test images skipped)."""
    values = [v for v in top1_per_phase if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def _forgetting(accuracy_matrix: Sequence[Sequence[float | None]], include_last: bool) -> float | None:
    last = len(accuracy_matrix) - 1
    if last < 1:
        return None
    drops = []
    for t in range(last):
        earlier = [accuracy_matrix[p][t] for p in range(t, last + 1 if include_last else last)]
        if accuracy_matrix[last][t] is None or any(a is None for a in earlier):
            continue   # a task without test images has no accuracy to forget
        drops.append(max(earlier) - accuracy_matrix[last][t])
    return round(sum(drops) / len(drops), 4) if drops else None


def forgetting(accuracy_matrix: Sequence[Sequence[float | None]]) -> float | None:
    """Mean forgetting from a lower-triangular matrix ``acc[phase][task]`` (percent), SPEC.md §1.

    For each task t learnt before the last phase: max over phases p in [t, last) of acc[p][t],
    minus acc[last][t] (can be negative when a task improves in the last phase). None when there
    is only one phase. Tasks without test images (None entries) are skipped.
    """
    return _forgetting(accuracy_matrix, include_last=False)


def forgetting_pycil(accuracy_matrix: Sequence[Sequence[float | None]]) -> float | None:
    """PyCIL's forgetting: as :func:`forgetting` but the max runs over every phase p in [t, last],
    the last included, so it is never negative (SPEC.md §4)."""
    return _forgetting(accuracy_matrix, include_last=True)


def summarize(phases: Sequence[dict], key: str) -> dict:
    """Average/last top-1, both forgettings and the per-task accuracy matrix of ``phases[*][key]``."""
    rows = [p[key] for p in phases if p.get(key) is not None]
    if len(rows) != len(phases) or not rows:
        return {f"{key}_avg_top1": None, f"{key}_last_top1": None, f"{key}_forgetting": None,
                f"{key}_forgetting_pycil": None}
    matrix = [r["per_task"] for r in rows]
    return {
        f"{key}_avg_top1": average_incremental_accuracy([r["top1"] for r in rows]),
        f"{key}_last_top1": rows[-1]["top1"],
        f"{key}_forgetting": forgetting(matrix),
        f"{key}_forgetting_pycil": forgetting_pycil(matrix),
        f"{key}_accuracy_matrix": matrix,
    }
