"""Batches of uint8 images from memory (a tensor) or from disk (a Dataset decoded by workers).

In-memory data is indexed directly: no DataLoader, no per-image Python. Streamed data (ImageNet-1000)
goes through a DataLoader whose workers decode files; both yield the same uint8 batches, which the
trainer moves to the device and augments there.

A streamed set that decodes on the run's device (``FileImages`` with ``decode_on``, config key
``stream_decode``) has its workers read the files' bytes only; :func:`iterate` hands each batch's
items, as a list, to that set's ``finish_batch``, which decodes them on the device. Every
consumer of a source (training, evaluation, :func:`materialize`) goes through :func:`iterate`.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from utils.errors import UserError

Images = torch.Tensor | Dataset   # uint8 [N, 3, S, S] or a Dataset whose items are uint8 [3, S, S] (or encoded files: batch_finisher)


class ConcatImages(Dataset):
    """Several image sources (tensors or datasets) seen as one, in order."""

    def __init__(self, parts: Sequence[Images]):
        self.parts = [p for p in parts if len(p) > 0]
        self.offsets = torch.cumsum(torch.tensor([0] + [len(p) for p in self.parts]), 0)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        k = int(torch.searchsorted(self.offsets, torch.tensor(i), right=True)) - 1
        return self.parts[k][i - int(self.offsets[k])]


def concat_images(parts: Sequence[Images]) -> Images:
    """One source: a tensor when every part is a tensor (fast path), else a ConcatImages."""
    parts = [p for p in parts if len(p) > 0]
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts) if parts else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return ConcatImages(parts)


class _Subset(Dataset):
    def __init__(self, images: Dataset, index: torch.Tensor):
        self.images, self.index = images, index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.images[int(self.index[i])]


def select(images: Images, index: torch.Tensor) -> Images:
    """The images at ``index`` (int64 [n]): a tensor for in-memory data, a lazy subset otherwise."""
    if isinstance(images, torch.Tensor):
        return images[index]
    return _Subset(images, index)


# The fewest images a loader worker is started for when a streamed source is decoded whole
# (materialize): starting a process costs more than decoding a handful of images.
MIN_IMAGES_PER_WORKER = 32


def loader_split(n: int, num_workers: int, batch_size: int = 256) -> tuple[int, int]:
    """(workers, batch size) to decode ``n`` images of a streamed source in order with at most
    ``num_workers`` loader workers and batches of at most ``batch_size``: as many workers as have
    ``MIN_IMAGES_PER_WORKER`` images each (none for fewer than two: this process reads them, with
    no process to start), and the images spread evenly over them (a loader hands each worker
    whole batches: 1300 images in batches of 256 would keep 6 of 16 workers busy, one of 2
    workers would decode 256 of 300 images)."""
    workers = min(num_workers, n // MIN_IMAGES_PER_WORKER)
    if workers < 2:
        return 0, batch_size
    return workers, max(1, min(batch_size, -(-n // workers)))


def materialize(images: Images, num_workers: int = 0, batch_size: int = 256) -> torch.Tensor:
    """uint8 [N, 3, S, S] tensor of a source (decoding a streamed one: on the host, also where the
    batches were decoded on a device, as the callers keep them there, e.g. the exemplar memory),
    with up to ``num_workers`` loader workers (:func:`loader_split`)."""
    if isinstance(images, torch.Tensor):
        return images
    workers, batch = loader_split(len(images), num_workers, batch_size)
    return torch.cat([b for b, in iterate(images, batch_size=batch, num_workers=workers)]).cpu()


def rebatch(batches: Iterable[tuple[torch.Tensor, ...]], size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The rows of ``batches`` (tuples of tensors, one row per sample; every tuple alike) re-cut,
    in order, into batches of ``size`` rows, the last one smaller: the batches a plain pass in
    ``size`` gives, from a loader whose batches were cut to spread the images over its workers."""
    held: list[tuple[torch.Tensor, ...]] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += batch[0].shape[0]
        while count >= size:
            joined = held[0] if len(held) == 1 else tuple(torch.cat(parts) for parts in zip(*held))
            yield tuple(t[:size] for t in joined)
            count -= size
            held = [tuple(t[size:] for t in joined)] if count else []
    if count:
        yield held[0] if len(held) == 1 else tuple(torch.cat(parts) for parts in zip(*held))


