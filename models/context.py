"""What a learner or a plugin may use of a run: a small context object instead of the trainer.

The trainer builds one :class:`RunContext` per run and hands it to the learner and to every plugin.
It holds the device and precision, the test transform and the train augmentation, batched
eval-mode feature extraction (``embed``), the training images of a class, the real per-class
sample counts of a phase, the exemplar memory (read it; the trainer updates it), the run log and
folder, named random streams, and the process's place in a distributed run (``rank``,
``world_size``; 0 and 1 in a single process). Learners and plugins touch nothing else of the
trainer, so the training loop can change (more sources, more processes) without them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from utils import batching, distributed
from utils.augment import centre_view, test_transform
from utils.seeding import stream_seed


class RunContext:
    def __init__(self, *, cfg: dict, device: torch.device, amp: bool, channels_last: bool,
                 image_size: int, input_size: int, mean, std, augment: Callable, log, out: Path,
                 train_images: batching.Images, train_labels: torch.Tensor, memory,
                 class_counts: Callable, added_counts: Callable, class_names: list[str], plan: list[tuple[int, int]],
                 rank: int = 0, world_size: int = 1, train_orig_hw: torch.Tensor | None = None):
        self.cfg = cfg
        self.device = device
        self.amp = amp
        self.channels_last = channels_last
        self.image_size = image_size          # side of the stored uint8 images
        self.input_size = input_size          # side of the network input
        self.mean, self.std = mean, std
        self.augment = augment                # (uint8 [B, 3, S, S] on the device, generator, orig_hw=None) -> float input
        self.log = log
        self.out = Path(out)                  # the run folder (figures); written by rank 0 only
        self.train_images = train_images      # uint8 [N, 3, S, S] or a streamed source
        self.train_labels = train_labels      # int64 [N], after remapping to class-order position
        # int64 [N, 2] original (height, width) when the training images are stored whole (squashed
        # to S x S, config key stored_form); None when they are centre crops
        self.train_orig_hw = train_orig_hw
        self.memory = memory                  # the ExemplarMemory (read-only for learners and plugins)
        self._class_counts = class_counts
        self._added_counts = added_counts
        self.class_names = class_names        # the dataset's class names in class-order position
        self.plan = plan                      # [(first, last)] class ranges of every phase
        self.rank = rank
        self.world_size = world_size
        self.learner: Any = None              # set by the trainer once the learner exists

    @property
    def is_main(self) -> bool:
        """The process that writes files and logs (rank 0)."""
        return self.rank == 0

    def autocast(self):
        """The training passes' precision: bf16 autocast with ``amp`` (on CUDA), else none."""
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inference_autocast(self):
        """The inference passes' precision (evaluation, ``embed``, CAMs, the divergence probe):
        float32 unless ``amp_inference`` puts them under :meth:`autocast` too. Herding picks by
        small differences of summed features and the accuracy compared with papers is measured
        here, so by default neither passes through bf16 (the published code ran float32)."""
        return self.autocast() if self.cfg["amp_inference"] else contextlib.nullcontext()

    def stream(self, name: str, phase: int) -> torch.Generator:
        """A CPU generator of its own for ``name`` in ``phase`` (decorrelated from the data order)."""
        g = torch.Generator()
        g.manual_seed(stream_seed(self.cfg["seed"], phase, name))
        return g

    def orig_hw(self, index: torch.Tensor) -> torch.Tensor | None:
        """int64 [n, 2] original sizes of the training images at ``index`` when they are stored whole
        (what ``to_input``, ``embed`` and ``augment`` need with them); None for centre crops."""
        if self.train_orig_hw is None:
            return None
        return self.train_orig_hw[index.cpu()]

    def to_input(self, images: torch.Tensor, orig_hw: torch.Tensor | None = None) -> torch.Tensor:
        """Test-time transform of uint8 images on the device (no augmentation). ``orig_hw``: the
        images are stored whole (``train_images``, exemplars; see :meth:`orig_hw`) and are first
        brought to the centre view the test images have (``utils.augment.centre_view``)."""
        images = images.to(self.device, non_blocking=True)
        if orig_hw is not None:
            images = centre_view(images, orig_hw)
        x = test_transform(images, self.input_size, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def class_index(self, label: int) -> torch.Tensor:
        """int64 [n]: the training-set indices of class ``label`` (after remapping)."""
        return (self.train_labels == label).nonzero().flatten()

    def class_source(self, label: int) -> tuple[batching.Images, torch.Tensor]:
        """The training images of class ``label`` as a source (a lazy one for a streamed set: only
        the images read are decoded, e.g. a process's share in ``embed(..., shard=True)``) and
        their indices."""
        index = self.class_index(label)
        return self.training_source(index), index

    def training_source(self, index: torch.Tensor) -> batching.Images:
        """The training images at training-set ``index`` [k] as a source: a tensor in memory, a
        lazy one for a streamed set (decoded where it is read, e.g. by :meth:`embed`)."""
        return batching.select(self.train_images, index)

    def training_images(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 [k, 3, S, S]: the training images at training-set ``index`` [k] (decoded when streamed;
        k may be 0, e.g. a process's share of a class smaller than the number of processes)."""
        if index.numel() == 0:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return batching.materialize(batching.select(self.train_images, index), self.cfg["num_workers"])

    def class_counts(self, phase) -> torch.Tensor:
        """float [classes seen]: real per-class sample counts of the phase data — training images for
        new classes, stored exemplars for old ones (a count, never a sum of indices)."""
        return self._class_counts(phase)

    def added_counts(self, phase) -> dict[str, torch.Tensor]:
        """{"ce", "kd"}: float [classes seen] samples per class that the plugins (synthetic replay) add
        to an epoch and that count in that loss. Valid once the plugins' ``before_phase`` has run (a
        learner's ``stages``)."""
        return self._added_counts(phase)

    @torch.no_grad()
    def embed(self, images: batching.Images, fn: Callable[[torch.Tensor], torch.Tensor], flip: bool = False,
              orig_hw: torch.Tensor | None = None, shard: bool = False) -> torch.Tensor:
        """fn(x) for uint8 ``images`` with every learner module in eval mode, batched: float32 [N, d]
        on the CPU. With ``flip``, the sum of the normalised features of the image and its mirror
        (iCaRL's class means). ``orig_hw`` (int64 [N, 2]): the images are stored whole; each is seen
        through its centre view, as the test images are (:meth:`to_input`).

        ``shard``: with several processes each embeds its contiguous share of the images and every
        one gets all N features (``utils.distributed.map_shards``): every rank must call it, with
        the same images and the same weights (e.g. after the trainer's ``sync_modules``)."""
        if shard and self.world_size > 1:
            def share(rows: slice) -> torch.Tensor:
                part = images[rows] if isinstance(images, torch.Tensor) else \
                    batching.select(images, torch.arange(len(images))[rows])
                return self.embed(part, fn, flip, None if orig_hw is None else orig_hw[rows])
            return distributed.map_shards(share, len(images))
        self.learner.eval_mode()
        outs = []
        extras = () if orig_hw is None else (orig_hw.cpu(),)
        for imgs, *hw in batching.in_order(images, *extras, batch_size=self.cfg["eval_batch_size"],
                                           num_workers=self.cfg["num_workers"]):
            x = self.to_input(imgs, hw[0] if hw else None)
            with self.inference_autocast():
                f = fn(x).float()
                if flip:
                    f = F.normalize(f, dim=1) + F.normalize(fn(torch.flip(x, dims=[3])).float(), dim=1)
            outs.append(f.cpu())
        return torch.cat(outs) if outs else torch.empty(0)
