"""Decode image files once into uint8 arrays, in parallel, and keep the result in an on-disk cache.

Decoding (:func:`decode_image`): Pillow, converted to RGB (greyscale/palette/RGBA -> RGB), then
one of two stored forms of side ``size``:

* ``crop`` (the default): the SHORT side resized to ``size`` (bilinear with Pillow's
  antialiasing), then the centre ``size x size`` square cropped;
* ``whole``: the whole image resized to ``size x size`` (its aspect squashed, nothing cut off);
  the caller keeps each image's original ``(height, width)`` to undo the squash geometrically
  (``utils.augment``: RandomResizedCrop boxes drawn in the original's pixels, ``centre_view``).

JPEGs are first decoded at a reduced DCT scale (``Image.draft``) when that still leaves both
sides >= the resize target: much faster for large photos, same geometry.
:func:`resize_geometry` is that geometry as numbers, so that object boxes can be mapped to the
stored image (:func:`map_boxes`) without decoding.

This module imports only numpy and Pillow at module level: the decode pool's worker processes
import it, and with the ``spawn``/``forkserver`` start methods a torch import would cost each
worker seconds. The cache functions import torch when called.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import tempfile
import warnings
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

# Bump when the decoded pixels of the same file would change (decoder, resize or crop rule):
# it is part of every cache key, so old caches are not reused.
DECODER_VERSION = 1
CACHE_FORMAT = 1


def resize_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where an ``height x width`` image lands when its short side is resized to ``size``.

    Returns ``(new_height, new_width, top, left)``: the resized size and the offset of the centre
    ``size x size`` crop inside it. The short side becomes exactly ``size``.
    """
    scale = size / min(height, width)
    new_h = size if height <= width else max(size, round(height * scale))
    new_w = size if width <= height else max(size, round(width * scale))
    return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2


