"""Batched training augmentation on the training device, reproducible from one ``torch.Generator``.

Training images are held as uint8 tensors [B, 3, S, S]. Instead of a per-image PIL pipeline in
loader workers, :class:`TrainAugment` transforms a whole batch with tensor ops: every random
parameter is drawn per sample from the caller's generator (on the generator's device, then the
small parameter tensors move to the images' device), and there is no Python loop over images.

Pipeline (the order of torchvision pipelines such as CIM's RandomResizedCrop, flip, ColorJitter,
AutoAugment, ToTensor, Normalize, and FOSTER's CIFAR one with Cutout at the end):

    geometric (crop_flip | resized_crop | none) + horizontal flip     uint8
    colour jitter                                                     uint8
    AutoAugment, one sub-policy drawn per sample                      uint8
    to float, normalise with mean/std                                 float32
    Cutout (a square set to 0 on the normalised tensor)               float32

Images stay uint8 between the first three steps, as PIL images do in torchvision pipelines, so the
AutoAugment ops see the value range and rounding they were designed for.

In a multi-process run each process augments its shard of the global batch with a
:class:`BatchShard` in place of the generator: every draw is made for the whole global batch and
the shard's rows are kept, so each sample gets the parameters it would get in one process and the
generator stays in step on every rank.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from utils.batching import to_device
from utils.errors import ConfigError

MODES = ("crop_flip", "resized_crop", "none")

# --------------------------------------------------------------------------- AutoAugment tables
# Re-stated from torchvision.transforms.v2.AutoAugment (torchvision 0.29): sub-policies of two
# (op, probability, magnitude bin) steps; bins index a 10-value magnitude range per op.
AUTOAUGMENT_POLICIES: dict[str, list[tuple[tuple[str, float, int | None], ...]]] = {
    "imagenet": [
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ],
    "cifar10": [
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ],
}

_NUM_BINS = 10  # torchvision's AutoAugment evaluates its magnitude ranges at 10 bins
# Ops whose magnitude is negated with probability 0.5.
SIGNED_AUTOAUGMENT_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                                    "Brightness", "Color", "Contrast", "Sharpness"})


def autoaugment_magnitude(op: str, magnitude_bin: int | None, height: int, width: int) -> float:
    """torchvision's magnitude of ``op`` at ``magnitude_bin`` (before the random sign)."""
    if magnitude_bin is None:  # AutoContrast, Equalize, Invert take no magnitude
        return 0.0
    n = _NUM_BINS
    if op in ("ShearX", "ShearY"):
        values = torch.linspace(0.0, 0.3, n)
    elif op == "TranslateX":
        values = torch.linspace(0.0, 150.0 / 331.0 * width, n)
    elif op == "TranslateY":
        values = torch.linspace(0.0, 150.0 / 331.0 * height, n)
    elif op == "Rotate":
        values = torch.linspace(0.0, 30.0, n)
    elif op in ("Brightness", "Color", "Contrast", "Sharpness"):
        values = torch.linspace(0.0, 0.9, n)
    elif op == "Posterize":
        values = (8 - (torch.arange(n) / ((n - 1) / 4))).round().int()
    elif op == "Solarize":
        values = torch.linspace(1.0, 0.0, n)
    else:
        raise ValueError(f"unknown AutoAugment op {op!r}")
    return float(values[magnitude_bin])