def in_order(images: Images, *extras: torch.Tensor, batch_size: int, num_workers: int = 0
             ) -> Iterator[tuple[torch.Tensor, ...]]:
    """(uint8 images [b, 3, S, S], *extras[idx]) in order, in batches of ``batch_size`` (the last
    one smaller), as :func:`iterate` without a generator yields them. A streamed source is read
    by up to ``num_workers`` loader workers with its images spread evenly over them
    (:func:`loader_split`), and their batches are re-cut (:func:`rebatch`): the batches, and so
    what is computed from them, do not depend on the number of workers."""
    if isinstance(images, torch.Tensor):
        yield from iterate(images, *extras, batch_size=batch_size)
        return
    workers, decode_batch = loader_split(len(images), num_workers, batch_size)
    yield from rebatch(iterate(images, *extras, batch_size=decode_batch, num_workers=workers), batch_size)


def batch_finisher(images: Dataset) -> Callable[[list], torch.Tensor] | None:
    """``finish_batch`` of the streamed set under ``images`` (through subsets and concatenations)
    when it decodes on a device: it turns a list of the source's items into a uint8 batch there.
    None when the loader workers decode (their items are ready images)."""
    if isinstance(images, _Subset):
        return batch_finisher(images.images)
    if isinstance(images, ConcatImages):
        return next((f for f in map(batch_finisher, images.parts) if f is not None), None)
    if getattr(images, "decode_on", None) is not None:
        return images.finish_batch
    return None


def _quiet_when_the_parent_hangs_up(kind, err, tb) -> None:
    """``sys.excepthook`` of the training process and its loader workers. A worker sends the
    batches' shared memory to the training process through multiprocessing's file-descriptor
    server thread (``multiprocessing/resource_sharer.py``), which reports its own errors through
    ``sys.excepthook``; when either side stops mid-transfer (SIGTERM, Ctrl-C), the connection is
    reset and that traceback landed on the run's stderr after its one "interrupted" line. Such a
    connection error is dropped; anything else is printed as before."""
    import traceback

    if issubclass(kind, (ConnectionError, EOFError)) and any(
            frame.f_code.co_filename.endswith("resource_sharer.py") for frame, _ in traceback.walk_tb(tb)):
        return
    _EXCEPTHOOK(kind, err, tb)


_EXCEPTHOOK = sys.excepthook
sys.excepthook = _quiet_when_the_parent_hangs_up   # this process; forked workers inherit it


