"""``exemplars_phase_<k>.png``: what a researcher looks at first to trust the masks.

For a few classes, two rows each: the stored exemplars as rebuilt from memory with the kept
(full-resolution) box outlined in red, and below them the original images with the CAM that chose
the box overlaid as a heat map. Images stored whole (config key ``stored_form``: each original
squashed to S x S) are drawn at their original aspect, fitted into the S x S tile (boxes and CAMs,
computed in stored pixels, are drawn first and squashed back with them).

The tiles (:func:`exemplar_grid`) are drawn with matplotlib, each at least ``MIN_TILE`` pixels on
screen (a 16 px exemplar is too small to judge at its own size), under a title that names the phase,
the policy and η, with a label per row (class, name, exemplars stored, mean cost) and a key below.
"""
from __future__ import annotations

from pathlib import Path

import torch

from utils import batching
from utils.compression import upsample_cam
from utils.io import write_atomic


def jet(values: torch.Tensor) -> torch.Tensor:
    """float [..., H, W] in [0, 1] -> float [..., 3, H, W] RGB in [0, 1] (a jet-like colour map)."""
    v = values.clamp(0, 1).unsqueeze(-3)
    centres = torch.tensor([3.0, 2.0, 1.0], device=values.device).view(3, 1, 1)
    return (1.5 - (4 * v - centres).abs()).clamp(0, 1)


def outline_boxes(images: torch.Tensor, boxes: torch.Tensor, width: int = 1,
                  colour: tuple[int, int, int] = (255, 0, 0)) -> torch.Tensor:
    """uint8 [B, 3, H, W] with the border of each half-open box [B, 4] (y0, y1, x0, x1) drawn
    ``width`` pixels wide inside the box; empty boxes draw nothing."""
    B, _, H, W = images.shape
    ys = torch.arange(H).view(1, H, 1)
    xs = torch.arange(W).view(1, 1, W)
    y0, y1, x0, x1 = (boxes[:, i].view(B, 1, 1) for i in range(4))
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    core = (ys >= y0 + width) & (ys < y1 - width) & (xs >= x0 + width) & (xs < x1 - width)
    border = (inside & ~core).unsqueeze(1)                       # [B, 1, H, W]
    paint = torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1)
    return torch.where(border, paint, images)


