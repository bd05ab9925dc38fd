"""exps/report.py on hand-made results.json files: known answers for mean ± std over seeds, the
row labels, the published comparison, and the files it writes."""
from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

from conftest import REPO, tiny_config

sys.path.insert(0, str(REPO / "exps"))
import report  # noqa: E402

from utils.config import load_config_file, resolve_config  # noqa: E402


def _results(cfg: dict, top1: list[float], avg: float, last: float, forgetting: float, nme_avg=None,
             seconds=10.0, classes_per_phase=2, exemplars=60, nbytes=1000, cost=1.0) -> dict:
    phases = []
    for k, acc in enumerate(top1):
        hi = classes_per_phase * (k + 1)
        phases.append({"phase": k, "classes": [hi - classes_per_phase, hi],
                       "cnn": {"top1": acc, "per_task": [acc] * (k + 1)}, "nme": None,
                       "memory": {"exemplars": exemplars, "per_class": [exemplars // hi] * hi, "bytes": nbytes,
                                  "mean_cost": cost, "used": exemplars * cost, "budget": 60},
                       "seconds": seconds})
    summary = {"cnn_avg_top1": avg, "cnn_last_top1": last, "cnn_forgetting": forgetting,
               "cnn_accuracy_matrix": [[a] * (k + 1) for k, a in enumerate(top1)],
               "nme_avg_top1": nme_avg, "nme_last_top1": None, "nme_forgetting": None}
    return {"config": cfg, "config_hash": "x", "phases": phases, "summary": summary}


def _write(folder: Path, results: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_mean_std_known_answer():
    m, s, n = report.mean_std([50.0, 52.0, 57.0, None])
    assert n == 3 and abs(m - 53.0) < 1e-9
    assert abs(s - ((9 + 1 + 16) / 2) ** 0.5) < 1e-9          # sample std, n - 1
    assert report.mean_std([41.5]) == (41.5, None, 1)
    assert report.fmt_ms([50.0, 52.0, 57.0]) == "53.00 ± 3.61"
    assert report.fmt_ms([41.5]) == "41.50" and report.fmt_ms([None]) == "–"


def test_report_rows_numbers_and_files(tmp_path, capsys):
    root = tmp_path / "runs"
    a = [resolve_config(tiny_config(memory_size=40, seed=s)) for s in (1, 2, 3)]
    b = resolve_config(tiny_config(memory_size=60, seed=1))
    avgs, lasts, forg = [50.0, 52.0, 57.0], [40.0, 44.0, 42.0], [10.0, 12.0, 20.0]
    for cfg, avg, last, f, sec in zip(a, avgs, lasts, forg, (10.0, 20.0, 30.0)):
        _write(root / f"m40-s{cfg['seed']}", _results(cfg, [60.0, avg, last], avg, last, f, nme_avg=avg + 1,
                                                       seconds=sec, exemplars=36, nbytes=2400, cost=0.5))
    _write(root / "m60-s1", _results(b, [70.0, 60.0, 55.0], 61.67, 55.0, 8.0, nme_avg=60.0))
    (root / "partial").mkdir()   # a folder without results is skipped

    out = tmp_path / "report"
    assert report.main([str(root), "--output", str(out)]) == 0
    capsys.readouterr()
    rows = list(csv.reader(open(out / "report.csv")))
    header, body = rows[0], {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert set(body) == {"memory_size=40", "memory_size=60"}     # the varying key labels the rows
    r40 = body["memory_size=40"]
    assert r40["seeds"] == "3"
    assert r40["CNN avg"] == f"53.00 ± {statistics.stdev(avgs):.2f}" == "53.00 ± 3.61"
    assert r40["CNN last"] == "42.00 ± 2.00"
    assert r40["CNN forgetting"] == f"14.00 ± {statistics.stdev(forg):.2f}"
    assert r40["NME avg"] == "54.00 ± 3.61"
    assert r40["exemplars/class"] == "6.0 ± 0.0"     # 36 exemplars / 6 classes, same for each seed
    assert r40["memory bytes"] == "2400 ± 0"
    assert r40["wall time (s)"] == "60 ± 30"          # 3 phases x (10, 20, 30) s
    assert r40["phases"] == "3"
    assert r40["published avg (Δ)"] == "–"
    r60 = body["memory_size=60"]
    assert r60["seeds"] == "1" and r60["CNN avg"] == "61.67" and r60["CNN last"] == "55.00"
    assert "teacher avg" not in header               # no FOSTER run: no empty teacher columns
    md = (out / "report.md").read_text()
    assert "| memory_size=40 | 3 | 53.00 ± 3.61 | 42.00 ± 2.00 |" in md
    for name in ("accuracy_curve.png", "memory.png", "accuracy_matrix_memory_size_40.png",
                 "accuracy_matrix_memory_size_60.png"):
        assert (out / name).stat().st_size > 5000, name


def test_published_setting_stands_beside_ours(tmp_path, capsys):
    raw, _ = load_config_file("cim-food101")          # FOSTER + CIM, Food-101, B0 10 phases of 10
    cfgs = [resolve_config({**raw, "seed": s}) for s in (1993, 1994)]
    for cfg, avg in zip(cfgs, (74.0, 75.0)):
        res = _results(cfg, [80.0 - k for k in range(10)], avg, 70.0, 5.0, classes_per_phase=10)
        res["summary"].update(teacher_avg_top1=avg - 1, teacher_last_top1=69.0)
        _write(tmp_path / "runs" / f"s{cfg['seed']}", res)
    none = resolve_config({**raw, "compression": "none", "seed": 1993})
    _write(tmp_path / "runs" / "none", _results(none, [80.0 - k for k in range(10)], 72.0, 65.0, 5.0,
                                                classes_per_phase=10))
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "runs"), "--output", str(out)]) == 0
    capsys.readouterr()
    rows = {r["configuration"]: r for r in csv.DictReader(open(out / "report.csv"))}
    assert rows["compression=cim"]["published avg (Δ)"] == "74.85 (-0.35)"    # SPEC §5: FOSTER + CIM, N=10
    assert rows["compression=cim"]["teacher avg"] == "73.50 ± 0.71"
    assert rows["compression=none"]["published avg (Δ)"] == "72.72 (-0.72)"   # SPEC §5: FOSTER, N=10
    assert "SPEC §5 LFS N=10" in (out / "report.md").read_text()


def test_no_results_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_foster_student_columns_when_the_teacher_is_deployed(tmp_path, capsys):
    raw, _ = load_config_file("cim-food101")
    cfg = resolve_config({**raw, "seed": 1993})
    res = _results(cfg, [80.0 - k for k in range(10)], 74.0, 70.0, 5.0, classes_per_phase=10)
    res["summary"].update(student_avg_top1=71.0, student_last_top1=66.0, cnn_forgetting_pycil=6.0)
    _write(tmp_path / "runs" / "s1993", res)
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "runs"), "--output", str(out)]) == 0
    capsys.readouterr()
    row = next(csv.DictReader(open(out / "report.csv")))
    assert row["student avg"] == "71.00" and row["student last"] == "66.00"
    assert row["CNN forgetting (PyCIL)"] == "6.00" and "teacher avg" not in row
