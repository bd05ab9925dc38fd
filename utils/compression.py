"""Exemplar compression (CIM, CVPR 2023): CAM, box, compression, cost, storage/rebuild.

All functions are pure and batched (no per-image Python loop, except the cheap crop slicing
documented in :func:`extract_crops` / :func:`rebuild_compressed`), run on CPU and GPU and keep
the device of their inputs.

Conventions
-----------
* Images are ``[B, 3, H, W]``; stored/compressed images are ``uint8``.
* A CAM is ``[B, h, w]`` (feature-map resolution), values in ``[0, 1]``.
* A box is ``(y0, y1, x0, x1)``, int64, **half-open** (rows ``y0 .. y1-1``, columns
  ``x0 .. x1-1``) in image pixels; boxes of a batch are an int64 tensor ``[B, 4]``.
  The **empty box** is ``(0, 0, 0, 0)`` (zero area): the whole exemplar is downsampled and
  costs ``1 / ratio``.
* ``ratio`` (η, ``compress_ratio``) is an **area** factor ``>= 1``: each side is divided by
  ``sqrt(ratio)``. The downsampled size is ``max(1, round(H / sqrt(ratio)))`` x
  ``max(1, round(W / sqrt(ratio)))`` (Python ``round``, i.e. ties to even); resampling is
  ``F.interpolate(mode="nearest")`` with explicit output sizes, both down and up.
  ``ratio == 1`` is the identity.

Memory representation of one compressed exemplar (see :func:`rebuild_compressed`):
``small`` = the whole image downsampled, uint8 ``[3, h', w']``; ``crop`` = the full-resolution
pixels inside the box, uint8 ``[3, y1-y0, x1-x0]`` (possibly ``[3, 0, 0]``); ``box`` = the
``(y0, y1, x0, x1)`` it came from. Rebuilding gives exactly :func:`compress_images`.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "class_activation_map",
    "upsample_cam",
    "mask_box",
    "downsampled_size",
    "downsample_image",
    "upsample_nearest",
    "compress_images",
    "soft_compress",
    "exemplar_cost",
    "box_area_fraction",
    "extract_crops",
    "rebuild_compressed",
    "needed_small_pixels",
    "encode_compressed",
    "decode_compressed",
    "stored_pixel_counts",
]

_Size = Union[Sequence[int], torch.Size]


# --------------------------------------------------------------------------------------------
# CAM and box
# --------------------------------------------------------------------------------------------
def class_activation_map(feature_maps: torch.Tensor, class_weights: torch.Tensor,
                         eps: float = 1e-12) -> torch.Tensor:
    """Per-image min–max normalised class activation map.

    ``A[b] = sum_c class_weights[b, c] * feature_maps[b, c]`` (no bias, no ReLU), then
    ``M[b] = (A[b] - min A[b]) / (max A[b] - min A[b])``. Where ``max - min <= eps``
    (a constant map) the result is all zeros (never NaN). Computed in float32 (also under
    autocast) and differentiable w.r.t. both inputs.

    Args:
        feature_maps: ``[B, C, h, w]`` last-stage feature maps.
        class_weights: ``[B, C]`` classifier row of each image's true label (normalised row
            for a cosine classifier; the caller decides).
        eps: smallest range treated as non-constant.

    Returns:
        ``[B, h, w]`` float32 in ``[0, 1]``.
    """
    if feature_maps.dim() != 4 or class_weights.dim() != 2:
        raise ValueError(f"expected feature_maps [B,C,h,w] and class_weights [B,C], got "
                         f"{tuple(feature_maps.shape)} and {tuple(class_weights.shape)}")
    if feature_maps.shape[:2] != class_weights.shape:
        raise ValueError(f"shape mismatch: feature_maps {tuple(feature_maps.shape)} vs "
                         f"class_weights {tuple(class_weights.shape)}")
    fm = feature_maps.float()
    w = class_weights.float().to(fm.device)
    cam = torch.einsum("bchw,bc->bhw", fm, w)
    flat = cam.flatten(1)
    lo = flat.amin(dim=1).view(-1, 1, 1)
    hi = flat.amax(dim=1).view(-1, 1, 1)
    rng = hi - lo
    ok = rng > eps
    safe = torch.where(ok, rng, torch.ones_like(rng))
    return torch.where(ok, (cam - lo) / safe, torch.zeros_like(cam))


def upsample_cam(cam: torch.Tensor, size: _Size) -> torch.Tensor:
    """Bilinear (``align_corners=False``) upsampling of a CAM to the image size.

    Args:
        cam: ``[B, h, w]`` (or ``[B, 1, h, w]``).
        size: ``(H, W)``.

    Returns:
        ``[B, H, W]`` float32 (differentiable). Bilinear interpolation of values in ``[0, 1]``
        stays in ``[0, 1]``.
    """
    if cam.dim() == 4:
        cam = cam.squeeze(1)
    if cam.dim() != 3:
        raise ValueError(f"expected cam [B,h,w], got {tuple(cam.shape)}")
    H, W = int(size[0]), int(size[1])
    return F.interpolate(cam.float().unsqueeze(1), size=(H, W), mode="bilinear",
                         align_corners=False).squeeze(1)


def mask_box(cam: torch.Tensor, size: _Size, threshold: float) -> torch.Tensor:
    """Tight box around the pixels of the upsampled CAM above ``threshold``.

    The CAM is upsampled with :func:`upsample_cam` to ``size``; pixels with value
    ``> threshold`` (strictly) are kept; the box is the tightest half-open box containing all
    kept pixels. Not differentiated (the CAM is detached).

    **No kept pixel** (e.g. a constant CAM, which :func:`class_activation_map` maps to all
    zeros, with any threshold ``>= 0``): the empty box ``(0, 0, 0, 0)`` is returned, so the
    exemplar is fully downsampled and costs ``1 / ratio``.

    Args:
        cam: ``[B, h, w]`` in ``[0, 1]``.
        size: ``(H, W)`` image size.
        threshold: τ (``mask_threshold``).

    Returns:
        int64 ``[B, 4]`` = ``(y0, y1, x0, x1)`` on ``cam``'s device.
    """
    H, W = int(size[0]), int(size[1])
    with torch.no_grad():
        up = upsample_cam(cam.detach(), (H, W))
        keep = up > threshold                                   # [B, H, W]
        rows = keep.any(dim=2)                                  # [B, H]
        cols = keep.any(dim=1)                                  # [B, W]
        # argmax returns the first maximal index -> first True (integer dtype for argmax).
        r = rows.to(torch.uint8)
        c = cols.to(torch.uint8)
        y0 = r.argmax(dim=1)
        y1 = H - r.flip(1).argmax(dim=1)
        x0 = c.argmax(dim=1)
        x1 = W - c.flip(1).argmax(dim=1)
        boxes = torch.stack([y0, y1, x0, x1], dim=1).to(torch.int64)
        nonempty = rows.any(dim=1, keepdim=True)
        return torch.where(nonempty, boxes, torch.zeros_like(boxes))


# --------------------------------------------------------------------------------------------
# Resampling and compression
# --------------------------------------------------------------------------------------------
def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not math.isfinite(ratio) or ratio < 1.0:
        raise ValueError(f"compress ratio must be a finite number >= 1, got {ratio}")
    return ratio


def downsampled_size(size: _Size, ratio: float) -> tuple[int, int]:
    """``(max(1, round(H / sqrt(ratio))), max(1, round(W / sqrt(ratio))))``."""
    ratio = _check_ratio(ratio)
    H, W = int(size[0]), int(size[1])
    s = math.sqrt(ratio)
    return max(1, round(H / s)), max(1, round(W / s))


def _nearest(x: torch.Tensor, size: _Size) -> torch.Tensor:
    """``F.interpolate(mode="nearest")`` to ``size`` for any dtype (uint8 is resampled in
    float32, which is exact: nearest only copies values)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if x.is_floating_point():
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x.float(), size=size, mode="nearest").round_().to(x.dtype)


