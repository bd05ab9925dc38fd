"""A procedurally generated image classification set with localised objects.

Each class is a coloured shape: ``SHAPES`` x ``COLOURS`` x ``TEXTURES`` = 10 x 10 x 2 = 200
possible classes. Class ``c`` has shape ``c % 10``, colour ``(c % 10 + (c // 10) % 10) % 10`` and
texture ``c // 100``, so neighbouring classes (and every class of a 10-class set) differ in both
shape and colour, and the first 100 classes are all shape/colour pairs.

Every image shows one object of its class at a random position, scale (its box side is roughly
30-60 % of the image side), aspect ratio and small rotation, over a cluttered background of
low-frequency colour noise and soft random-coloured blobs. The clutter is drawn independently of
the class, so only the object tells the class apart and a class activation map should fall on it;
the object's tight ground-truth box is returned.

Everything is vectorised in torch and deterministic: the same ``seed`` gives bit-identical
tensors, and the train and test splits come from independent RNG streams (``SeedSequence``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import ConfigError

# "seed" is the data seed: the images stay the same when a run's seed (class order, init) changes.
SHAPES_DEFAULTS = {"num_classes": 10, "train_per_class": 100, "test_per_class": 30, "seed": 0}
MAX_PER_CLASS = 100_000

SHAPES = ("disc", "square", "triangle", "plus", "ring", "diamond", "cross", "frame", "bars", "dome")
COLOURS = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.70, 0.15), "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10), "magenta": (0.85, 0.10, 0.80), "cyan": (0.10, 0.80, 0.85),
    "orange": (1.00, 0.50, 0.00), "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05),
    "purple": (0.45, 0.15, 0.65),
}
TEXTURES = ("solid", "checked")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)

_SPLIT_STREAM = {"train": 0, "test": 1}
_CHUNK = 256  # images rendered at once: bounds memory at large image sizes


def check_options(options: dict | None) -> dict:
    """``options`` (the ``shapes`` config dict) with defaults filled in; ConfigError if bad."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(SHAPES_DEFAULTS))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in 'shapes'; allowed: {sorted(SHAPES_DEFAULTS)}.")
    resolved = {**SHAPES_DEFAULTS, **options}
    for key, value in resolved.items():
        low = 0 if key == "seed" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"'shapes.{key}' must be an integer ≥ {low}, got {json.dumps(value, default=repr)}.")
    for key in ("train_per_class", "test_per_class"):   # 100,000 images of a class: gigabytes already
        if resolved[key] > MAX_PER_CLASS:
            raise ConfigError(f"'shapes.{key}' must be at most {MAX_PER_CLASS}, got {resolved[key]}.")
    if resolved["num_classes"] < 2 or resolved["num_classes"] > MAX_CLASSES:
        raise ConfigError(f"'shapes.num_classes' must be between 2 and {MAX_CLASSES}, "
                          f"got {resolved['num_classes']}.")
    return resolved


