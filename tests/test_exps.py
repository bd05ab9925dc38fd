"""The experiment scripts' pure parts (exps/)."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "exps"))

from localisation import box_overlap, box_scores  # noqa: E402


def test_box_overlap_and_scores_known_answers():
    truth = torch.tensor([[0, 10, 0, 10], [4, 8, 4, 8]])
    kept = torch.tensor([[0, 5, 0, 10], [0, 16, 0, 16]])
    assert box_overlap(kept, truth).tolist() == [50.0, 16.0]
    s = box_scores(kept, truth, size=16, ratio=4.0)
    assert s["coverage"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["iou"] == pytest.approx((50 / 100 + 16 / 256) / 2, abs=1e-4)
    assert s["area"] == pytest.approx((50 / 256 + 1.0) / 2, abs=1e-4)
    a = 50 / 256
    assert s["cost"] == pytest.approx(((a + (1 - a) / 4) + 1.0) / 2, abs=1e-4)


def test_localisation_restores_the_asked_phase(tmp_path):
    from conftest import run, tiny_config
    from localisation import restore

    out = tmp_path / "run"
    run(tiny_config(compression="cim", init_epochs=1, epochs=1), out)
    trainer, last = restore(out)
    assert last == 2 and trainer.phases()[last].last == 6
    trainer, last = restore(out, phase=0)
    assert last == 0 and len(trainer.memory.classes) == 2
    with pytest.raises(SystemExit, match="phases \\[0, 1, 2\\]"):
        restore(out, phase=7)