def downsample_image(images: torch.Tensor, ratio: float) -> torch.Tensor:
    """Downsample by area factor ``ratio`` with nearest neighbour.

    Args:
        images: ``[B, 3, H, W]`` (any dtype; uint8 for storage).
        ratio: area factor η ``>= 1``.

    Returns:
        ``[B, 3, h', w']`` of the input dtype, ``(h', w') = downsampled_size((H, W), ratio)``.
        ``ratio == 1`` returns the input unchanged.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
    return _nearest(images, downsampled_size(images.shape[-2:], ratio))


def upsample_nearest(small: torch.Tensor, size: _Size) -> torch.Tensor:
    """Nearest-neighbour resize of ``[B, 3, h', w']`` to ``[B, 3, H, W]`` (dtype kept)."""
    if small.dim() != 4:
        raise ValueError(f"expected small images [B,3,h,w], got {tuple(small.shape)}")
    return _nearest(small, size)


def _box_mask(boxes: torch.Tensor, size: _Size, device: torch.device) -> torch.Tensor:
    """Boolean ``[B, H, W]``, True inside each half-open box."""
    H, W = int(size[0]), int(size[1])
    b = boxes.to(device=device, dtype=torch.int64)
    ys = torch.arange(H, device=device)
    xs = torch.arange(W, device=device)
    in_y = (ys >= b[:, 0:1]) & (ys < b[:, 1:2])                 # [B, H]
    in_x = (xs >= b[:, 2:3]) & (xs < b[:, 3:4])                 # [B, W]
    return in_y[:, :, None] & in_x[:, None, :]


def compress_images(images: torch.Tensor, boxes: torch.Tensor, ratio: float) -> torch.Tensor:
    """Hard compression ``x̃ = M_B ⊙ x + (1 − M_B) ⊙ x_η``.

    Inside each box the original pixels are kept bit-identically; outside them the pixels of
    ``x_η = upsample_nearest(downsample_image(x, ratio), (H, W))`` are used.

    Args:
        images: uint8 ``[B, 3, H, W]`` (other dtypes work too and are kept).
        boxes: int64 ``[B, 4]`` half-open ``(y0, y1, x0, x1)``; ``(0, 0, 0, 0)`` = empty.
        ratio: area factor η ``>= 1`` (1 = identity).

    Returns:
        ``[B, 3, H, W]`` of the input dtype.
    """
    if images.dim() != 4 or boxes.dim() != 2 or boxes.shape != (images.shape[0], 4):
        raise ValueError(f"expected images [B,3,H,W] and boxes [B,4], got "
                         f"{tuple(images.shape)} and {tuple(boxes.shape)}")
    if _check_ratio(ratio) == 1.0:
        return images.clone()
    size = images.shape[-2:]
    coarse = upsample_nearest(downsample_image(images, ratio), size)
    inside = _box_mask(boxes, size, images.device).unsqueeze(1)   # [B, 1, H, W]
    return torch.where(inside, images, coarse)


def soft_compress(images: torch.Tensor, cam_up: torch.Tensor, ratio: float) -> torch.Tensor:
    """Soft (differentiable) compression ``x̃ = c↑ ⊙ x + (1 − c↑) ⊙ x_η`` for the BOP step.

    Args:
        images: float ``[B, 3, H, W]`` (e.g. normalised network inputs).
        cam_up: ``[B, 1, H, W]`` or ``[B, H, W]`` soft mask in ``[0, 1]`` at image resolution
            (e.g. :func:`upsample_cam` of the un-thresholded CAM).
        ratio: area factor η ``>= 1``.

    Returns:
        float ``[B, 3, H, W]``, differentiable w.r.t. ``cam_up`` (and ``images``).
    """
    if cam_up.dim() == 3:
        cam_up = cam_up.unsqueeze(1)
    if cam_up.dim() != 4 or cam_up.shape[0] != images.shape[0] or \
            tuple(cam_up.shape[-2:]) != tuple(images.shape[-2:]):
        raise ValueError(f"cam_up {tuple(cam_up.shape)} does not match images "
                         f"{tuple(images.shape)}")
    coarse = upsample_nearest(downsample_image(images, ratio), images.shape[-2:])
    c = cam_up.to(images.dtype)
    return c * images + (1.0 - c) * coarse


# --------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------
def box_area_fraction(boxes: torch.Tensor, size: _Size) -> torch.Tensor:
    """``area(box) / (H * W)`` as float32 ``[B]`` (negative extents count as 0)."""
    H, W = int(size[0]), int(size[1])
    b = boxes.to(torch.int64)
    h = (b[:, 1] - b[:, 0]).clamp(min=0)
    w = (b[:, 3] - b[:, 2]).clamp(min=0)
    return (h * w).to(torch.float32) / float(H * W)


def exemplar_cost(boxes: torch.Tensor, size: _Size, ratio: float) -> torch.Tensor:
    """Cost in full-image units: ``a + (1 − a) / ratio`` with ``a = area / (H·W)``.

    Full box → 1, empty box → ``1 / ratio``. Returns float32 ``[B]`` on ``boxes``' device.
    """
    ratio = _check_ratio(ratio)
    a = box_area_fraction(boxes, size)
    return a + (1.0 - a) / ratio


# --------------------------------------------------------------------------------------------
# Storage: small image + full-resolution crop, and rebuild
# --------------------------------------------------------------------------------------------
def extract_crops(images: torch.Tensor, boxes: torch.Tensor) -> list[torch.Tensor]:
    """Full-resolution box crops, one compact tensor per image (``[3, y1-y0, x1-x0]``).

    Each crop is ``clone()``-d so that storing it does not keep the whole image alive.
    Per-image loop of slicing only (boxes are moved to the CPU once).
    """
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes {tuple(boxes.shape)} do not match images {tuple(images.shape)}")
    out = []
    for img, (y0, y1, x0, x1) in zip(images, boxes.tolist()):
        out.append(img[:, y0:max(y0, y1), x0:max(x0, x1)].clone())
    return out


def rebuild_compressed(small: Union[torch.Tensor, Sequence[torch.Tensor]],
                       crops: Sequence[torch.Tensor], boxes: torch.Tensor,
                       size: _Size) -> torch.Tensor:
    """Rebuild compressed exemplars from their stored parts.

    ``rebuild_compressed(downsample_image(x, r), extract_crops(x, b), b, x.shape[-2:])`` equals
    ``compress_images(x, b, r)`` bit-identically.

    Args:
        small: ``[B, 3, h', w']`` or a list of ``[3, h', w']`` (same size) downsampled images.
        crops: list of ``B`` crops, crop ``i`` of shape ``[3, y1-y0, x1-x0]`` of box ``i``
            (``[3, 0, 0]``-like for the empty box).
        boxes: int64 ``[B, 4]`` half-open ``(y0, y1, x0, x1)``.
        size: ``(H, W)`` full image size.

    Returns:
        ``[B, 3, H, W]`` of ``small``'s dtype, on ``small``'s device. The upsampling is
        batched; only the pasting of the crops is a per-image loop of slicing.
    """
    if not torch.is_tensor(small):
        small = torch.stack(list(small))
    B = small.shape[0]
    if len(crops) != B or boxes.shape != (B, 4):
        raise ValueError(f"got {B} small images, {len(crops)} crops and boxes "
                         f"{tuple(boxes.shape)}")
    out = upsample_nearest(small, size)
    if out is small:
        out = out.clone()
    for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        h, w = max(0, y1 - y0), max(0, x1 - x0)
        if h == 0 or w == 0:
            continue
        crop = crops[i]
        if tuple(crop.shape[-2:]) != (h, w):
            raise ValueError(f"crop {i} has shape {tuple(crop.shape)}, box needs (3, {h}, {w})")
        out[i, :, y0:y1, x0:x1] = crop.to(device=out.device, dtype=out.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Packed storage: only the pixels a compressed exemplar needs (what the memory keeps)
# --------------------------------------------------------------------------------------------
def _source_rows(out_size: int, in_size: int, device: torch.device) -> torch.Tensor:
    """int64 [out_size]: the source index ``F.interpolate(mode="nearest")`` reads for each output
    row when resizing ``in_size`` -> ``out_size`` (taken from interpolate itself, so it is exact)."""
    src = torch.arange(in_size, device=device, dtype=torch.float32).view(1, 1, in_size, 1)
    return F.interpolate(src, size=(out_size, 1), mode="nearest").view(out_size).round().long()


def needed_small_pixels(boxes: torch.Tensor, size: _Size, ratio: float) -> torch.Tensor:
    """Boolean ``[B, h', w']``: the pixels of the downsampled image that some pixel *outside* the box
    reads when it is upsampled back to ``size`` — the only ones a compressed exemplar must keep.

    With a full box nothing is needed; with the empty box every pixel is. Batched (scatter-max).
    """
    H, W = int(size[0]), int(size[1])
    h, w = downsampled_size((H, W), ratio)
    B = boxes.shape[0]
    device = boxes.device
    outside = ~_box_mask(boxes, (H, W), device)                          # [B, H, W]
    rows, cols = _source_rows(H, h, device), _source_rows(W, w, device)  # [H], [W]
    flat = (rows[:, None] * w + cols[None, :]).reshape(1, H * W).expand(B, -1)
    needed = torch.zeros(B, h * w, dtype=torch.uint8, device=device)
    needed.scatter_reduce_(1, flat, outside.reshape(B, H * W).to(torch.uint8), reduce="amax")
    return needed.view(B, h, w).bool()


def stored_pixel_counts(boxes: torch.Tensor, size: _Size, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per exemplar, the number of stored full-resolution (box) pixels and of stored downsampled
    pixels: two int64 ``[B]`` (each pixel is 3 bytes)."""
    H, W = int(size[0]), int(size[1])
    crop = (box_area_fraction(boxes, (H, W)) * (H * W)).round().long()
    small = needed_small_pixels(boxes, (H, W), ratio).flatten(1).sum(1)
    return crop, small


