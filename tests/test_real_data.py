"""A tiny LUCIR run on real images: Tiny-ImageNet (the 50-class subset in ../shared/data), 5 classes.

The run goes through the command line exactly as a user's would (data_root relative to the
repository root, as in configs/lucir-tinyimagenet50.json), restricted by a class_list to 5 classes
(3 in phase 0, then 2) at 24 px with 2-3 epochs, and must learn clearly above chance.
Measured (seed 1993 / 1): phase 0 top-1 64.7 / 78.0 % (chance 33 %); last top-1 CNN 49.2 / 56.4 %,
NME 42.4 / 56.0 % (chance 20 %); 32-37 s on 2 busy CPU cores.
"""
from __future__ import annotations

import json
import time

import pytest

import main
from conftest import REPO, read_metrics, read_results

DATA_ROOT = "../shared/data/tiny-imagenet-50"          # relative to the repository root
# ladybug, volleyball, cliff, goose, teapot: five visually distinct classes
CLASSES = ["n02165456", "n04540053", "n09246464", "n01855672", "n04398044"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    if not (REPO / DATA_ROOT / "wnids.txt").is_file():
        pytest.skip(f"Tiny-ImageNet subset not found at {(REPO / DATA_ROOT).resolve()}")
    tmp = tmp_path_factory.mktemp("real")
    (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    raw = {
        "dataset": "tinyimagenet", "data_root": DATA_ROOT, "class_list": str(tmp / "classes.txt"),
        "cache_dir": str(tmp / "cache"), "image_size": 24, "input_size": 24, "augment": "none",
        "seed": 1993, "init_cls": 3, "increment": 2, "num_phases": 2, "memory_size": 150,
        "model_name": "lucir", "convnet_type": "resnet20", "batch_size": 32, "eval_batch_size": 256,
        "init_epochs": 3, "init_lr": 0.1, "init_milestones": [], "epochs": 2, "lr": 0.05, "milestones": [],
        "scheduler": "cosine", "cbf_epochs": 10, "cbf_milestones": [], "device": "cpu", "checkpoints": "last",
    }
    (tmp / "real.json").write_text(json.dumps(raw))
    out = tmp / "out"
    mp = pytest.MonkeyPatch()
    mp.chdir(REPO)
    try:
        start = time.time()
        code = main.main(["--config", str(tmp / "real.json"), "--output", str(out)])
        seconds = time.time() - start
    finally:
        mp.undo()
    print(f"real-data LUCIR run: {seconds:.1f} s")
    assert code == 0
    return out, read_results(out), seconds


def test_real_data_run_learns_above_chance(real_run):
    out, results, _ = real_run
    assert results["class_names"] and sorted(results["class_names"]) == sorted(CLASSES)
    assert [p["classes"] for p in results["phases"]] == [[0, 3], [3, 5]]
    first, last = results["phases"]
    assert first["cnn"]["top1"] >= 50           # 3 classes, chance 33.3 %; measured 64.7 / 78.0
    assert last["cnn"]["top1"] >= 36            # 5 classes, chance 20 %; measured 49.2 / 56.4
    assert last["nme"]["top1"] >= 32            # measured 42.4 / 56.0
    assert last["memory"]["per_class"] == [30] * 5 and last["memory"]["used"] <= 150


def test_real_data_run_outputs(real_run):
    out, results, _ = real_run
    stages = {(m["phase"], m["stage"]) for m in read_metrics(out)}
    assert stages == {(0, "train"), (1, "train"), (1, "balanced_finetune")}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["phase_1.pt"]
    assert any((out.parent / "cache").rglob("*")), "decoded images are cached in cache_dir"
    # 500 training and 50 validation images per class
    assert "2500 train / 250 test images" in (out / "log.txt").read_text()