def decode_image(path: str, size: int, whole: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one file to the stored form ``crop`` (``whole`` False) or ``whole``.

    Returns ``(image, (orig_height, orig_width))`` with ``image`` uint8 ``[3, size, size]``.
    Raises whatever Pillow raises for an unreadable file (callers turn it into a ``DataError``).
    """
    with Image.open(path) as img:
        orig_w, orig_h = img.size
        if whole:
            img.draft("RGB", (size, size))
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
            return np.ascontiguousarray(arr.transpose(2, 0, 1)), (orig_h, orig_w)
        new_h, new_w, top, left = resize_geometry(orig_h, orig_w, size)
        # For JPEG, let libjpeg skip detail we would throw away anyway (scale 1/2, 1/4, 1/8 while
        # the result stays >= the resize target). No-op for other formats.
        img.draft("RGB", (new_w, new_h))
        img = img.convert("RGB")
        if img.size != (new_w, new_h):
            img = img.resize((new_w, new_h), Image.BILINEAR)
        if img.size != (size, size):
            img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.uint8)  # [size, size, 3]
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), (orig_h, orig_w)


def read_image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` from the file header only (no pixel decoding)."""
    with Image.open(path) as img:
        w, h = img.size
    return h, w


def map_boxes(boxes: np.ndarray, orig_hw: np.ndarray, size: int) -> np.ndarray:
    """Map boxes from original-image pixels to stored-image pixels.

    ``boxes``: int ``[N, 4]`` as ``(y0, y1, x0, x1)``, half-open, in the original image;
    ``orig_hw``: int ``[N, 2]`` original ``(height, width)``. Returns int64 ``[N, 4]`` in the same
    convention in the ``size x size`` stored image, clipped to it and at least one pixel wide/high
    (a box the centre crop cut away entirely becomes a 1-pixel box on the nearest border).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    orig_hw = np.asarray(orig_hw, dtype=np.int64).reshape(-1, 2)
    out = np.empty((len(boxes), 4), dtype=np.int64)
    for i, ((h, w), (y0, y1, x0, x1)) in enumerate(zip(orig_hw, boxes)):
        new_h, new_w, top, left = resize_geometry(int(h), int(w), size)
        sy, sx = new_h / h, new_w / w
        # floor/ceil: the mapped box covers every stored pixel the original box touches
        ys = _clip_span(math.floor(y0 * sy + 1e-6) - top, math.ceil(y1 * sy - 1e-6) - top, size)
        xs = _clip_span(math.floor(x0 * sx + 1e-6) - left, math.ceil(x1 * sx - 1e-6) - left, size)
        out[i] = (*ys, *xs)
    return out


def _clip_span(a: int, b: int, size: int) -> tuple[int, int]:
    a = min(max(a, 0), size - 1)
    b = min(max(b, a + 1), size)
    return a, b


def default_workers() -> int:
    """Worker processes for decoding: the CPU cores this process may use (at most 16)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


def process_workers(num_workers: int) -> int | None:
    """Decoding processes for the ``num_workers`` key: itself when set; for 0 ("every core") None
    (:func:`default_workers`) in a plain run, and this machine's cores shared out among its
    processes under torchrun (LOCAL_WORLD_SIZE), so 8 processes do not start 8 pools of every core."""
    if num_workers:
        return num_workers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return None if local <= 1 else max(1, default_workers() // local)


def _decode_chunk(job: tuple[int, Sequence[str], int, bool, bool]):
    """Pool worker: decode ``paths`` (indices ``start..``) to the stored form ``whole`` or ``crop``.

    Returns ``(start, images [k,3,S,S] uint8, ok_offsets [k], orig_hw [k,2], failures)``; with
    ``skip`` False it stops at the first failure (the caller raises).
    """
    start, paths, size, skip, whole = job
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    ok, hw, failures = [], [], []
    for j, path in enumerate(paths):
        try:
            img, orig = decode_image(path, size, whole)
        except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
            failures.append((path, f"{type(exc).__name__}: {exc}"))
            if not skip:
                break
            continue
        images[len(ok)] = img
        ok.append(j)
        hw.append(orig)
    orig_hw = np.asarray(hw, dtype=np.int64).reshape(-1, 2)
    return start, images[: len(ok)], np.asarray(ok, dtype=np.int64), orig_hw, failures


def _decode_worker_init() -> None:
    """Pool initializer: a decode worker ends at once on SIGTERM (the kernel's default action) and
    leaves Ctrl-C to its parent, which stops the pool. A worker forked from ``main.py`` inherited its
    Python-level SIGTERM handler, which runs only between bytecodes: one sweep run hung for 15
    minutes in the pool's ``terminate()``, waiting for a worker that still had that handler and sat
    blocked on the pool's task-queue lock (which ``terminate()`` takes and keeps)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DecodeFailure(Exception):
    """An image could not be decoded; ``failures`` lists ``(path, reason)`` (first one at least)."""

    def __init__(self, failures: list[tuple[str, str]]):
        super().__init__(f"cannot decode {failures[0][0]}: {failures[0][1]}")
        self.failures = failures


def decode_images(paths: Sequence[str], size: int, *, workers: int | None = None,
                  skip_unreadable: bool = False, progress: bool = True, desc: str = "decode",
                  chunk_size: int | None = None, whole: bool = False):
    """Decode every file of ``paths`` (a multiprocessing pool over chunks, results in order) to the
    stored form ``crop``, or with ``whole`` to the form ``whole`` (:func:`decode_image`).

    Returns ``(images, kept, orig_hw, failures)``:
      - ``images``: uint8 ``[K, 3, size, size]`` (numpy), for the K readable files, in order;
      - ``kept``: int64 ``[K]`` indices into ``paths``;
      - ``orig_hw``: int64 ``[K, 2]`` original (height, width), to map boxes;
      - ``failures``: ``[(path, reason)]`` of the skipped files (empty unless ``skip_unreadable``).
    Without ``skip_unreadable`` the first unreadable file raises :class:`DecodeFailure`.
    ``workers`` None: :func:`default_workers`; 0 or 1: decode in this process.
    """
    from tqdm import tqdm  # tqdm is light, but only needed here

    n = len(paths)
    workers = default_workers() if workers is None else workers
    if chunk_size is None:
        # a few chunks per worker for load balance, but large enough to amortise pickling
        chunk_size = max(16, min(256, math.ceil(n / max(1, workers * 8))))
    jobs = [(s, list(paths[s:s + chunk_size]), size, skip_unreadable, whole) for s in range(0, n, chunk_size)]
    images = np.empty((n, 3, size, size), dtype=np.uint8)  # filled in place: no second copy
    kept, hws, failures = [], [], []
    filled = 0
    bar = tqdm(total=n, desc=desc, unit="img", disable=None if progress else True, leave=False)

    def consume(results: Iterable):
        nonlocal filled
        for start, imgs, ok, hw, bad in results:
            if bad and not skip_unreadable:
                raise DecodeFailure(bad)
            images[filled:filled + len(ok)] = imgs
            filled += len(ok)
            kept.append(ok + start)
            hws.append(hw)
            failures.extend(bad)
            bar.update(len(ok) + len(bad))

    try:
        if workers <= 1 or len(jobs) <= 1:
            consume(map(_decode_chunk, jobs))
        else:
            # the platform's default start method (fork on Linux, like torch's DataLoader); the
            # workers only run Pillow/numpy code from this torch-free module
            pool = multiprocessing.get_context().Pool(min(workers, len(jobs)), initializer=_decode_worker_init)
            try:
                consume(pool.imap(_decode_chunk, jobs))
                pool.close()   # every chunk is back: the workers leave on their own, no signal needed
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
    finally:
        bar.close()
    kept_idx = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    orig_hw = np.concatenate(hws) if hws else np.zeros((0, 2), dtype=np.int64)
    return images[:filled], kept_idx, orig_hw, failures


# ----------------------------------------------------------------------------------------------
# On-disk cache


def cache_key(description: dict, files: Sequence[str], arrays: Iterable[np.ndarray] = ()) -> str:
    """A hex digest identifying one decoded data set.

    ``description``: JSON-serialisable facts (dataset name, absolute root, image size, class
    names, options); ``files``: every source file, whose path, size and mtime enter the key (a
    changed, added or removed file gives a new key); ``arrays``: labels/boxes read from annotation
    files. Costs one ``stat`` per file, no reading.

    A path enters as its bytes on disk: encoded as UTF-8, any bytes of a name that is not UTF-8
    restored from Python's surrogate escapes (as os.fsencode does with a UTF-8 file system
    encoding, but whatever the locale), so any file name works and a UTF-8 name keeps the key it
    always had. A file that cannot be ``stat``-ed (a broken link) enters as unreadable: decoding
    then names it, as without a cache (or skips it with ``skip_unreadable``); readable again, it
    gives another key.
    """
    h = hashlib.sha256()
    h.update(json.dumps({**description, "decoder": DECODER_VERSION, "format": CACHE_FORMAT},
                        sort_keys=True).encode())
    for path in files:
        h.update(b"\n" + path.encode("utf-8", "surrogateescape") + _file_stamp(path))
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        h.update(f"\n{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _file_stamp(path: str) -> bytes:
    """``\\t<size>\\t<mtime ns>`` of ``path`` for :func:`cache_key`, or ``\\tunreadable (<errno>)``
    when it cannot be ``stat``-ed (never a size: such a key matches no readable state of the file)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"\tunreadable ({exc.errno})".encode()
    return f"\t{st.st_size}\t{st.st_mtime_ns}".encode()


def cache_path(cache_dir: str, name: str, size: int, key: str) -> str:
    return os.path.join(cache_dir, f"{name}-{size}px-{key[:20]}.pt")


def load_cache(path: str, key: str) -> dict | None:
    """The cached payload at ``path`` if it exists and was written for ``key``, else None.

    A truncated or otherwise unreadable file is reported with a warning and ignored (the caller
    decodes again and overwrites it).
    """
    import torch

    if not os.path.exists(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("key") != key:
            raise ValueError("written for another key")
        return payload
    except Exception as exc:  # a corrupt cache must never stop a run: decode again
        warnings.warn(f"Ignoring unreadable dataset cache {path} ({type(exc).__name__}: {exc}); "
                      "it will be rewritten.", stacklevel=3)
        return None


def save_cache(path: str, payload: dict) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically (temporary file + ``os.replace``), so an
    interrupted write never leaves a half-written cache under the final name."""
    import torch

    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        cause = err if isinstance(err, OSError) else err.__cause__ or err.__context__
        if isinstance(err, (OSError, RuntimeError)) and isinstance(cause, OSError):
            # The cache only saves time: a full disk or an unwritable folder must not stop the run.
            warnings.warn(f"Could not write the dataset cache {path} ({cause.strerror or cause}); "
                          f"continuing without it.", stacklevel=2)
            return
        raise