def encode_compressed(images: torch.Tensor, boxes: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack compressed exemplars into the pixels they need, batched.

    Args:
        images: uint8 ``[B, 3, H, W]`` originals; boxes: int64 ``[B, 4]``; ratio: area factor η.
    Returns:
        ``box_pixels`` uint8 ``[Kb, 3]``: the full-resolution pixels inside the boxes, image after
        image, row-major; ``small_pixels`` uint8 ``[Ks, 3]``: the pixels of the downsampled images
        that the outside of the boxes needs (:func:`needed_small_pixels`), in the same order.
        Their bytes are ≈ ``exemplar_cost × 3·H·W`` (up to the rounding of the box border).
    """
    _check_ratio(ratio)
    size = images.shape[-2:]
    inside = _box_mask(boxes, size, images.device)                      # [B, H, W]
    box_pixels = images.permute(0, 2, 3, 1)[inside]                     # [Kb, 3]
    small = downsample_image(images, ratio)
    needed = needed_small_pixels(boxes.to(images.device), size, ratio)
    small_pixels = small.permute(0, 2, 3, 1)[needed]                    # [Ks, 3]
    return box_pixels.contiguous(), small_pixels.contiguous()


def decode_compressed(box_pixels: torch.Tensor, small_pixels: torch.Tensor, boxes: torch.Tensor,
                      size: _Size, ratio: float) -> torch.Tensor:
    """Inverse of :func:`encode_compressed`: uint8 ``[B, 3, H, W]`` equal to
    ``compress_images(images, boxes, ratio)`` bit for bit. Batched, no per-image loop."""
    H, W = int(size[0]), int(size[1])
    h, w = downsampled_size((H, W), ratio)
    B = boxes.shape[0]
    device = box_pixels.device
    boxes = boxes.to(device)
    small = torch.zeros(B, h, w, 3, dtype=torch.uint8, device=device)
    small[needed_small_pixels(boxes, (H, W), ratio)] = small_pixels
    out = upsample_nearest(small.permute(0, 3, 1, 2), (H, W))
    out = out.permute(0, 2, 3, 1).clone()                              # [B, H, W, 3]
    out[_box_mask(boxes, (H, W), device)] = box_pixels
    return out.permute(0, 3, 1, 2).contiguous()
