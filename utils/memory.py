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

from utils.compression import (compress_images, decode_compressed, encode_compressed, exemplar_cost,
                               stored_pixel_counts)
from utils.herding import budget_prefix, herding_order


@dataclass
class ClassExemplars:
    """The exemplars of one class, in herding order, stored plain or compressed.

    costs: float32 [n] (full-image units); boxes: int64 [n, 4] (y0, y1, x0, x1) of the
    full-resolution region (the whole image when uncompressed); source_index: int64 [n], index of
    each exemplar in the training set; size: the side S of the images.
    Plain storage: ``images`` uint8 [n, 3, S, S]. Compressed storage (``images`` None): only the
    pixels the compressed exemplars need — ``box_pixels`` uint8 [Kb, 3] (inside the boxes, full
    resolution) and ``small_pixels`` uint8 [Ks, 3] (of the images downsampled by ``ratio``); see
    ``utils.compression.encode_compressed``. ``decode()`` rebuilds the images seen in training.
    """

    costs: torch.Tensor
    boxes: torch.Tensor
    source_index: torch.Tensor
    size: int
    images: torch.Tensor | None = None
    box_pixels: torch.Tensor | None = None
    small_pixels: torch.Tensor | None = None
    ratio: float = 1.0

    @property
    def compressed(self) -> bool:
        return self.images is None

    def decode(self) -> torch.Tensor:
        """uint8 [n, 3, S, S]: the exemplars as seen in training (compressed ones rebuilt, batched)."""
        if not self.compressed:
            return self.images
        return decode_compressed(self.box_pixels, self.small_pixels, self.boxes, (self.size, self.size), self.ratio)

    def nbytes(self) -> int:
        """Bytes of pixel data actually stored."""
        if not self.compressed:
            return self.images.numel()
        return self.box_pixels.numel() + self.small_pixels.numel()

    def prefix(self, n: int) -> "ClassExemplars":
        head = dict(costs=self.costs[:n].clone(), boxes=self.boxes[:n].clone(),
                    source_index=self.source_index[:n].clone(), size=self.size, ratio=self.ratio)
        if not self.compressed:
            return ClassExemplars(images=self.images[:n].clone(), **head)
        crop, small = stored_pixel_counts(self.boxes, (self.size, self.size), self.ratio)
        return ClassExemplars(box_pixels=self.box_pixels[:int(crop[:n].sum())].clone(),
                              small_pixels=self.small_pixels[:int(small[:n].sum())].clone(), **head)

    def __len__(self) -> int:
        return self.costs.numel()


# A compressor maps uint8 images [B, 3, S, S] of one class (and the class label) to the boxes
# int64 [B, 4] kept at full resolution; the rest of each image is stored downsampled.
Compressor = Callable[[torch.Tensor, int], torch.Tensor]
# A feature function maps uint8 images [B, 3, S, S] of the training set and their training-set
# indices [B] (which say how the images are stored: see RunContext.orig_hw) to features [B, d]
# (the deployed model, eval mode).
FeatureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def full_image_boxes(n: int, size: int) -> torch.Tensor:
    """int64 [n, 4] boxes covering a whole ``size`` x ``size`` image."""
    return torch.tensor([0, size, 0, size], dtype=torch.long).repeat(n, 1)


