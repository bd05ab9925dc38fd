"""Exemplar memory: per class, exemplars in herding order with a cost per exemplar.

Costs are in full-image units: an uncompressed exemplar costs 1.0; a compressed one (CIM) less.
Budget (SPEC.md §2): ``memory_size // classes_seen`` units per class, or ``memory_per_class`` with
``fixed_memory``. Invariant: the total cost never exceeds the budget — every class's exemplars are
a prefix of its herding order whose cost sum is ≤ the per-class budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from utils.herding import budget_prefix, herding_order


@dataclass
class ClassExemplars:
    """The exemplars of one class, in herding order.

    images: uint8 [n, 3, S, S] as seen in training; costs: float32 [n]; boxes: int64 [n, 4]
    (y0, y1, x0, x1) of the full-resolution region (the whole image when uncompressed);
    source_index: int64 [n], index of each exemplar in the training set.
    """

    images: torch.Tensor
    costs: torch.Tensor
    boxes: torch.Tensor
    source_index: torch.Tensor

    def prefix(self, n: int) -> "ClassExemplars":
        return ClassExemplars(self.images[:n].clone(), self.costs[:n].clone(), self.boxes[:n].clone(),
                              self.source_index[:n].clone())

    def __len__(self) -> int:
        return self.costs.numel()


# A compressor maps uint8 images [B, 3, S, S] of one class to (images seen in training, costs [B], boxes [B, 4]).
Compressor = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# A feature function maps uint8 images [B, 3, S, S] to features [B, d] (the deployed model, eval mode).
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def full_image_boxes(n: int, size: int) -> torch.Tensor:
    """int64 [n, 4] boxes covering a whole ``size`` x ``size`` image."""
    return torch.tensor([0, size, 0, size], dtype=torch.long).repeat(n, 1)


class ExemplarMemory:
    def __init__(self, memory_size: int, memory_per_class: int, fixed_memory: bool):
        self.memory_size = memory_size
        self.memory_per_class = memory_per_class
        self.fixed_memory = fixed_memory
        self.classes: dict[int, ClassExemplars] = {}

    # ---- budget -------------------------------------------------------------------------
    def class_budget(self, classes_seen: int) -> int:
        """Per-class budget m in full-image units."""
        if self.fixed_memory:
            return self.memory_per_class
        return self.memory_size // max(classes_seen, 1)

    def total_budget(self, classes_seen: int) -> int:
        if self.fixed_memory:
            return self.memory_per_class * classes_seen
        return self.memory_size

    def used(self) -> float:
        return float(sum(float(e.costs.double().sum()) for e in self.classes.values()))

    # ---- updates ------------------------------------------------------------------------
    def shrink(self, m: float) -> None:
        """Keep, for every stored class, the longest herding-order prefix of cost ≤ m."""
        for c, ex in self.classes.items():
            self.classes[c] = ex.prefix(budget_prefix(ex.costs, m))

    def add_class(self, label: int, images: torch.Tensor, features: torch.Tensor, m: float,
                  costs: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                  source_index: torch.Tensor | None = None) -> int:
        """Herding-select exemplars of class ``label`` within budget ``m``; returns how many were stored.

        images: uint8 [n, 3, S, S] candidates as they will be stored (compressed already, if so);
        features: [n, d] features of exactly those images; costs: float [n] (default 1.0 each).
        """
        n = images.shape[0]
        costs = torch.ones(n) if costs is None else costs.float().cpu()
        boxes = full_image_boxes(n, images.shape[-1]) if boxes is None else boxes.cpu()
        source_index = torch.arange(n) if source_index is None else source_index.cpu()
        # Herding never needs more picks than the cheapest exemplars could fill.
        max_picks = int(m / float(costs.min())) + 1 if n else 0
        order = herding_order(features, max_picks) if n else torch.empty(0, dtype=torch.long)
        keep = order[:budget_prefix(costs[order], m)]
        self.classes[label] = ClassExemplars(images[keep].cpu().clone(), costs[keep].clone(),
                                             boxes[keep].clone(), source_index[keep].clone())
        return keep.numel()

    def update(self, new_classes: range, class_images: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
               feature_fn: FeatureFn, classes_seen: int, compressor: Compressor | None = None) -> None:
        """End-of-phase update: shrink old classes to the new m, then herd each new class.

        class_images(c) -> (uint8 images [n, 3, S, S], training-set indices [n]) of class c.
        """
        m = self.class_budget(classes_seen)
        self.shrink(m)
        for c in new_classes:
            images, index = class_images(c)
            costs = boxes = None
            if compressor is not None:
                images, costs, boxes = compressor(images, c)
            self.add_class(c, images, feature_fn(images), m, costs, boxes, index)

    # ---- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(e) for e in self.classes.values())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All exemplars: uint8 images [N, 3, S, S] and labels int64 [N], classes in ascending order."""
        if not self.classes:
            return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        labels = sorted(self.classes)
        images = torch.cat([self.classes[c].images for c in labels])
        targets = torch.cat([torch.full((len(self.classes[c]),), c, dtype=torch.long) for c in labels])
        return images, targets

    def counts(self, num_classes: int) -> list[int]:
        """Number of exemplars of each class 0..num_classes-1 (a count, not a sum of indices)."""
        return [len(self.classes[c]) if c in self.classes else 0 for c in range(num_classes)]

    def stats(self, classes_seen: int) -> dict:
        per_class = self.counts(classes_seen)
        return {
            "budget": self.total_budget(classes_seen),
            "class_budget": self.class_budget(classes_seen),
            "used": round(self.used(), 4),
            "exemplars": sum(per_class),
            "per_class": per_class,
        }

    def state_dict(self) -> dict:
        return {c: vars(e) for c, e in self.classes.items()}

    def load_state_dict(self, state: dict) -> None:
        self.classes = {int(c): ClassExemplars(**e) for c, e in state.items()}
