"""Shared helpers for the tests: a fast procedural-data config and a one-call run.

``tiny_config(**overrides)`` returns a raw (unresolved) config dict for a run that takes a few
seconds on a CPU: 6 procedural shape classes at 16 px, 3 phases of 2 classes, a small ResNet, few epochs.
``run(raw, out, **trainer_kwargs)`` resolves it and runs a :class:`trainer.Trainer` into ``out``.
"""
from __future__ import annotations

import os

# On a shared, busy CPU, OpenMP threads that spin while waiting make every torch op up to 10x slower
# (measured); passive waiting keeps the tests' run time stable. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# 6 classes x 40 training images at 16 px: ~2 s per phase with resnet20 on one CPU core.
TINY = {
    "dataset": "shapes",
    "shapes": {"num_classes": 6, "train_per_class": 40, "test_per_class": 20},
    "image_size": 16,
    "input_size": 16,
    "shuffle": True,
    "seed": 1993,
    "init_cls": 2,
    "increment": 2,
    "memory_size": 60,
    "fixed_memory": False,
    "model_name": "icarl",
    "convnet_type": "resnet20",
    "crop_padding": 2,
    "batch_size": 32,
    "eval_batch_size": 256,
    "init_epochs": 2, "init_lr": 0.1, "init_milestones": [],
    "epochs": 2, "lr": 0.1, "milestones": [],
    "scheduler": "constant",
    "cache_dir": None,
    "checkpoints": "all",
    "device": "cpu",
}


# Enough training for the learners to learn well above chance on TINY. Later phases: 12 epochs at lr
# 0.02 (with 8 at 0.05 the outcome swung with the thread count under torch 2.14 — float summation
# order — e.g. LUCIR's last top-1 67.5 with one thread and 40.0 with two, iCaRL's 31.7 with two).
# Measured, seed 1993, one / two threads, last top-1 (chance 16.7 %): iCaRL CNN 47.5 / 48.3, NME 57.5 /
# 60.8; LUCIR CNN 50.0 / 45.0, NME 56.7 / 59.2; finetune CNN 24.2 / 22.5 (forgetting 90.0 / 90.0).
LEARN = {"init_epochs": 10, "init_lr": 0.1, "epochs": 12, "lr": 0.02, "scheduler": "cosine"}
LUCIR_CBF = {"cbf_epochs": 4, "cbf_milestones": []}


def tiny_config(**overrides) -> dict:
    """A raw config dict for a fast CPU run on the procedural shapes set; ``overrides`` replace or add keys."""
    raw = copy.deepcopy(TINY)
    raw.update(copy.deepcopy(overrides))
    return raw


def run(raw: dict, out, config_name: str = "tiny", resume: bool = False, **trainer_kwargs) -> dict:
    """Resolve ``raw`` and run a Trainer into ``out``; returns the results dict."""
    from trainer import Trainer
    from utils.config import resolve_config

    return Trainer(resolve_config(raw), Path(out), config_name, **trainer_kwargs).run(resume=resume)


def read_results(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_seconds(obj):
    """``obj`` with every "seconds" field dropped (wall-clock times differ between runs)."""
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """An uninterrupted run of ``tiny_config()`` (iCaRL, 3 phases): (output folder, results)."""
    out = tmp_path_factory.mktemp("tiny_reference") / "run"
    return out, run(tiny_config(), out)


@pytest.fixture(scope="session")
def icarl_run(tmp_path_factory):
    """iCaRL trained long enough to learn (``LEARN``): (output folder, results, raw config)."""
    raw = tiny_config(model_name="icarl", **LEARN)
    out = tmp_path_factory.mktemp("icarl_learn") / "run"
    return out, run(raw, out), raw


COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 230), (230, 210, 30)]


def aspect_folder(root, train_per_class=16, test_per_class=6, sizes=((36, 24), (24, 36), (30, 30), (40, 22)),
                  ext="png"):
    """4 classes of landscape, portrait and square images (``sizes``: (width, height); PNG, or
    another format by ``ext``): a class colour over noise, with a white disc."""
    import torch
    from PIL import Image, ImageDraw

    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", train_per_class), ("val", test_per_class)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[(i + c) % len(sizes)]
                noise = torch.randint(-40, 41, (h, w, 3), generator=rng)
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
                img = Image.fromarray(pixels)
                r = 3 + i % 4
                ImageDraw.Draw(img).ellipse((w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r), fill=(255, 255, 255))
                img.save(folder / f"{i:02d}.{ext}")
    return root