def _init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: :func:`_own_process_group`, and
    :func:`_quiet_when_the_parent_hangs_up` as the worker's ``sys.excepthook`` (a forked worker has
    it already; a spawned one would not)."""
    _own_process_group(worker_id)
    sys.excepthook = _quiet_when_the_parent_hangs_up


def _own_process_group(worker_id: int) -> None:
    """A loader worker leaves its parent's process group, so that a signal to the group (`timeout`,
    Ctrl-C in a terminal, ``kill -- -PGID``) reaches the training process alone, which then stops
    its loaders in order. Otherwise the workers died under it, and their deaths raced the
    interruption (the loader's RuntimeError, or a queue thread's traceback, in its place). A worker
    still ends with its parent (torch's watchdog) and on the loader's own SIGTERM."""
    try:
        os.setpgid(0, 0)
    except OSError:   # not permitted here (a session leader): stay in the group
        pass


def _as_list(items: list) -> list:
    """collate_fn of a device-decoded source: the batch's items as a list, finished later (by the
    set's ``finish_batch``). Encoded files stay as they are (their bytes are numpy arrays). In a
    loader worker, decoded images (CPU tensors of in-memory sources joined with the streamed one,
    e.g. exemplars) become numpy arrays too, without a copy: a DataLoader sends every tensor a
    worker returns through shared memory, one file descriptor each, and an item of an in-memory
    tensor, a view, takes its whole storage there (all the exemplars, in every worker and epoch);
    a numpy array is pickled, its own bytes only."""
    if get_worker_info() is None:
        return items
    return [it.numpy() if isinstance(it, torch.Tensor) and it.device.type == "cpu" else it for it in items]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor bound for a GPU goes through pinned memory with a
    non-blocking copy: a copy from pageable memory waits for the GPU's queue to drain, which
    would stall every training step on the small per-batch tensors (indices, random draws)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def shard_batches(order: torch.Tensor, batch_size: int, min_batch: int = 1,
                  shard: tuple[int, int] = (0, 1)) -> list[torch.Tensor]:
    """The batches of one process: ``order`` cut into global batches of ``batch_size``; with
    ``shard`` = (rank, world size) each global batch is split across the ranks (rank r takes its
    positions r, r + world, ...), so the ranks' shards are disjoint and together make the global
    batch. A global batch is dropped when a shard would have fewer than ``min_batch`` samples
    (every rank drops the same ones); with world size 1 these are the plain batches."""
    rank, world = shard
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if world == 1:
        return [b for b in batches if len(b) >= min_batch]
    return [b[rank::world] for b in batches if len(b) // world >= min_batch]


def worker_error(err: UserError) -> UserError:
    """The UserError a loader worker raised, as it was raised: torch re-raises it in this process
    as the same type built from "Caught DataError in DataLoader worker process 1. Original
    Traceback ...", the worker's whole formatted traceback, which would be the user's message.
    Its own message is what follows the last ``<module>.<qualname>: `` line start of its type (the
    exception it was raised from comes before it); ``err`` itself when it is not such a wrapper."""
    kind = type(err)
    text = str(err)
    if not text.startswith(f"Caught {kind.__name__} ") or "\nOriginal " not in text:
        return err
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):   # how the traceback module names a type
        name = f"{kind.__module__}.{name}"
    start = text.rfind(f"\n{name}: ")
    if start < 0:
        # no message ("<name>" alone on the last line) or not a traceback we know: nothing to recover
        return kind("") if text.endswith(f"\n{name}\n") else err
    message = text[start + len(name) + 3:]
    try:
        return kind(message[:-1] if message.endswith("\n") else message)  # the traceback's final newline
    except Exception:  # noqa: BLE001 - a subclass that takes other arguments: keep torch's text
        return err


def _loaded(loader: DataLoader) -> Iterator:
    """The batches of ``loader``; a UserError of a worker is raised as the worker raised it
    (:func:`worker_error`), so the user reads its message, not a traceback. Other errors are bugs
    and keep torch's traceback text."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UserError as err:
            original = worker_error(err)
            if original is err:  # raised in this process (no workers): as it is, with its cause
                raise
            # torch's error and its traceback's frames refer to each other, and the frames to the
            # loader: left to the garbage collector, the loader is stopped late and badly (its
            # workers, never told to stop, are killed after 5 s each). Without them it stops now.
            err.__traceback__ = None
            break
        yield batch
    del batches
    raise original


def iterate(images: Images, *extras: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
            min_batch: int = 1, num_workers: int = 0, shard: tuple[int, int] = (0, 1)
            ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield (uint8 images [b, 3, S, S], *extras[idx]) batches.

    Shuffled with ``generator`` when given, else in order. Batches smaller than ``min_batch`` are
    dropped (training uses 2: BatchNorm cannot train on a single sample). ``shard`` = (rank, world
    size): this process's share of every global batch (``shard_batches``); every rank must draw
    the same order (the same ``generator`` state).
    """
    n = len(images)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    batches = shard_batches(order, batch_size, min_batch, shard)
    if isinstance(images, torch.Tensor):
        if images.device.type == "cpu":
            for idx in batches:
                yield (images[idx], *(e[idx] for e in extras))
            return
        # Images on a GPU: the epoch's order goes there once, and the batches are cut from it there.
        on_device = shard_batches(to_device(order, images.device), batch_size, min_batch, shard)
        for idx, idx_dev in zip(batches, on_device):
            yield (images[idx_dev], *(e[idx_dev] if e.device == images.device else e[idx.to(e.device)]
                                      for e in extras))
        return
    finish = batch_finisher(images)
    num_workers = min(num_workers, len(batches))   # a loader starts every worker, busy or not
    if finish is None:
        loader = DataLoader(images, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            worker_init_fn=_init_worker)
        for idx, imgs in zip(batches, _loaded(loader)):
            yield (imgs, *(e[idx] for e in extras))
        return
    # The workers read bytes; each batch is decoded on the device, in this process.
    loader = DataLoader(images, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
                        collate_fn=_as_list, persistent_workers=False, worker_init_fn=_init_worker)
    for idx, items in zip(batches, _loaded(loader)):
        yield (finish(items), *(e[idx] for e in extras))