def class_attributes(c: int) -> tuple[int, int, int]:
    """(shape index, colour index, texture index) of class ``c``."""
    n_s, n_c = len(SHAPES), len(COLOURS)
    return c % n_s, (c % n_s + (c // n_s) % n_c) % n_c, c // (n_s * n_c)


def class_names(num_classes: int) -> list[str]:
    """Readable class names, e.g. ``red_disc``, ``blue_ring_checked``."""
    colour_names = list(COLOURS)
    names = []
    for c in range(num_classes):
        s, col, t = class_attributes(c)
        names.append(f"{colour_names[col]}_{SHAPES[s]}" + ("" if t == 0 else f"_{TEXTURES[t]}"))
    return names


@dataclass
class ShapesSplit:
    """One generated split. ``images`` uint8 [N,3,S,S]; ``labels`` int64 [N] (class-sorted);
    ``boxes`` int64 [N,4] tight object box (y0, y1, x0, x1), half-open; ``masks`` bool [N,S,S]
    object pixels and ``backgrounds`` uint8 [N,3,S,S] the image without the object (only with
    ``return_parts=True``, for tests)."""

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor | None = None
    backgrounds: torch.Tensor | None = None


def split_generator(seed: int, split: str) -> torch.Generator:
    """An independent torch RNG stream per (seed, split)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, _SPLIT_STREAM[split]]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def generate_split(num_classes: int, per_class: int, image_size: int, seed: int, split: str,
                   *, return_parts: bool = False) -> ShapesSplit:
    """Render ``per_class`` images of each of ``num_classes`` classes at side ``image_size``."""
    if image_size < 8:
        raise ConfigError(f"image_size must be >= 8 for the shapes dataset, got {image_size}.")
    g = split_generator(seed, split)
    n, S = num_classes * per_class, image_size
    labels = torch.arange(num_classes).repeat_interleave(per_class)

    # Per-image object parameters, drawn up front (small tensors).
    attrs = torch.tensor([class_attributes(c) for c in range(num_classes)], dtype=torch.long)[labels]
    side = S * (0.30 + 0.30 * torch.rand(n, generator=g))           # box side before aspect/rotation
    aspect = torch.exp((torch.rand(n, generator=g) - 0.5) * 0.5)     # width/height in ~[0.78, 1.28]
    half_h, half_w = side / 2 / aspect.sqrt(), side / 2 * aspect.sqrt()
    angle = (torch.rand(n, generator=g) - 0.5) * (math.pi / 6)       # +-15 degrees
    reach = torch.maximum(half_h, half_w) * 1.05                     # keeps the rotated shape inside
    reach = torch.minimum(reach, torch.full_like(reach, S / 2))
    cy = reach + (S - 2 * reach) * torch.rand(n, generator=g)
    cx = reach + (S - 2 * reach) * torch.rand(n, generator=g)
    palette = torch.tensor(list(COLOURS.values()))
    colour = palette[attrs[:, 1]] * (0.85 + 0.3 * torch.rand(n, 1, generator=g))  # brightness jitter
    colour = colour.clamp(0, 1)

    images = torch.empty(n, 3, S, S, dtype=torch.uint8)
    boxes = torch.empty(n, 4, dtype=torch.long)
    masks = torch.empty(n, S, S, dtype=torch.bool) if return_parts else None
    backgrounds = torch.empty(n, 3, S, S, dtype=torch.uint8) if return_parts else None
    for a in range(0, n, _CHUNK):
        b = min(n, a + _CHUNK)
        bg = _background(b - a, S, g)
        u, v = _object_coords(S, cy[a:b], cx[a:b], half_h[a:b], half_w[a:b], angle[a:b])
        m = _shape_masks(u, v, attrs[a:b, 0])
        m = _ensure_nonempty(m, cy[a:b], cx[a:b])
        fill = colour[a:b, :, None, None]
        if (attrs[a:b, 2] > 0).any():
            fill = fill * _texture(u, v, attrs[a:b, 2])[:, None]
        if return_parts:
            masks[a:b] = m
            backgrounds[a:b] = _to_uint8(bg.clone())
        img = torch.where(m[:, None], fill, bg)
        img += 0.03 * torch.randn(img.shape, generator=g)  # sensor-like grain over everything
        images[a:b] = _to_uint8(img)
        boxes[a:b] = _tight_boxes(m)
    return ShapesSplit(images, labels, boxes, masks, backgrounds)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [0,1] -> uint8, rounding (in place on ``x``: +0.5 then truncation)."""
    return x.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def _background(n: int, S: int, g: torch.Generator) -> torch.Tensor:
    """Clutter, float [n,3,S,S] in [0,1]: low-frequency colour noise plus soft coloured blobs.

    It has no fine detail, so it is drawn at a side of at most 48 px and upsampled (cheap at
    large image sizes); the grain added later supplies the pixel-level texture.
    """
    L = min(S, 48)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    bg = F.interpolate(coarse, size=(L, L), mode="bicubic", align_corners=False)
    bg = 0.5 + 0.7 * (bg - 0.5)  # a little less saturated than the objects, so they stand out
    yy = (torch.arange(L) + 0.5).view(1, L, 1)
    xx = (torch.arange(L) + 0.5).view(1, 1, L)
    for _ in range(4):  # soft Gaussian blobs (no crisp edges: they must not look like a class shape)
        by, bx = (torch.rand(2, n, 1, 1, generator=g) * L).unbind(0)
        sigma = L * (0.05 + 0.12 * torch.rand(n, 1, 1, generator=g))
        weight = 0.8 * torch.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * sigma ** 2))  # [n,L,L]
        blob_colour = torch.rand(n, 3, 1, 1, generator=g)
        bg = bg + weight[:, None] * (blob_colour - bg)
    if L != S:
        bg = F.interpolate(bg, size=(S, S), mode="bilinear", align_corners=False)
    return bg


