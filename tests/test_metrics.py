import pytest
import torch

from utils.metrics import accuracy_report, average_incremental_accuracy, forgetting, summarize, topk_hits


def test_accuracy_report_on_hand_made_table():
    # 6 samples, 4 classes; tasks [0,2) and [2,4). Predictions (argmax): 0, 1, 1, 3, 2, 0
    logits = torch.tensor([
        [9., 1, 0, 0],   # y0 correct
        [0., 9, 1, 0],   # y1 correct
        [1., 9, 0, 0],   # y0 wrong (2nd choice 0)
        [0., 0, 1, 9],   # y3 correct
        [0., 0, 9, 1],   # y3 wrong (2nd choice 3)
        [9., 0, 0, 1],   # y2 wrong (rank of class 2 is 3rd/4th)
    ])
    y = torch.tensor([0, 1, 0, 3, 3, 2])
    r = accuracy_report(logits, y, [(0, 2), (2, 4)], k=2)
    assert r["top1"] == pytest.approx(100 * 3 / 6, abs=1e-3)
    assert r["top5"] == pytest.approx(100 * 5 / 6, abs=1e-3)        # top-2 here: only the last row misses
    assert r["per_task"] == [pytest.approx(100 * 2 / 3, abs=1e-3), pytest.approx(100 * 1 / 3, abs=1e-3)]
    assert r["old"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert r["new"] == pytest.approx(100 * 1 / 3, abs=1e-3)


def test_per_task_uses_real_phase_boundaries_not_blocks_of_ten():
    logits = torch.eye(7) * 5
    y = torch.arange(7)
    y_wrong = y.clone()
    y_wrong[5:] = 0      # classes 5, 6 (task 2) all wrong
    r = accuracy_report(logits, torch.tensor([0, 1, 2, 3, 4, 5, 6]), [(0, 3), (3, 5), (5, 7)])
    assert r["per_task"] == [100.0, 100.0, 100.0]
    logits2 = logits.clone()
    logits2[5:, 0] = 10
    r2 = accuracy_report(logits2, y, [(0, 3), (3, 5), (5, 7)])
    assert r2["per_task"] == [100.0, 100.0, 0.0]
    assert r2["old"] == 100.0 and r2["new"] == 0.0


def test_phase_zero_has_no_old_accuracy():
    r = accuracy_report(torch.eye(3), torch.arange(3), [(0, 3)])
    assert r["old"] is None and r["new"] == 100.0


def test_topk_with_fewer_classes_than_k():
    assert topk_hits(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), k=5).all()


def test_forgetting_and_average():
    acc = [[90.0], [70.0, 80.0], [60.0, 75.0, 85.0]]
    # task 0: best before last = 90 -> 60: 30; task 1: best 80 -> 75: 5; mean 17.5
    assert forgetting(acc) == pytest.approx(17.5)
    assert forgetting([[50.0]]) is None
    assert average_incremental_accuracy([90, 80, 70]) == pytest.approx(80.0)


def test_summarize_collects_matrix():
    phases = [{"cnn": {"top1": 90.0, "per_task": [90.0]}},
              {"cnn": {"top1": 70.0, "per_task": [60.0, 80.0]}}]
    s = summarize(phases, "cnn")
    assert s["cnn_avg_top1"] == pytest.approx(80.0)
    assert s["cnn_last_top1"] == 70.0
    assert s["cnn_forgetting"] == pytest.approx(30.0)
    assert s["cnn_accuracy_matrix"] == [[90.0], [60.0, 80.0]]
    assert summarize([{"nme": None}], "nme")["nme_avg_top1"] is None


def test_pycil_forgetting_includes_the_last_phase_and_is_never_negative():
    from utils.metrics import forgetting, forgetting_pycil

    # task 0 improves in the last phase: ours is negative, PyCIL's is 0
    matrix = [[50.0], [40.0, 90.0], [60.0, 70.0, 80.0]]
    assert forgetting(matrix) == pytest.approx(((50 - 60) + (90 - 70)) / 2)
    assert forgetting_pycil(matrix) == pytest.approx(((60 - 60) + (90 - 70)) / 2)


def test_forgetting_skips_a_task_without_test_images():
    from utils.metrics import forgetting, forgetting_pycil, summarize

    matrix = [[None], [None, 90.0], [None, 70.0, 80.0]]
    assert forgetting(matrix) == 20.0 and forgetting_pycil(matrix) == 20.0
    assert forgetting([[None], [None, 50.0]]) is None
    phases = [{"cnn": {"top1": None, "per_task": [None]}}, {"cnn": {"top1": 50.0, "per_task": [None, 50.0]}}]
    s = summarize(phases, "cnn")
    assert s["cnn_avg_top1"] == 50.0 and s["cnn_forgetting"] is None and s["cnn_forgetting_pycil"] is None