class ExemplarMemory:
    def __init__(self, memory_size: int, memory_per_class: int, fixed_memory: bool, compress_ratio: float = 4.0):
        """``compress_ratio``: area factor η of the exemplars a compressor gives boxes for."""
        self.compress_ratio = compress_ratio
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
                  boxes: torch.Tensor | None = None, source_index: torch.Tensor | None = None) -> int:
        """Herding-select exemplars of class ``label`` within budget ``m``; returns how many were stored.

        images: uint8 [n, 3, S, S] originals; boxes: int64 [n, 4] full-resolution boxes (None =
        store uncompressed, cost 1 each); features: [n, d] features of the images *as they will
        be stored* (the compressed ones when ``boxes`` is given). Picks add their costs; the pick
        that would exceed ``m`` is not added.
        """
        n, size = images.shape[0], images.shape[-1]
        source_index = torch.arange(n) if source_index is None else source_index.cpu()
        if boxes is None:
            costs = torch.ones(n)
        else:
            boxes = boxes.cpu()
            costs = exemplar_cost(boxes, (size, size), self.compress_ratio)
        # Herding never needs more picks than the cheapest exemplars could fill.
        max_picks = int(m / float(costs.min())) + 1 if n else 0
        order = herding_order(features, max_picks) if n else torch.empty(0, dtype=torch.long)
        keep = order[:budget_prefix(costs[order], m)]
        kept = images[keep].cpu()
        common = dict(costs=costs[keep].clone(), source_index=source_index[keep].clone(), size=size)
        if boxes is None:
            self.classes[label] = ClassExemplars(images=kept.clone(), boxes=full_image_boxes(len(keep), size), **common)
        else:
            box_pixels, small_pixels = encode_compressed(kept, boxes[keep], self.compress_ratio)
            self.classes[label] = ClassExemplars(boxes=boxes[keep].clone(), box_pixels=box_pixels,
                                                 small_pixels=small_pixels, ratio=self.compress_ratio, **common)
        return keep.numel()

    def update(self, new_classes: range, class_images: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
               feature_fn: FeatureFn, classes_seen: int, compressor: Compressor | None = None) -> None:
        """End-of-phase update: shrink old classes to the new m, then herd each new class.

        class_images(c) -> (uint8 images [n, 3, S, S], training-set indices [n]) of class c.
        With a compressor, herding runs on the features of the compressed images.
        """
        m = self.class_budget(classes_seen)
        self.shrink(m)
        for c in new_classes:
            images, index = class_images(c)
            boxes = None
            seen = images
            if compressor is not None:
                boxes = compressor(images, c).cpu()
                seen = compress_images(images, boxes, self.compress_ratio)
            self.add_class(c, images, feature_fn(seen, index), m, boxes, index)

    # ---- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(e) for e in self.classes.values())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All exemplars: uint8 images [N, 3, S, S] and labels int64 [N], classes in ascending order."""
        if not self.classes:
            return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        labels = sorted(self.classes)
        images = torch.cat([self.classes[c].decode() for c in labels])
        targets = torch.cat([torch.full((len(self.classes[c]),), c, dtype=torch.long) for c in labels])
        return images, targets

    def counts(self, num_classes: int) -> list[int]:
        """Number of exemplars of each class 0..num_classes-1 (a count, not a sum of indices)."""
        return [len(self.classes[c]) if c in self.classes else 0 for c in range(num_classes)]

    def nbytes(self) -> int:
        """Bytes of pixel data stored (compressed exemplars count only the pixels they keep)."""
        return sum(e.nbytes() for e in self.classes.values())

    def stats(self, classes_seen: int, image_bytes: int | None = None) -> dict:
        """Budget, use and counts; with ``image_bytes`` (3·S·S, one full image) also the bytes stored
        and the budget's size in uncompressed bytes."""
        per_class = self.counts(classes_seen)
        used, n = self.used(), sum(per_class)
        out = {
            "budget": self.total_budget(classes_seen),
            "class_budget": self.class_budget(classes_seen),
            "used": round(used, 4),
            "exemplars": n,
            "per_class": per_class,
            "mean_cost": round(used / n, 6) if n else None,
        }
        if image_bytes is not None:
            out["bytes"] = self.nbytes()
            out["bytes_budget"] = self.total_budget(classes_seen) * image_bytes
        return out

    def state_dict(self) -> dict:
        return {c: vars(e) for c, e in self.classes.items()}

    def digest(self) -> str:
        """sha1 of everything stored (per class in label order: labels, costs, boxes, training-set
        indices and the stored pixel bytes): equal digests mean bit-identical memories, e.g. on
        every rank of a distributed run."""
        from utils.distributed import tensor_digest

        tensors, meta = [], []
        for c in sorted(self.classes):
            e = self.classes[c]
            meta.append(f"{c}:{e.size}:{e.ratio}:{e.compressed}")
            tensors += [e.costs, e.boxes, e.source_index]
            tensors += [e.images] if not e.compressed else [e.box_pixels, e.small_pixels]
        return tensor_digest(tensors, ";".join(meta))

    def load_state_dict(self, state: dict) -> None:
        self.classes = {int(c): ClassExemplars(**e) for c, e in state.items()}

    def source_indices(self) -> torch.Tensor:
        """int64 [N]: the training-set index of every exemplar, in the order of ``tensors()``."""
        if not self.classes:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([self.classes[c].source_index for c in sorted(self.classes)])
