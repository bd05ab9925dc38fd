"""How well the kept boxes cover the object: CAM (CIL model) vs CIM (PAU model) on ground-truth boxes.

    python exps/localisation.py --run OUTPUT_FOLDER [--phase K] [--split test|train] [--per-class 50]
                                [--threads 1]

For a finished (or stopped) run on a dataset with object boxes (``tinyimagenet``: its
``*_boxes.txt`` / ``val_annotations.txt``), restores the newest checkpoint (or phase K's, when the run
kept it: ``checkpoints: "all"``) and, for the images of
every class seen so far, computes the box each policy would keep with the run's ``mask_threshold``:

* ``cam``: the CAM of the CIL model (all activations ReLU);
* ``cim``: the CAM of the CIM model (every activation its trained PAU) — only if the run used ``cim``;
* ``center@cam`` / ``center@cim``: a centred square box of the same mean area as the ``cam`` /
  ``cim`` boxes (references: coverage grows with area, so compare a policy with the centred box
  of its own area).

Reported per policy: ``coverage`` = mean |GT ∩ kept| / |GT| (the fraction of the true object box
kept at full resolution), ``iou`` = mean IoU of the two boxes, ``area`` = mean kept-box area
fraction and ``cost`` = mean exemplar cost a + (1 − a)/η. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_throughput import run_main  # noqa: E402
from models.cim import ExemplarCompression, center_boxes  # noqa: E402
from trainer import Trainer, saved_checkpoints  # noqa: E402
from utils import batching  # noqa: E402
from utils.compression import box_area_fraction, exemplar_cost  # noqa: E402
from utils.config import resolve_config  # noqa: E402
from utils.errors import DataError, UserError  # noqa: E402
from utils.io import path_problem  # noqa: E402
from utils.results_file import read_json_file  # noqa: E402


def box_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection areas of half-open boxes a, b [N, 4] (y0, y1, x0, x1) -> float [N]."""
    h = (torch.minimum(a[:, 1], b[:, 1]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    w = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 2], b[:, 2])).clamp(min=0)
    return (h * w).float()


def box_scores(kept: torch.Tensor, truth: torch.Tensor, size: int, ratio: float) -> dict:
    """Mean coverage of ``truth`` by ``kept``, IoU, kept area fraction and exemplar cost ([N, 4] each)."""
    inter = box_overlap(kept, truth)
    area = lambda b: ((b[:, 1] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 2]).clamp(min=0)).float()  # noqa: E731
    union = area(kept) + area(truth) - inter
    return {"coverage": round(float((inter / area(truth).clamp(min=1)).mean()), 4),
            "iou": round(float((inter / union.clamp(min=1)).mean()), 4),
            "area": round(float(box_area_fraction(kept, (size, size)).mean()), 4),
            "cost": round(float(exemplar_cost(kept, (size, size), ratio).mean()), 4)}


def restore(run: Path, phase: int | None = None) -> tuple[Trainer, int]:
    """A Trainer holding the checkpoint of ``phase`` (default: the newest) of ``run``; returns it and
    the restored phase's index. Nothing is written to ``run``. UserError naming the folder if it is no
    run's (no config.json, no checkpoint) or lacks the asked phase's checkpoint."""
    if not run.is_dir():
        raise UserError(f"--run {run} {path_problem(str(run), 'folder')}; give a run's output folder.")
    if not (run / "config.json").is_file():
        raise UserError(f"--run {run} is not a run's output folder: {run / 'config.json'} "
                        f"{path_problem(str(run / 'config.json'), 'file')}.")
    cfg = read_json_file(run / "config.json")
    if not isinstance(cfg, dict):
        raise DataError(f"{run / 'config.json'} does not hold a config object.")
    cfg = resolve_config(cfg)
    ckpts = saved_checkpoints(run)
    if not ckpts:
        raise UserError(f"{run} has no checkpoints/phase_*.pt")
    if phase is not None and phase not in ckpts:
        raise UserError(f"{run} has no checkpoint of phase {phase}; it has phases {sorted(ckpts)}")
    state = torch.load(ckpts[max(ckpts) if phase is None else phase], map_location="cpu", weights_only=False)
    trainer = Trainer(cfg, run / "_localisation_unused")
    return trainer, trainer.load_state(state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--phase", type=int, default=None, help="the phase whose checkpoint to score (default: newest)")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--per-class", type=int, default=50, help="images per class (the first ones of the split)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    trainer, last = restore(a.run, a.phase)
    split = trainer.data.test if a.split == "test" else trainer.data.train
    if split.boxes is None:
        raise UserError(f"dataset {trainer.cfg['dataset']} has no object boxes")
    labels = trainer.test_labels if a.split == "test" else trainer.train_labels
    images = trainer.test_images if a.split == "test" else trainer.train_images
    seen = trainer.phases()[last].last
    index = torch.cat([(labels == c).nonzero().flatten()[:a.per_class] for c in range(seen)])
    cfg = trainer.cfg
    # a streamed set (in_memory false) is a lazy Dataset, not a tensor: decode the selected images
    imgs = batching.materialize(batching.select(images, index), cfg["num_workers"])
    y, truth, size = labels[index], split.boxes[index], imgs.shape[-1]
    plugin = next((p for p in trainer.plugins if isinstance(p, ExemplarCompression)), None) \
        or ExemplarCompression({**cfg, "compression": "cam"}, trainer.ctx)
    has_pau = cfg["compression"] == "cim"
    rows = {}
    for policy in ("cam", "cim") if has_pau else ("cam",):
        plugin.policy = policy
        rows[policy] = box_scores(plugin.boxes(imgs, y).cpu(), truth, size, cfg["compress_ratio"])
    for policy in list(rows):
        rows[f"center@{policy}"] = box_scores(center_boxes(len(y), size, rows[policy]["area"]), truth, size,
                                              cfg["compress_ratio"])
    print(f"run {a.run} (phase {last}, {seen} classes, {len(y)} {a.split} images, threshold {cfg['mask_threshold']}, "
          f"ratio {cfg['compress_ratio']})")
    print(f"{'policy':11s} {'coverage':>9s} {'iou':>7s} {'area':>7s} {'cost':>7s}")
    for name, r in rows.items():
        print(f"{name:11s} {r['coverage']:9.4f} {r['iou']:7.4f} {r['area']:7.4f} {r['cost']:7.4f}")
    print(json.dumps({"run": str(a.run), "phase": last, "classes": seen, "images": len(y), "split": a.split,
                      "scores": rows}))


if __name__ == "__main__":
    sys.exit(run_main(main))
