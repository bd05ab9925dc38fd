"""A stage's training data, assembled from a list of sources, every sample tagged with its origin.

A *source* contributes the samples of one origin to a stage (:class:`SourceData`): the new classes'
training images, the exemplar memory, synthetic replay, later others. Two ways to join a stage:

* ``ratio`` None — the samples join the epoch's shuffled pass, each once per epoch (new-class
  images and exemplars, as in every CIL method);
* ``ratio`` r > 0 — the samples are drawn alongside every batch: a batch of b epoch samples gets
  ``round(r · b)`` more from this source, cycling through shuffled passes of it, so the epoch's
  length stays that of the real data (synthetic replay's ``ratio``).

Each source also says whether its samples count in the classification loss (``in_ce``) and in the
learner's distillation terms (``in_kd``); a batch carries the per-sample masks (None when every
sample counts, which keeps the learners' losses exactly the plain batch means).

Images stored whole (config key ``stored_form``) travel with their original ``(height, width)``
(``orig_hw``), which the augmentation needs to crop them as the originals; a source without it
(None: synthetic images, centre-crop training images) is its own original, written (0, 0) where
it joins sources that have it. When no source has it the stage carries None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from utils import batching

ORIGINS = ("new", "exemplar", "synthetic")
NEW, EXEMPLAR, SYNTHETIC = range(len(ORIGINS))


@dataclass
class SourceData:
    """What one source gives a stage: uint8 ``images`` [n, 3, S, S] (or a streamed source),
    int64 ``labels`` [n], one ``origin`` (NEW / EXEMPLAR / SYNTHETIC), and int64 ``index`` [n], the
    training-set index of each sample (-1 where the sample is not a training-set image: exemplars
    are stored, possibly compressed copies; synthetic images are generated). ``orig_hw``: int64
    [n, 2] original (height, width) of whole-stored images, None when the images are their own
    originals."""

    name: str
    images: batching.Images
    labels: torch.Tensor
    origin: int
    index: torch.Tensor | None = None
    ratio: float | None = None
    in_ce: bool = True
    in_kd: bool = True
    orig_hw: torch.Tensor | None = None

    def __post_init__(self):
        if self.index is None:
            self.index = torch.full_like(self.labels, -1)

    def hw_or_zeros(self) -> torch.Tensor:
        """int64 [n, 2]: ``orig_hw``, or (0, 0) rows ("as stored") when there is none."""
        if self.orig_hw is not None:
            return self.orig_hw
        return torch.zeros(len(self), 2, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)


def epoch_class_counts(source: SourceData, epoch_size: int, batch_size: int, classes: int,
                       world: int = 1) -> torch.Tensor:
    """float [classes]: the samples of each class that ``source`` puts in one epoch of a stage whose
    epoch part holds ``epoch_size`` samples (``source``'s own included when it joins the epoch):
    its labels once each (``ratio`` None), or, mixed (``ratio`` r), its expected draws: round(r·b)
    for every global batch of b epoch samples that :meth:`StageData.batches` keeps on ``world``
    processes (under 2 samples a process dropped), spread over its pool by each class's share of it
    (every sample is drawn once before any is drawn twice).

    Known answer: 10 epoch samples, batch 4 (batches 4, 4, 2), r 0.5: 2 + 2 + 1 = 5 draws; a pool of
    3 of class 0 and 1 of class 1 gives [3.75, 1.25]."""
    pool = torch.bincount(source.labels.cpu(), minlength=classes)[:classes].double()
    if source.ratio is None:
        return pool.float()
    if len(source) == 0:
        return torch.zeros(classes)
    sizes = [min(batch_size, epoch_size - s) for s in range(0, epoch_size, batch_size)]
    draws = sum(int(round(source.ratio * b)) for b in sizes if b // world >= 2)
    return (pool * draws / len(source)).float()


@dataclass
class RawBatch:
    """A batch before augmentation, on the device: uint8 ``images`` [B, 3, S, S], ``labels`` [B],
    int8 ``origin`` [B], ``index`` [B] (training-set index or -1), ``orig_hw`` [B, 2] on the host
    (original sizes of whole-stored images, (0, 0) = as stored; None when no image is stored whole)."""

    images: torch.Tensor
    labels: torch.Tensor
    origin: torch.Tensor
    index: torch.Tensor
    global_size: int | None = None        # samples of the whole batch over all ranks (None: one process)
    positions: torch.Tensor | None = None  # int64 [B] (CPU): these samples' rows in the global batch
    orig_hw: torch.Tensor | None = None


@dataclass
class StageData:
    """The data of one stage: the epoch part (the ``ratio``-None sources, concatenated in list
    order) and the mixed sources (drawn per batch)."""

    images: batching.Images
    labels: torch.Tensor
    origin: torch.Tensor
    index: torch.Tensor
    mixed: list[SourceData] = field(default_factory=list)
    ce_origins: tuple[int, ...] = tuple(range(len(ORIGINS)))
    kd_origins: tuple[int, ...] = tuple(range(len(ORIGINS)))
    orig_hw: torch.Tensor | None = None   # int64 [n, 2] of the epoch part (see the module doc)

    @classmethod
    def assemble(cls, parts: list[SourceData]) -> "StageData":
        epoch = [p for p in parts if p.ratio is None and len(p) > 0]
        mixed = [p for p in parts if p.ratio is not None and p.ratio > 0 and len(p) > 0]
        for p in mixed:
            if not isinstance(p.images, torch.Tensor):
                raise ValueError(f"source {p.name}: a mixed source (ratio) must hold its images in memory")
        empty = torch.zeros(0, dtype=torch.long)
        images = batching.concat_images([p.images for p in epoch])
        labels = torch.cat([p.labels for p in epoch]) if epoch else empty
        origin = torch.cat([torch.full((len(p),), p.origin, dtype=torch.int8) for p in epoch]) if epoch \
            else torch.zeros(0, dtype=torch.int8)
        index = torch.cat([p.index for p in epoch]) if epoch else empty
        whole = any(p.orig_hw is not None for p in parts)
        orig_hw = None
        if whole:
            orig_hw = torch.cat([p.hw_or_zeros() for p in epoch]) if epoch else torch.zeros(0, 2, dtype=torch.long)
            mixed = [p if p.orig_hw is not None else
                     SourceData(p.name, p.images, p.labels, p.origin, p.index, p.ratio, p.in_ce, p.in_kd,
                                p.hw_or_zeros()) for p in mixed]
        # One source per origin may exclude its samples from a loss; the masks follow the origin.
        ce = tuple(o for o in range(len(ORIGINS)) if all(p.in_ce for p in parts if p.origin == o))
        kd = tuple(o for o in range(len(ORIGINS)) if all(p.in_kd for p in parts if p.origin == o))
        return cls(images, labels, origin, index, mixed, ce, kd, orig_hw)

    def __len__(self) -> int:
        """Samples in the epoch's pass (the mixed sources add to each batch on top)."""
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        """Samples per origin name: the epoch part's, plus each mixed source's pool."""
        out = {ORIGINS[o]: int((self.origin == o).sum()) for o in range(len(ORIGINS))}
        for p in self.mixed:
            out[ORIGINS[p.origin]] += len(p)
        return {k: v for k, v in out.items() if v}

    def to(self, device: torch.device) -> "StageData":
        """Tensors (and in-memory images) on ``device``: no per-batch host copies on a GPU. The
        original sizes stay on the host, where the augmentation draws its boxes (a per-batch copy
        back from the GPU would make every step wait for it)."""
        move = (lambda t: t.to(device)) if isinstance(self.images, torch.Tensor) else (lambda t: t)
        mixed = [SourceData(p.name, p.images.to(device), p.labels.to(device), p.origin, p.index.to(device),
                            p.ratio, p.in_ce, p.in_kd, p.orig_hw) for p in self.mixed]
        return StageData(move(self.images), move(self.labels), move(self.origin), move(self.index),
                         mixed, self.ce_origins, self.kd_origins, self.orig_hw)

    def loss_masks(self, origin: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """bool [B] masks of the samples that count in CE and in KD; None = every sample counts."""
        def mask(allowed):
            if len(allowed) == len(ORIGINS):
                return None
            return torch.isin(origin, batching.to_device(torch.tensor(allowed, dtype=origin.dtype), origin.device))
        return mask(self.ce_origins), mask(self.kd_origins)

    def batches(self, batch_size: int, generator: torch.Generator, mix_generator: torch.Generator | None = None,
                device: torch.device | None = None, num_workers: int = 0,
                shard: tuple[int, int] = (0, 1)) -> Iterator[RawBatch]:
        """Shuffled batches of the epoch part (those under 2 samples dropped: BatchNorm), each with
        its share of every mixed source appended. The epoch order draws from ``generator`` exactly
        as a plain shuffled pass does; the mixed draws use ``mix_generator``, so adding a mixed
        source leaves the epoch order and the augmentation stream unchanged.

        ``shard`` = (rank, world size): this process's part of every global batch of
        ``batch_size`` (``batching.shard_batches``); the mixed sources' draws of a global batch
        are split the same way. Every rank must pass generators in the same state."""
        device = device or torch.device("cpu")
        rank, world = shard
        cursors = [_Cycle(len(p), mix_generator) for p in self.mixed]
        n_epoch = len(self)
        starts = range(0, n_epoch, batch_size)
        sizes = iter([min(batch_size, n_epoch - s) for s in starts if min(batch_size, n_epoch - s) // world >= 2]
                     if world > 1 else [])
        whole = self.orig_hw is not None
        extras = (self.labels, self.origin, self.index) + ((self.orig_hw,) if whole else ())
        for imgs, *rest in batching.iterate(self.images, *extras, batch_size=batch_size, generator=generator,
                                            min_batch=2, num_workers=num_workers, shard=shard):
            y, origin, idx = rest[:3]
            global_n = next(sizes) if world > 1 else len(y)   # the whole batch's epoch samples
            total = global_n
            positions = [torch.arange(rank, global_n, world)]   # rows of this shard in the global batch
            parts = [(imgs, y, origin, idx, *rest[3:])]
            for p, cursor in zip(self.mixed, cursors):
                k = int(round(p.ratio * global_n))
                if k > 0:
                    positions.append(total + torch.arange(rank, k, world))
                    total += k
                    host_pick = cursor.take(k)[rank::world]
                    pick = batching.to_device(host_pick, p.labels.device)
                    k = len(pick)
                    parts.append((p.images[pick], p.labels[pick],
                                  torch.full((k,), p.origin, dtype=torch.int8, device=p.labels.device),
                                  p.index[pick], *((p.orig_hw[host_pick],) if whole else ())))
            if len(parts) == 1:
                moved = [t.to(device, non_blocking=True) for t in parts[0][:4]]
            else:
                moved = [torch.cat([part[j].to(device, non_blocking=True) for part in parts]) for j in range(4)]
            hw = torch.cat([part[4] for part in parts]) if whole else None   # stays on the host
            if world == 1:
                yield RawBatch(*moved[:4], orig_hw=hw)
            else:
                yield RawBatch(*moved[:4], global_size=total, positions=torch.cat(positions), orig_hw=hw)


class _Cycle:
    """Indices of one mixed source: consecutive slices of shuffled passes, so every sample is drawn
    once before any is drawn twice."""

    def __init__(self, n: int, generator: torch.Generator | None):
        self.n, self.generator = n, generator
        self.order = torch.empty(0, dtype=torch.long)

    def take(self, k: int) -> torch.Tensor:
        while len(self.order) < k:
            self.order = torch.cat([self.order, torch.randperm(self.n, generator=self.generator)])
        pick, self.order = self.order[:k], self.order[k:]
        return pick