def _object_coords(S, cy, cx, half_h, half_w, angle):
    """Pixel centres in each object's frame: ``u`` (across), ``v`` (down), float [n,S,S], with
    the object's box at [-1, 1]^2 before rotation."""
    yy = (torch.arange(S) + 0.5).view(1, S, 1) - cy.view(-1, 1, 1)
    xx = (torch.arange(S) + 0.5).view(1, 1, S) - cx.view(-1, 1, 1)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    u = (xx * cos + yy * sin) / half_w.view(-1, 1, 1)
    v = (-xx * sin + yy * cos) / half_h.view(-1, 1, 1)
    return u, v


def _shape_masks(u: torch.Tensor, v: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """bool [n,S,S]: pixels inside shape ``shape[i]`` (index into SHAPES) of each image."""
    au, av = u.abs(), v.abs()
    r2 = u * u + v * v
    box = torch.maximum(au, av)
    out = torch.zeros_like(u, dtype=torch.bool)
    for s in shape.unique().tolist():  # one vectorised formula per shape present
        i = shape == s
        uu, vv, aa, bb, rr, mx = u[i], v[i], au[i], av[i], r2[i], box[i]
        if SHAPES[s] == "disc":
            m = rr <= 1
        elif SHAPES[s] == "square":
            m = mx <= 0.9
        elif SHAPES[s] == "triangle":  # apex up, base at the bottom
            m = (vv <= 0.85) & (aa <= (vv + 1) / 1.85)
        elif SHAPES[s] == "plus":
            m = ((aa <= 0.3) & (bb <= 1)) | ((bb <= 0.3) & (aa <= 1))
        elif SHAPES[s] == "ring":
            m = (rr <= 1) & (rr >= 0.55 ** 2)
        elif SHAPES[s] == "diamond":
            m = aa + bb <= 1
        elif SHAPES[s] == "cross":  # diagonal cross (X)
            m = (((uu - vv).abs() <= 0.4) | ((uu + vv).abs() <= 0.4)) & (mx <= 0.9)
        elif SHAPES[s] == "frame":  # hollow square
            m = (mx <= 1) & (mx >= 0.55)
        elif SHAPES[s] == "bars":  # three horizontal bars
            m = (mx <= 0.95) & (torch.floor((vv + 0.95) / 0.38) % 2 == 0)
        else:  # dome: upper half-disc
            m = (rr <= 1) & (vv <= 0.2)
        out[i] = m
    return out


def _texture(u: torch.Tensor, v: torch.Tensor, texture: torch.Tensor) -> torch.Tensor:
    """Brightness factor of the object's fill, float [n,S,S]: 1 (solid) or a checkerboard."""
    checks = (torch.floor((u + 1) * 2.5) + torch.floor((v + 1) * 2.5)) % 2  # 5x5 checks per object
    return torch.where(texture.view(-1, 1, 1) == 1, 1 - 0.5 * checks, torch.ones_like(u))


def _ensure_nonempty(m: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """At tiny sizes a thin shape can miss every pixel centre: then mark the centre pixel."""
    empty = ~m.flatten(1).any(1)
    if empty.any():
        S = m.shape[-1]
        idx = empty.nonzero().flatten()
        m[idx, cy[idx].long().clamp(0, S - 1), cx[idx].long().clamp(0, S - 1)] = True
    return m


def _tight_boxes(m: torch.Tensor) -> torch.Tensor:
    """int64 [n,4] (y0, y1, x0, x1), half-open, around the True pixels of each mask [n,S,S]."""
    S = m.shape[-1]
    rows, cols = m.any(2).to(torch.uint8), m.any(1).to(torch.uint8)  # [n,S]
    y0 = rows.argmax(1)
    y1 = S - rows.flip(1).argmax(1)
    x0 = cols.argmax(1)
    x1 = S - cols.flip(1).argmax(1)
    return torch.stack([y0, y1, x0, x1], 1).long()