def apply_autoaugment_op(images: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """Apply one AutoAugment op with one magnitude to every image of a uint8 batch [N, 3, H, W].

    The same calls (nearest interpolation, zero fill) as torchvision's AutoAugment.
    """
    nearest = InterpolationMode.NEAREST
    if op == "ShearX":  # torchvision's affine shear is in degrees; AutoAugment's is tan(angle)
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[math.degrees(math.atan(magnitude)), 0.0],
                         interpolation=nearest, fill=None, center=[0, 0])
    if op == "ShearY":
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[0.0, math.degrees(math.atan(magnitude))],
                         interpolation=nearest, fill=None, center=[0, 0])
    if op == "TranslateX":
        return TF.affine(images, angle=0.0, translate=[int(magnitude), 0], scale=1.0,
                         shear=[0.0, 0.0], interpolation=nearest, fill=None)
    if op == "TranslateY":
        return TF.affine(images, angle=0.0, translate=[0, int(magnitude)], scale=1.0,
                         shear=[0.0, 0.0], interpolation=nearest, fill=None)
    if op == "Rotate":
        return TF.rotate(images, angle=magnitude, interpolation=nearest, fill=None)
    if op == "Brightness":
        return TF.adjust_brightness(images, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return TF.adjust_saturation(images, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return TF.adjust_contrast(images, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return TF.adjust_sharpness(images, sharpness_factor=1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(images, bits=int(magnitude))
    if op == "Solarize":
        return TF.solarize(images, threshold=255.0 * magnitude)
    if op == "AutoContrast":
        return TF.autocontrast(images)
    if op == "Equalize":
        return TF.equalize(images)
    if op == "Invert":
        return TF.invert(images)
    raise ValueError(f"unknown AutoAugment op {op!r}")


# --------------------------------------------------------------------------- random parameters

class BatchShard:
    """A generator seen through one process's shard of a global batch: ``positions`` (int64 [b])
    are the shard's rows in the global batch of ``size`` samples. Draws whose first dimension is
    the batch are made for all ``size`` samples and the shard's rows returned."""

    def __init__(self, generator: torch.Generator, positions: torch.Tensor, size: int):
        self.generator, self.positions, self.size = generator, positions.cpu(), size
        self.device = generator.device

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if shape[0] != len(self.positions):
            raise ValueError(f"a draw of {tuple(shape)} for a shard of {len(self.positions)} samples")
        full = torch.rand((self.size, *shape[1:]), generator=self.generator, device=self.device, dtype=dtype)
        return full[self.positions.to(full.device)]


def _uniform(shape: Sequence[int], generator: torch.Generator | BatchShard, low: float = 0.0,
             high: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[low, high) of ``shape`` drawn from ``generator`` on its own device."""
    if isinstance(generator, BatchShard):
        u = generator.rand(tuple(shape), dtype)
    else:
        u = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return u * (high - low) + low


def _randint(high: torch.Tensor | int, shape: Sequence[int],
             generator: torch.Generator) -> torch.Tensor:
    """Integers uniform in [0, high) (``high`` may be a per-sample tensor), int64."""
    return (_uniform(shape, generator, dtype=torch.float64) * high).floor().long()


def sample_resized_crop_boxes(batch: int, height: int | torch.Tensor, width: int | torch.Tensor,
                              scale: Sequence[float], ratio: Sequence[float],
                              generator: torch.Generator) -> torch.Tensor:
    """Per-sample RandomResizedCrop boxes with torchvision's rule, vectorised.

    torchvision tries up to 10 (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)) draws
    and takes the first whose box fits; if none fits it falls back to the largest centred box with
    the aspect ratio clamped into ``ratio``. Here all 10 tries are drawn at once for every sample
    and the first fitting one is selected.

    ``height``/``width``: the image size, one int for the whole batch or int64 [batch] per sample
    (the original sizes of whole-stored images, :func:`whole_to_stored`); the draws are the same
    either way, so the generator moves by the same amount.

    Returns:
        int64 [batch, 4] (top, left, h, w) on the generator's device, with
        0 <= top, top + h <= height, 0 <= left, left + w <= width, h, w >= 1.
    """
    tries = 10
    per_sample = isinstance(height, torch.Tensor)
    if per_sample:
        dev = generator.device
        height = height.to(dev, torch.int64).view(batch, 1)
        width = width.to(dev, torch.int64).view(batch, 1)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    target_area = area * _uniform((batch, tries), generator, scale[0], scale[1], torch.float64)
    aspect = torch.exp(_uniform((batch, tries), generator, *log_ratio, dtype=torch.float64))
    # torch.round rounds half to even, like Python's round() in torchvision.
    w = torch.sqrt(target_area * aspect).round().long()
    h = torch.sqrt(target_area / aspect).round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # index of the first fitting try (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    # torchvision's fallback: a centred crop (the same for every sample of one size).
    if per_sample:
        height, width = height.view(batch), width.view(batch)
        in_ratio = width.double() / height.double()
        fw = torch.where(in_ratio < min(ratio), width,
                         torch.where(in_ratio > max(ratio), (height.double() * max(ratio)).round().long(), width))
        fh = torch.where(in_ratio < min(ratio), (width.double() / min(ratio)).round().long(), height)
    else:
        in_ratio = width / height
        if in_ratio < min(ratio):
            fw, fh = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            fw, fh = int(round(height * max(ratio))), height
        else:
            fw, fh = width, height
        fw, fh = torch.full_like(w, fw), torch.full_like(h, fh)
    found = fits.any(dim=1)
    h = torch.where(found, h, fh)
    w = torch.where(found, w, fw)
    top = torch.where(found, _randint(height - h + 1, (batch,), generator), (height - fh) // 2)
    left = torch.where(found, _randint(width - w + 1, (batch,), generator), (width - fw) // 2)
    return torch.stack([top, left, h, w], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop float boxes out of a uint8 batch and resize each to ``size`` x ``size``.

    ``boxes``: float [B, 4] (y0, y1, x0, x1) in pixel-edge coordinates of ``images`` (fractions
    allowed). roi_align with aligned=True puts pixel centres at k + 0.5, so a full-image box at the
    same size reproduces the image exactly; its adaptive sampling (ceil(box/size) points per
    output pixel and axis) averages when shrinking, an approximation of torchvision's antialiased
    resize. Returns uint8 [B, 3, size, size].
    """
    batch, device = images.shape[0], images.device
    y0, y1, x0, x1 = to_device(boxes.to(torch.float32), device).unbind(1)
    rois = torch.stack([torch.arange(batch, device=device, dtype=torch.float32), x0, y0, x1, y1], dim=1)
    x = roi_align(images.float(), rois, output_size=(size, size), spatial_scale=1.0,
                  sampling_ratio=-1, aligned=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def whole_to_stored(boxes: torch.Tensor, orig_hw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes ``(top, left, h, w)`` in original-image pixels -> float (y0, y1, x0, x1) in the
    ``height`` x ``width`` stored image that holds the whole original resized (not cropped).
    A row of ``orig_hw`` that is (0, 0) means the stored image is the original itself."""
    hw = _effective_hw(orig_hw, height, width).to(boxes.device).double()
    sy, sx = height / hw[:, 0], width / hw[:, 1]
    top, left, h, w = boxes.double().unbind(1)
    return torch.stack([top * sy, (top + h) * sy, left * sx, (left + w) * sx], dim=1)


def _effective_hw(orig_hw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """int64 [B, 2]: ``orig_hw`` with the (0, 0) rows ("the stored image itself") made (height, width)."""
    orig_hw = orig_hw.to(torch.int64)
    known = (orig_hw > 0).all(dim=1, keepdim=True)
    return torch.where(known, orig_hw, torch.tensor([height, width], device=orig_hw.device))


def centre_view(images: torch.Tensor, orig_hw: torch.Tensor | None) -> torch.Tensor:
    """The stored form ``crop`` of whole-stored images: uint8 [B, 3, S, S] -> uint8 [B, 3, S, S].

    ``images`` hold whole originals of sizes ``orig_hw`` (int64 [B, 2]; (0, 0) = already as
    stored) resized to S x S; the result is, up to resampling, what ``decode_image(path, S)``
    stores — short side resized to S, centre S x S square — so every test-time consumer (the
    test transform, herding, class means) sees the same view as with the stored form ``crop``.
    Resolution along the original's long side is that of the whole image (S / long side).
    ``orig_hw`` None returns ``images`` unchanged.
    """
    from utils.image_cache import resize_geometry

    if orig_hw is None:
        return images
    _, _, height, width = images.shape
    hw = _effective_hw(orig_hw, height, width).cpu()
    if bool((hw[:, 0] == hw[:, 1]).all()):   # square originals: the whole image is the centre crop
        return images
    regions = []
    for h0, w0 in hw.tolist():
        new_h, new_w, top, left = resize_geometry(h0, w0, height)
        # the crop [top, top + S) x [left, left + S) of the new_h x new_w resized original
        regions.append([top * height / new_h, (top + height) * height / new_h,
                        left * width / new_w, (left + width) * width / new_w])
    boxes = torch.tensor(regions, dtype=torch.float64).view(-1, 4)
    out = crop_resize(images, boxes, height)
    square = (hw[:, 0] == hw[:, 1]).to(images.device)   # a square original: stored as is
    return torch.where(square.view(-1, 1, 1, 1), images, out)


# --------------------------------------------------------------------------- pure image functions

def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 (x / 255 - mean) / std, one fused multiply-add."""
    mean_t = to_device(torch.as_tensor(mean, dtype=torch.float32), images.device).view(1, -1, 1, 1)
    std_t = to_device(torch.as_tensor(std, dtype=torch.float32), images.device).view(1, -1, 1, 1)
    return torch.addcmul(-mean_t / std_t, images.float(), 1.0 / (255.0 * std_t))


def _resize_center(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, C, H, W] -> uint8 [B, C, size, size]: centre crop the sides larger than ``size``,
    then bilinear upsampling if a side is smaller. Offsets follow torchvision's center_crop."""
    _, _, height, width = images.shape
    if height > size or width > size:
        top = int(round((height - size) / 2.0)) if height > size else 0
        left = int(round((width - size) / 2.0)) if width > size else 0
        images = images[:, :, top: top + min(size, height), left: left + min(size, width)]
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear",
                               align_corners=False)
        images = images.round_().clamp_(0, 255).to(torch.uint8)
    return images


def test_transform(images: torch.Tensor, input_size: int, mean: Sequence[float],
                   std: Sequence[float]) -> torch.Tensor:
    """Evaluation transform: uint8 [B, 3, S, S] -> float32 [B, 3, input_size, input_size].

    Centre crop when S > input_size (torchvision's rounding of the offset), bilinear resize up
    when S < input_size, then normalise with ``mean``/``std`` (given on the [0, 1] scale).
    """
    _check_images(images)
    return normalize(_resize_center(images, input_size), mean, std)


test_transform.__test__ = False  # keep pytest from collecting it when imported into a test module


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], "
                         f"got {images.dtype} {tuple(images.shape)}")


# --------------------------------------------------------------------------- the training transform

class TrainAugment:
    """Random training augmentation of a uint8 batch, all samples at once.

    Args:
        input_size: side of the output images.
        mean, std: per-channel normalisation on the [0, 1] scale.
        mode: ``"crop_flip"`` (zero-pad by ``padding``, random ``input_size`` crop: CIFAR),
            ``"resized_crop"`` (RandomResizedCrop with ``scale``/``ratio``: ImageNet, Food-101), or
            ``"none"`` (deterministic centre crop / resize, as in :func:`test_transform`).
        padding: zero padding of ``crop_flip``.
        scale, ratio: RandomResizedCrop's area-fraction and aspect-ratio ranges.
        flip: random horizontal flip with probability 0.5, in every mode
            (``mode="none", flip=False`` is the identity up to normalisation).
        color_jitter: a float ``a`` jitters brightness only, by a factor ~ U[max(0, 1-a), 1+a]
            per sample, as torchvision's ``ColorJitter(brightness=a)`` of the CIM/PyCIL configs;
            a triple ``(b, c, s)`` jitters brightness, contrast and saturation (applied in that
            fixed order, where torchvision permutes it). 0 disables.
        autoaugment: None, ``"cifar10"`` or ``"imagenet"``: torchvision's AutoAugment policy, with
            the sub-policy, the apply decisions and signs drawn independently per sample.
        cutout: side of a square set to 0 on the normalised tensor, centre uniform over the
            image, clipped at the borders (DeVries & Taylor; an odd side covers (side-1)^2). 0 disables.

    Call: ``augment(images uint8 [B, 3, S, S], generator, orig_hw=None) -> float32 [B, 3,
    input_size, input_size]`` on the images' device. The same generator state gives the same
    output. ``orig_hw`` (int64 [B, 2], ``resized_crop`` only): the images are whole originals of
    these sizes resized to S x S (stored form ``whole``); the crop boxes are drawn in the
    originals' pixels (:func:`whole_to_stored`). A (0, 0) row: the image is its own original.
    """

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float], *,
                 mode: str = "crop_flip", padding: int = 4,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 flip: bool = True, color_jitter: float | Sequence[float] = 0.0,
                 autoaugment: str | None = None, cutout: int = 0) -> None:
        if mode not in MODES:
            raise ConfigError(f"augmentation mode {mode!r} unknown; allowed: {', '.join(MODES)}")
        if autoaugment is not None and autoaugment not in AUTOAUGMENT_POLICIES:
            raise ConfigError(f"autoaugment policy {autoaugment!r} unknown; allowed: None, "
                              f"{', '.join(sorted(AUTOAUGMENT_POLICIES))}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean and std need 3 values with std > 0, got {mean}, {std}")
        if input_size <= 0 or padding < 0 or cutout < 0:
            raise ConfigError(f"input_size must be > 0, padding and cutout >= 0 "
                              f"(got {input_size}, {padding}, {cutout})")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                              f"got scale={scale}, ratio={ratio}")
        jitter = (float(color_jitter), 0.0, 0.0) if isinstance(color_jitter, (int, float)) \
            else tuple(float(a) for a in color_jitter)
        if len(jitter) != 3 or min(jitter) < 0:
            raise ConfigError(f"color_jitter must be a float >= 0 or 3 of them, got {color_jitter}")

        self.input_size = input_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.mode = mode
        self.padding = padding
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.flip = flip
        self.jitter = jitter
        self.autoaugment = autoaugment
        self.cutout = cutout

    def __repr__(self) -> str:
        return (f"TrainAugment(input_size={self.input_size}, mode={self.mode!r}, "
                f"padding={self.padding}, scale={self.scale}, ratio={self.ratio}, "
                f"flip={self.flip}, color_jitter={self.jitter}, "
                f"autoaugment={self.autoaugment!r}, cutout={self.cutout})")

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 orig_hw: torch.Tensor | None = None) -> torch.Tensor:
        _check_images(images)
        x = self._geometric(images, generator, orig_hw)
        if any(self.jitter):
            x = self._color_jitter(x, generator)
        if self.autoaugment is not None:
            x = self._autoaugment(x, generator)
        x = normalize(x, self.mean, self.std)
        if self.cutout:
            x = self._cutout(x, generator)
        return x

    # ---- geometry: uint8 [B, 3, S, S] -> uint8 [B, 3, I, I]

    def _flips(self, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """bool [B]: which samples are mirrored (drawn even when ``flip`` is off, so that turning
        it off does not shift the random stream of the later steps)."""
        flips = _uniform((batch,), generator) < 0.5
        return to_device(flips if self.flip else torch.zeros_like(flips), device)

    def _geometric(self, images: torch.Tensor, generator: torch.Generator,
                   orig_hw: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = images.shape
        size, device = self.input_size, images.device
        if orig_hw is not None and self.mode != "resized_crop":
            raise ValueError(f"whole-stored images (orig_hw given) need mode 'resized_crop', not {self.mode!r}")
        if self.mode == "crop_flip":
            return self._crop_flip(images, generator)
        if self.mode == "resized_crop":
            if orig_hw is None:
                boxes = to_device(sample_resized_crop_boxes(batch, height, width, self.scale, self.ratio,
                                                            generator), device)
                top, left, h, w = boxes.unbind(1)
                corners = torch.stack([top, top + h, left, left + w], dim=1)
            else:
                # Whole-stored images: torchvision's rule in each ORIGINAL image's pixels (area and
                # aspect relative to it), the box then mapped into the stored S x S image, so the
                # crop shows what RandomResizedCrop on the original would.
                hw = _effective_hw(orig_hw, height, width)
                boxes = sample_resized_crop_boxes(batch, hw[:, 0], hw[:, 1], self.scale, self.ratio,
                                                  generator)
                corners = whole_to_stored(boxes, hw, height, width)
            x = crop_resize(images, corners, size)
        else:  # "none"
            x = _resize_center(images, size)
        flips = self._flips(batch, generator, device)
        return torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)

    def _crop_flip(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop of the zero-padded batch with the flip folded into the column index, so the
        whole step is one gather."""
        batch, _, height, width = images.shape
        size, pad, device = self.input_size, self.padding, images.device
        if height + 2 * pad < size or width + 2 * pad < size:
            raise ValueError(f"crop_flip: images {height}x{width} padded by {pad} are smaller "
                             f"than input_size {size}")
        top = to_device(_randint(height + 2 * pad - size + 1, (batch,), generator), device)
        left = to_device(_randint(width + 2 * pad - size + 1, (batch,), generator), device)
        flips = self._flips(batch, generator, device)
        ramp = torch.arange(size, device=device)
        rows = top[:, None] + ramp                                          # [B, I]
        cols = left[:, None] + torch.where(flips[:, None], size - 1 - ramp, ramp)  # [B, I]
        padded = F.pad(images, (pad, pad, pad, pad))
        # Advanced indices on dims 0, 2, 3 around a slice: the result is [B, I, I, 3].
        out = padded[torch.arange(batch, device=device)[:, None, None], :, rows[:, :, None],
                     cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()

    # ---- photometric: uint8 -> uint8

    def _color_jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per-sample brightness / contrast / saturation factors ~ U[max(0, 1-a), 1+a], as
        torchvision's blends (contrast towards the image's mean grey, saturation towards the
        pixel's grey)."""
        batch, device = x.shape[0], x.device
        factors = [to_device(_uniform((batch,), generator, max(0.0, 1 - a), 1 + a), device)
                   .view(-1, 1, 1, 1) for a in self.jitter]
        brightness, contrast, saturation = self.jitter
        y = x.float()
        if brightness:
            y = (y * factors[0]).clamp_(0, 255)
        if contrast:
            mean = _grey(y).mean(dim=(-3, -2, -1), keepdim=True)
            y = (factors[1] * y + (1 - factors[1]) * mean).clamp_(0, 255)
        if saturation:
            y = (factors[2] * y + (1 - factors[2]) * _grey(y)).clamp_(0, 255)
        return y.round_().to(torch.uint8)

    def _autoaugment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """AutoAugment with a sub-policy per sample.

        Samples are grouped by the (op, magnitude bin, sign) they draw at each of the two steps;
        each group is transformed as one batch. The loop runs over groups (at most ~2 x the number
        of distinct ops of the policy per step), never over images.
        """
        policy = AUTOAUGMENT_POLICIES[self.autoaugment]
        batch, _, height, width = x.shape
        # Distinct (op, bin) pairs of the policy; key = 2 * pair id + negative sign.
        pairs = sorted({(op, mag) for sub in policy for op, _, mag in sub},
                       key=lambda p: (p[0], -1 if p[1] is None else p[1]))
        pair_id = {p: i for i, p in enumerate(pairs)}
        step_pair = torch.tensor([[pair_id[(op, mag)] for op, _, mag in sub] for sub in policy])
        step_prob = torch.tensor([[prob for _, prob, _ in sub] for sub in policy])
        pair_signed = torch.tensor([op in SIGNED_AUTOAUGMENT_OPS and mag is not None
                                    for op, mag in pairs])

        choice = _randint(len(policy), (batch,), generator).cpu()       # [B] sub-policy
        applied = _uniform((batch, 2), generator).cpu() < step_prob[choice]  # [B, 2]
        negative = _uniform((batch, 2), generator).cpu() < 0.5           # [B, 2]
        pair = step_pair[choice]                                          # [B, 2]
        key = 2 * pair + (negative & pair_signed[pair]).long()

        x = x.clone()  # written in place below; in mode "none" x may still be the caller's tensor
        for step in range(2):
            for k in torch.unique(key[applied[:, step], step]).tolist():
                members = torch.nonzero(applied[:, step] & (key[:, step] == k)).squeeze(1)
                op, mag_bin = pairs[k // 2]
                magnitude = autoaugment_magnitude(op, mag_bin, height, width) * (-1 if k % 2 else 1)
                members = members.to(x.device)
                x.index_copy_(0, members,
                              apply_autoaugment_op(x.index_select(0, members), op, magnitude))
        return x

    # ---- on the normalised float tensor

    def _cutout(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Zero one ``cutout`` x ``cutout`` square per sample (clipped at the image border)."""
        batch, _, height, width = x.shape
        half = self.cutout // 2
        cy = to_device(_randint(height, (batch,), generator), x.device)
        cx = to_device(_randint(width, (batch,), generator), x.device)
        ys = torch.arange(height, device=x.device)
        xs = torch.arange(width, device=x.device)
        in_rows = (ys >= cy[:, None] - half) & (ys < cy[:, None] + half)   # [B, H]
        in_cols = (xs >= cx[:, None] - half) & (xs < cx[:, None] + half)   # [B, W]
        mask = in_rows[:, :, None] & in_cols[:, None, :]                     # [B, H, W]
        return x.masked_fill(mask[:, None], 0.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] -> [B, 1, H, W] luma with torchvision's rgb_to_grayscale weights."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
