"""Decoding streamed JPEGs on the run's device (config key ``stream_decode`` = "device").

With the key at "workers" a streamed dataset's loader workers decode each file with Pillow
(:func:`utils.image_cache.decode_image`). With "device" they only read the file's bytes
(:func:`read_encoded`), and the main process decodes each batch in one
``torchvision.io.decode_jpeg`` call on the run's device (nvjpeg on a GPU, libjpeg-turbo on a
CPU), then brings each image to the stored form ``crop`` by the same geometry
(:func:`utils.image_cache.resize_geometry`: short side to ``size``, bilinear with antialias, centre
square), the images of one size together (:data:`RESIZE_CHUNK_PIXELS`). :func:`finish_batch` is
that step; ``utils.batching.iterate`` calls it for every batch of a source that holds a
:class:`~utils.datasets.FileImages` decoding on a device, so training, evaluation, class images
and feature extraction all see the same decoder.

The pixels differ slightly from Pillow's: Pillow first decodes a large JPEG at a reduced DCT scale
(``draft``, 1/2 to 1/8) and resizes with its own bilinear filter; here the JPEG is decoded at full
size, reduced by the same factor with an s x s mean (which brought the mean difference on photos at
112 px from 3.3 to 0.67 uint8 levels), and resized by ``torch.nn.functional.interpolate``. The
tests state the measured differences (``tests/test_datasets.py``); the decoder on a GPU (nvjpeg)
may differ from libjpeg-turbo by a level more, not measured.

A file that is not a JPEG (ImageNet has a PNG named .JPEG) or that ``decode_jpeg`` rejects (CMYK
JPEGs on the GPU, for one) is decoded with Pillow instead, for that image only; a file Pillow cannot
read either raises DataError naming it.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from utils import image_cache
from utils.batching import to_device
from utils.errors import DataError

_JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedImage(NamedTuple):
    """One file as a loader worker hands it over: its ``path`` (for the Pillow fallback and for
    messages) and ``data``, its bytes as a numpy uint8 [n] array. Not a torch tensor: a DataLoader
    passes every tensor a worker returns through shared memory, one open file descriptor per
    tensor, so a batch of 512 files needs 512 descriptors, and the batches in flight (two per
    worker) pass the usual limit of 1024 ("Too many open files"); a numpy array is pickled through
    the worker's queue instead. :func:`finish_batch` wraps the bytes as tensors (``torch.from_numpy``, no copy)."""

    path: str
    data: np.ndarray


def unreadable(path: str, exc: BaseException) -> DataError:
    """The error of a file that cannot be read (the message FileImages gives)."""
    return DataError(f"Cannot read image {path} ({type(exc).__name__}: {exc}).")


def read_encoded(path: str) -> EncodedImage:
    """The bytes of ``path``, undecoded (what a loader worker does for a device-decoded set)."""
    try:
        return EncodedImage(path, np.fromfile(path, dtype=np.uint8))
    except Exception as exc:
        raise unreadable(path, exc) from exc