def cam_overlay(images: torch.Tensor, cams: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """uint8 [B, 3, H, W] blended with the jet colours of ``cams`` [B, h, w] (upsampled bilinearly)."""
    heat = jet(upsample_cam(cams.float(), images.shape[-2:]))    # [B, 3, H, W]
    out = (1 - alpha) * images.float() / 255 + alpha * heat
    return (out * 255).round().clamp(0, 255).to(torch.uint8)


def letterbox(tiles: torch.Tensor, orig_hw: torch.Tensor | None, fill: int = 255) -> torch.Tensor:
    """uint8 [n, 3, S, S] tiles of whole-stored (squashed) images -> the same tiles at their original
    aspect (``orig_hw`` int64 [n, 2]), the long side S, centred on ``fill``. None: unchanged."""
    if orig_hw is None:
        return tiles
    import torch.nn.functional as F

    out = torch.full_like(tiles, fill)
    S = tiles.shape[-1]
    for j, (h0, w0) in enumerate(orig_hw.tolist()):
        if h0 <= 0 or w0 <= 0 or h0 == w0:
            out[j] = tiles[j]
            continue
        th, tw = (max(1, round(S * h0 / w0)), S) if w0 > h0 else (S, max(1, round(S * w0 / h0)))
        small = F.interpolate(tiles[j:j + 1].float(), size=(th, tw), mode="bilinear", align_corners=False,
                              antialias=True).round().clamp(0, 255).to(torch.uint8)[0]
        y, x = (S - th) // 2, (S - tw) // 2
        out[j, :, y:y + th, x:x + tw] = small
    return out


def exemplar_grid(rows: list[tuple], columns: int, pad: int = 2) -> torch.Tensor:
    """Tile per-class rows into one uint8 [3, H, W] image.

    rows: per class (rebuilt uint8 [n, 3, S, S], originals uint8 [n, 3, S, S], boxes [n, 4],
    cams [n, h, w]) with n ≤ ``columns``, optionally a fifth item: the original sizes int64 [n, 2]
    of whole-stored images (drawn at their aspect, :func:`letterbox`); each class gives two image
    rows (rebuilt + box, original + CAM).
    """
    S = rows[0][0].shape[-1]
    width = max(1, S // 48)
    H = len(rows) * 2 * (S + pad) + pad
    W = columns * (S + pad) + pad
    canvas = torch.full((3, H, W), 255, dtype=torch.uint8)
    for r, (rebuilt, originals, boxes, cams, *hw) in enumerate(rows):
        hw = hw[0] if hw else None
        top = letterbox(outline_boxes(rebuilt, boxes, width), hw)
        bottom = letterbox(cam_overlay(originals, cams), hw)
        for j in range(rebuilt.shape[0]):
            x = pad + j * (S + pad)
            y = pad + 2 * r * (S + pad)
            canvas[:, y:y + S, x:x + S] = top[j]
            canvas[:, y + S + pad:y + 2 * S + pad, x:x + S] = bottom[j]
    return canvas


MIN_TILE = 96   # on-screen pixels of a tile's side, at least


def render_figure(canvas: torch.Tensor, tile: int, pad: int, row_labels: list[tuple[str, str]], title: str,
                  key: str, path: Path) -> None:
    """Draw the uint8 [3, H, W] ``canvas`` of :func:`exemplar_grid` (tiles of side ``tile``, ``pad``
    apart) scaled up to ``MIN_TILE`` pixels a tile with nearest-neighbour pixels, with ``title``, one
    (upper, lower) label pair per class row and ``key`` below, and write it atomically to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    H, W = canvas.shape[-2:]
    dpi = 100
    scale = max(1.0, MIN_TILE / tile)
    width, height = W * scale / dpi, H * scale / dpi
    left, top, bottom = 2.6, 0.7, 0.75   # inches: row labels, title, key
    fig = Figure(figsize=(width + left + 0.2, height + top + bottom), dpi=dpi)
    FigureCanvasAgg(fig)
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes((left / fw, bottom / fh, width / fw, height / fh))
    ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
    centres, labels = [], []
    for r, pair in enumerate(row_labels):
        for half, text in enumerate(pair):
            centres.append(pad + (2 * r + half) * (tile + pad) + tile / 2)
            labels.append(text)
    ax.set_yticks(centres, labels, fontsize=9)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / fh, va="top")
    fig.text(0.5, 0.12 / fh, key, ha="center", va="bottom", fontsize=8, wrap=True)
    write_atomic(Path(path), lambda f: fig.savefig(f, format="png", dpi=dpi))


def figure_classes(classes_seen: int, count: int = 4) -> list[int]:
    """Up to ``count`` classes spread over 0 … classes_seen-1, the newest class always included."""
    if classes_seen <= count:
        return list(range(classes_seen))
    step = (classes_seen - 1) / (count - 1)
    return sorted({round(i * step) for i in range(count)})


def write_exemplar_figure(plugin, phase, path: Path, classes: int = 4, columns: int = 8) -> None:
    """Render the exemplars of a few seen classes from ``plugin.ctx.memory`` (CAMs from the
    plugin's CAM network: the PAU model for ``cim``) and write them to ``path``."""
    ctx = plugin.ctx
    rows, labels = [], []
    names = _readable(ctx)
    for c in figure_classes(phase.last, classes):
        ex = ctx.memory.classes.get(c)
        if ex is None or len(ex) == 0:
            continue
        head = ex.prefix(min(columns, len(ex)))
        originals = batching.materialize(batching.select(ctx.train_images, head.source_index))
        cams = plugin.cams(originals, torch.full((len(head),), c, dtype=torch.long)).cpu()
        rows.append((head.decode(), originals, head.boxes, cams, ctx.orig_hw(head.source_index)))
        age = "new" if c >= phase.first else "old"
        labels.append((f"class {c} ({age}): {names[c]}\n{len(ex)} stored, mean cost {float(ex.costs.mean()):.2f}",
                       "originals + CAM"))
    if not rows:
        return
    S, pad = rows[0][0].shape[-1], 2
    title = (f"Exemplars after phase {phase.index} (classes {phase.first}-{phase.last - 1} new): "
             f"policy {plugin.policy}, compress_ratio η = {plugin.ratio:g}")
    key = ("Upper row of a class: exemplars as stored and seen in training; red box: kept at full resolution, "
           "the rest stored at 1/η of its area and upsampled back. Lower row: the original image with the class "
           "activation map that chose the box (red = strongest). First exemplars in herding order.")
    render_figure(exemplar_grid(rows, columns, pad), S, pad, labels, title, key, path)


def _readable(ctx) -> list[str]:
    """Readable class names in class-order position (WordNet ids through words.txt when there is
    one), each at most 24 characters; the dataset's own names where none can be read."""
    from utils.class_names import readable_names
    from utils.errors import UserError

    ids = list(ctx.class_names)
    try:
        names = readable_names(ctx.cfg["dataset"], ctx.cfg.get("data_root"), ids)
    except (UserError, OSError):
        names = ids
    return [n if len(n) <= 24 else n[:23] + "…" for n in names]
