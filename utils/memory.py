"""Exemplar memory: per class, exemplars in herding order with a cost per exemplar.

Costs are in full-image units: an uncompressed exemplar costs 1.0; a compressed one (CIM) less.
Budget (SPEC.md §2): ``memory_size // classes_seen`` units per class, or ``memory_per_class`` with
``fixed_memory``. Invariant: the total cost never exceeds the budget — every class's exemplars are
a prefix of its herding order whose cost sum is ≤ the per-class budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from utils.batching import Images
from utils.compression import (compress_images, decode_compressed, encode_compressed, exemplar_cost,
                               stored_pixel_counts)
from utils.herding import HERDING, budget_prefix


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


# A compressor gives the boxes (int64 [B, 4], kept at full resolution; the rest of each image is
# stored downsampled) of a share of one class's n candidates: compressor(images, label, rows, n)
# with ``images`` uint8 [B, 3, S, S] the candidates at ``rows`` (a slice of the n; all of them in
# one process). A compressor that draws at random draws for all n and keeps ``rows``, so that
# every share, and one process, sees the same draws.
Compressor = Callable[[torch.Tensor, int, slice, int], torch.Tensor]
# A feature function maps uint8 images [B, 3, S, S] of the training set (a tensor, or a lazy
# source: utils.batching.Images) and their training-set indices [B] (which say how the images are
# stored: see RunContext.orig_hw) to features [B, d] (the deployed model, eval mode).
FeatureFn = Callable[[Images, torch.Tensor], torch.Tensor]
# fetch(index) -> uint8 [k, 3, S, S]: the training images at training-set indices ``index`` [k]
# (decoded where the set is streamed): the memory fetches only the exemplars it keeps.
Fetch = Callable[[torch.Tensor], torch.Tensor]


class Candidates(NamedTuple):
    """What herding decides one class's exemplars from, without the pixels: the training-set
    ``index`` int64 [n] of the class's images, their ``features`` float [n, d] as they would be
    stored, their full-resolution ``boxes`` int64 [n, 4] (None: stored uncompressed, cost 1
    each) and the image side ``size`` S. With several processes each computes a share of the
    rows (:func:`candidate_share` on the images it decoded) and the shares are gathered."""

    index: torch.Tensor
    features: torch.Tensor
    boxes: torch.Tensor | None
    size: int


def candidate_share(images: Images, index: torch.Tensor, label: int, rows: slice, n: int,
                    feature_fn: FeatureFn, compressor: Compressor | None, ratio: float
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features [B, d], boxes int64 [B, 4] on the CPU or None) of the candidates at ``rows`` of
    class ``label``'s n: ``images`` uint8 [B, 3, S, S] and their training-set ``index`` [B]. With a
    compressor the features are those of the compressed images (``x̃``), which herding chooses
    among, as they will be stored. Without one, ``images`` may be a lazy source (a streamed
    share, decoded while its features are computed)."""
    if compressor is None:
        return feature_fn(images, index), None
    boxes = compressor(images, label, rows, n).cpu()
    return feature_fn(compress_images(images, boxes, ratio), index), boxes


def full_image_boxes(n: int, size: int) -> torch.Tensor:
    """int64 [n, 4] boxes covering a whole ``size`` x ``size`` image."""
    return torch.tensor([0, size, 0, size], dtype=torch.long).repeat(n, 1)


class ExemplarMemory:
    def __init__(self, memory_size: int, memory_per_class: int, fixed_memory: bool, compress_ratio: float = 4.0,
                 herding: str = "distinct"):
        """``compress_ratio``: area factor η of the exemplars a compressor gives boxes for;
        ``herding``: how a new class's samples are ordered (``utils.herding.HERDING``)."""
        self.compress_ratio = compress_ratio
        self.herd = HERDING[herding]
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

    def add_class(self, label: int, candidates: Candidates, m: float, fetch: Fetch) -> int:
        """Herding-select exemplars of class ``label`` within budget ``m`` from its ``candidates``;
        returns how many were stored. Picks add their costs; the pick that would exceed ``m`` is
        not added. Only the kept images are fetched (``fetch``) and stored."""
        index, features, boxes, size = candidates
        n = index.numel()
        index = index.cpu()
        if boxes is None:
            costs = torch.ones(n)
        else:
            boxes = boxes.cpu()
            costs = exemplar_cost(boxes, (size, size), self.compress_ratio)
        # Herding never needs more picks than the cheapest exemplars could fill.
        max_picks = int(m / float(costs.min())) + 1 if n else 0
        order = self.herd(features, max_picks) if n else torch.empty(0, dtype=torch.long)
        keep = order[:budget_prefix(costs[order], m)]
        kept = fetch(index[keep]).cpu() if keep.numel() else torch.empty(0, 3, size, size, dtype=torch.uint8)
        common = dict(costs=costs[keep].clone(), source_index=index[keep].clone(), size=size)
        if boxes is None:
            self.classes[label] = ClassExemplars(images=kept.clone(), boxes=full_image_boxes(len(keep), size), **common)
        else:
            box_pixels, small_pixels = encode_compressed(kept, boxes[keep], self.compress_ratio)
            self.classes[label] = ClassExemplars(boxes=boxes[keep].clone(), box_pixels=box_pixels,
                                                 small_pixels=small_pixels, ratio=self.compress_ratio, **common)
        return keep.numel()

    def update(self, new_classes: range, candidates_of: Callable[[int], Candidates], fetch: Fetch,
               classes_seen: int, decide: Callable[[Callable[[], int]], int] = lambda add: add()) -> None:
        """End-of-phase update: shrink old classes to the new m, then herd each new class from
        ``candidates_of(c)`` (:class:`Candidates`), fetching the kept images with ``fetch``.

        ``decide(add)`` runs one class's herding decision ``add``. With several processes the
        trainer passes ``utils.distributed.on_main``: every process computes its share of the
        candidates (``candidates_of`` is a collective), rank 0 alone decides and stores, and the
        trainer then hands rank 0's memory to the others.
        """
        m = self.class_budget(classes_seen)
        self.shrink(m)
        for c in new_classes:
            candidates = candidates_of(c)
            decide(lambda: self.add_class(c, candidates, m, fetch))

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