def draft_scale(height: int, width: int, new_height: int, new_width: int) -> int:
    """The s of the reduced DCT scale 1/s at which Pillow decodes a JPEG before resizing it to
    ``new_height x new_width`` (``Image.draft``): the largest of 8, 4, 2, 1 with both sides still
    at least the target's (1 when the image is enlarged)."""
    scale = min(width // new_width, height // new_height)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def to_stored(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, size, size]: decoded uint8 JPEGs [B, 3, h, w], all of one size, brought to the
    stored form ``crop`` on their device, as :func:`utils.image_cache.decode_image` does it: first
    reduced by the factor Pillow's DCT scaling would use (here an s x s mean, edge blocks partial,
    as the DCT scale rounds the side up), then the short side resized to ``size`` (bilinear with
    antialias), centre square. Each image's pixels are those it gets alone (the operations work
    image by image)."""
    h, w = images.shape[-2:]
    new_h, new_w, top, left = image_cache.resize_geometry(h, w, size)
    if (new_h, new_w) != (h, w):
        x = images.float()
        s = draft_scale(h, w, new_h, new_w)
        if s > 1:
            x = F.avg_pool2d(x, s, ceil_mode=True).round_()
        if x.shape[-2:] != (new_h, new_w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        images = x.round_().clamp_(0, 255).to(torch.uint8)
    return images[..., top:top + size, left:left + size]


# Pixels one resize call takes at most, by device type: a group of equal-size images is resized in
# chunks of this many pixels. On a CPU small chunks stay in cache: a batch of 256 files took, in
# one thread, 34 ms to finish at 2^18 pixels per chunk against 51 ms image by image (Tiny-ImageNet
# 64 px files to 32 px), 304 against 326 (imagenette2's 224 px files to 112 px) and 694 against 741
# (to 256 px); at 2^24 the last two took 409 and 910 ms (exps/bench_stream_decode.py). On a GPU
# the chunks are large, for few kernel launches (2^24 pixels: about 200 MB of float32); not measured
# there.
RESIZE_CHUNK_PIXELS = {"cpu": 1 << 18, "cuda": 1 << 24}


def _same_size_chunks(images: Sequence[tuple[int, torch.Tensor]], chunk_pixels: int
                      ) -> list[list[tuple[int, torch.Tensor]]]:
    """(position, uint8 [3, h, w]) pairs grouped by size, each group cut into chunks of at most
    ``chunk_pixels`` pixels (one image at least): what one :func:`to_stored` call takes."""
    groups: dict[tuple[int, int], list] = {}
    for pos, image in images:
        groups.setdefault(tuple(image.shape[-2:]), []).append((pos, image))
    chunks = []
    for (h, w), group in groups.items():
        per_chunk = max(1, chunk_pixels // (h * w))
        chunks += [group[i:i + per_chunk] for i in range(0, len(group), per_chunk)]
    return chunks


def _pillow(item: EncodedImage, size: int, device: torch.device) -> torch.Tensor:
    try:
        image, _ = image_cache.decode_image(item.path, size)
    except Exception as exc:
        raise unreadable(item.path, exc) from exc
    return torch.from_numpy(image).to(device)


def _decode_jpegs(items: Sequence[EncodedImage], device: torch.device) -> list[torch.Tensor | None]:
    """Decoded uint8 [3, h, w] images on ``device``: one batched call, and only when it fails
    one call per image to find those it rejects (None)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data):
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders for TorchCodec, on every call; still works
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                                    category=DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    if not items:
        return []
    data = [torch.from_numpy(it.data) for it in items]
    try:
        return list(decode(data))
    except RuntimeError:   # a file of the batch was rejected: one by one, to find it
        pass
    out = []
    for it, d in zip(items, data):
        try:
            out.append(decode(d))
        except RuntimeError as exc:
            _note_fallback(it.path, exc)
            out.append(None)
    return out


_fallback_noted = False


def _note_fallback(path: str, exc: RuntimeError) -> None:
    """Warn once per process that a JPEG went to Pillow (a rare CMYK file is expected; every file
    would mean this torchvision cannot decode here, and the run decodes on one CPU core)."""
    global _fallback_noted
    if not _fallback_noted:
        _fallback_noted = True
        warnings.warn(f"stream_decode 'device': torchvision.io.decode_jpeg rejected {path} ({exc}); handing it to "
                      f"Pillow (further such files are not reported).", stacklevel=2)


def finish_batch(items: Sequence, size: int, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, size, size] on ``device`` from a batch's items, in order: encoded files
    (:class:`EncodedImage`) are decoded there; decoded uint8 [3, size, size] images (from
    in-memory sources joined with the streamed one, e.g. exemplars; tensors, or numpy arrays as
    loader workers hand them over, see ``utils.batching``) are moved there."""
    def at(positions: list[int]) -> torch.Tensor:   # pinned, non-blocking: a pageable copy waits for the GPU's queue
        return to_device(torch.tensor(positions, dtype=torch.long), device)

    out = torch.empty(len(items), 3, size, size, dtype=torch.uint8, device=device)
    ready = [i for i, it in enumerate(items) if not isinstance(it, EncodedImage)]
    if ready:
        out[at(ready)] = to_device(torch.stack([torch.as_tensor(items[i]) for i in ready]), device)
    jpegs = [i for i, it in enumerate(items) if isinstance(it, EncodedImage)
             and it.data[:3].tobytes() == _JPEG_MAGIC]
    decoded = []
    for i, image in zip(jpegs, _decode_jpegs([items[i] for i in jpegs], device)):
        if image is None:
            out[i] = _pillow(items[i], size, device)
        else:
            decoded.append((i, image))
    chunk_pixels = RESIZE_CHUNK_PIXELS.get(device.type, RESIZE_CHUNK_PIXELS["cpu"])
    for chunk in _same_size_chunks(decoded, chunk_pixels):   # images of one size resized together
        out[at([i for i, _ in chunk])] = to_stored(torch.stack([image for _, image in chunk]), size)
    for i in sorted(set(range(len(items))) - set(ready) - set(jpegs)):   # PNG named .JPEG and the like
        out[i] = _pillow(items[i], size, device)
    return out
