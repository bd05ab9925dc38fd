"""exps/report.py on hand-made results.json files: known answers for mean ± std over seeds, the
row labels, the published comparison, and the files it writes."""
from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest

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
    assert "CIM paper LFS N=10" in (out / "report.md").read_text()


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


# ---- bad-input sweep findings (FINDINGS.md #1, #4, #5, #6, #9, #10, #11) --------------------------------
def _tiny_results(seed=1, top1=(60.0, 50.0, 40.0), plan_known=True, **overrides) -> dict:
    """A results dict of a tiny config (6 classes, 3 planned phases) with ``len(top1)`` phases done;
    with ``plan_known`` it holds the class order a run writes (so the plan is known)."""
    cfg = resolve_config(tiny_config(seed=seed, **overrides))
    res = _results(cfg, list(top1), sum(top1) / len(top1), top1[-1], 5.0)
    if plan_known:
        res["class_order"] = list(range(6))
    return res


def _sweep(root: Path, runs: dict, spec_name="myspec", grid=None) -> Path:
    """A sweep root as exps/sweep.py leaves it: ``runs`` maps a run name to (variant, results)."""
    for name, (_, res) in runs.items():
        _write(root / name, res)
    (root / "sweep.json").write_text(json.dumps({
        "spec": {"base": "tiny.json", "grid": grid or {"seed": [1, 2]}}, "spec_path": f"/somewhere/{spec_name}.json",
        "runs": [{"name": name, "variant": variant} for name, (variant, _) in runs.items()]}))
    return root


def _report_rows(args, out, capsys) -> dict:
    assert report.main([str(a) for a in args] + ["--output", str(out)]) == 0
    capsys.readouterr()
    return {r["configuration"]: r for r in csv.DictReader(open(out / "report.csv"))}


def _table(args, notes=None) -> dict:
    """The report table of ``args`` as {label: {column: cell}}, without writing files or plots."""
    runs, found_notes = report.collect([Path(a) for a in args])
    header, body = report.table(report.group(runs, found_notes if notes is None else notes))
    return {line[0]: dict(zip(header, line)) for line in body}


def test_a_run_folder_reached_twice_counts_once(tmp_path, capsys):
    root = _sweep(tmp_path / "sw", {"seed=1": (None, _tiny_results(1, (60.0, 50.0, 40.0))),
                                    "seed=2": (None, _tiny_results(2, (60.0, 52.0, 44.0)))})
    for args in ([root, root], [root, root / "seed=1"], [root / "seed=1", root], [root, tmp_path]):
        rows = _table(args)
        assert [(r["seeds"], r["CNN last"]) for r in rows.values()] == [("2", "42.00 ± 2.83")], args


def test_each_file_is_read_and_each_config_resolved_once(tmp_path, capsys, monkeypatch):
    """A run reached twice is read once, its sweep's sweep.json once, and each saved config is
    resolved with today's schema once (the row key, the plan and the label keys all need it)."""
    import utils.config
    import utils.results_file

    root = _sweep(tmp_path / "sw", {f"seed={s}": (None, _tiny_results(s, (60.0, 50.0, 40.0))) for s in (1, 2, 3)},
                  grid={"memory_size": [60]})
    calls = {"results": [], "sweep": 0, "resolve": 0}
    read_results, read_json_file, resolve = report.read_results, report.read_json_file, \
        utils.config.resolve_saved_config

    def count_results(path):
        calls["results"].append(Path(path).resolve())
        return read_results(path)

    def count_json(path):
        calls["sweep"] += Path(path).name == "sweep.json"
        return read_json_file(path)

    def count_resolve(cfg):
        calls["resolve"] += 1
        return resolve(cfg)

    monkeypatch.setattr(report, "read_results", count_results)
    monkeypatch.setattr(report, "read_json_file", count_json)
    monkeypatch.setattr(utils.results_file, "read_json_file", count_json)   # under read_sweep_json
    monkeypatch.setattr(utils.config, "resolve_saved_config", count_resolve)
    rows = _report_rows([root, root / "seed=1", tmp_path], tmp_path / "rep", capsys)
    assert [r["seeds"] for r in rows.values()] == ["3"]
    assert sorted(calls["results"]) == sorted((root / f"seed={s}" / "results.json").resolve() for s in (1, 2, 3))
    assert calls["sweep"] == 1 and calls["resolve"] == 3


def test_a_copied_run_is_not_a_second_seed(tmp_path, capsys):
    root = tmp_path / "copies"
    _write(root / "run1", _tiny_results(1, (60.0, 50.0, 40.0)))
    _write(root / "run1_backup", _tiny_results(1, (60.0, 50.0, 30.0)))    # same config and seed
    _write(root / "run2", _tiny_results(2, (60.0, 52.0, 44.0)))
    rows = _report_rows([root], tmp_path / "rep", capsys)
    (row,) = rows.values()
    assert row["seeds"] == "2" and row["CNN last"] == "42.00 ± 2.83"        # run1 kept (first in path order)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"- {root / 'run1_backup'}: same configuration and seed 1 as {root / 'run1'}" in md


def test_runs_short_of_their_plan_are_left_out(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (1, 2):   # memory 60: both seeds stopped after phase 0 of 3
        _write(root / f"m60-s{seed}", _tiny_results(seed, (50.0,)))
        _write(root / f"m40-s{seed}", _tiny_results(seed, (60.0, 50.0, 40.0), memory_size=40))
    rows = _report_rows([root], tmp_path / "rep", capsys)
    assert [(r["seeds"], r["phases"]) for r in rows.values()] == [("2", "3")]     # the memory 40 row only
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"- {root / 'm60-s1'}: 1 of 3 phases (partial, left out)" in md
    # nothing finished: no table of phase-0 numbers, exit 2 with the notes
    assert report.main([str(root / "m60-s1"), str(root / "m60-s2"), "--output", str(tmp_path / "rep2")]) == 2
    err = capsys.readouterr().err
    assert "no finished run" in err and "1 of 3 phases (partial, left out)" in err
    # plan unknown (no class order): as before, a lone 1-phase run stands as its row
    _write(tmp_path / "old" / "s1", _tiny_results(1, (50.0,), plan_known=False))
    assert _table([tmp_path / "old"])["s1"]["phases"] == "1"


def test_published_numbers_need_the_backbone_and_memory():
    raw, _ = load_config_file("icarl-cifar100")                 # ResNet-32, 2000 exemplars, B0 10 x 10

    def source(name_or_raw, phases=10, **over):
        base = load_config_file(name_or_raw)[0] if isinstance(name_or_raw, str) else name_or_raw
        ref = report.published_for(resolve_config({**base, **over}), phases)
        return ref and ref["source"]

    assert source(raw) == "PyCIL CIFAR-100 figure B0 Inc10 (±0.5)"
    assert source(raw, epochs=1) == source(raw)                                  # epochs are not compared
    assert source(raw, fixed_memory=True, memory_per_class=20) == source(raw)    # 20 x 100 classes = 2000
    assert source(raw, convnet_type="resnet18") is None
    assert source(raw, fixed_memory=True, memory_per_class=5) is None           # 500 exemplars
    assert source(raw, memory_size=1000) is None
    assert source("cim-food101") == "CIM paper LFS N=10"                            # FOSTER N=10: 2020 (SPEC §3.3)
    assert source("cim-food101", memory_size=200) is None
    assert source("cim-food101", fixed_memory=True, memory_per_class=1) is None
    assert source("cim-food101", convnet_type="resnet32") is None
    assert source("cim-imagenet1000", memory_size=5000) == "CIM paper ImageNet-1000 5k"
    assert source("cim-imagenet1000", memory_size=6000) is None


BAD_RESULTS = {
    "truncated": lambda good: json.dumps(good)[:300].encode(),
    "not_json": lambda good: b"hello\n",
    "not_utf8": lambda good: b'{"x": "\xe9"}',
    "a_list": lambda good: b"[1, 2]",
    "no_config": lambda good: json.dumps({k: v for k, v in good.items() if k != "config"}).encode(),
    "no_phases": lambda good: json.dumps({k: v for k, v in good.items() if k != "phases"}).encode(),
}


def _edited(edit):
    """A BAD_RESULTS entry: the good results with ``edit(results)`` applied, as JSON bytes."""
    def make(good):
        edit(good)
        return json.dumps(good).encode()
    return make


# Hand-edited values of the right shape but the wrong type: each crashed the report (a TypeError,
# ValueError, KeyError or ZeroDivisionError in a sum or a plot, after part of the report was written).
BAD_RESULTS.update({
    "seed_list": _edited(lambda r: r["config"].update(seed=[1, 2])),
    "classes_str": _edited(lambda r: r["phases"][-1].update(classes=["a", "b"])),
    "classes_empty": _edited(lambda r: r["phases"][-1].update(classes=[0, 0])),
    "exemplars_str": _edited(lambda r: r["phases"][-1]["memory"].update(exemplars="x")),
    "bytes_str": _edited(lambda r: r["phases"][-1]["memory"].update(bytes="x")),
    "seconds_str": _edited(lambda r: r["phases"][0].update(seconds="x")),
    "cnn_without_top1": _edited(lambda r: r["phases"][0].update(cnn={"top5": 1})),
    "summary_str": _edited(lambda r: r["summary"].update(cnn_avg_top1="abc")),
    "matrix_ragged": _edited(lambda r: r["summary"].update(cnn_accuracy_matrix=[[1], [2], [3]])),
    "class_order_str": _edited(lambda r: r.update(class_order="x")),
    # Python's json reads Infinity / NaN (which no run writes); they were reported as inf / nan, and a
    # negative "seconds" as a negative time.
    "top1_infinity": _edited(lambda r: r["phases"][0].update(cnn={"top1": float("inf")})),
    "top1_nan": _edited(lambda r: r["phases"][-1].update(cnn={"top1": float("nan")})),
    "seconds_negative": _edited(lambda r: r["phases"][0].update(seconds=-1e308)),
    "summary_nan": _edited(lambda r: r["summary"].update(cnn_avg_top1=float("nan"))),
    "matrix_infinity": _edited(lambda r: r["summary"].update(
        cnn_accuracy_matrix=[[50.0], [50.0, float("-inf")], [50.0] * 3])),
})


@pytest.mark.parametrize("kind", sorted(BAD_RESULTS))
def test_an_unusable_results_json_given_directly_is_exit_2(tmp_path, capsys, kind):
    (tmp_path / kind).mkdir()
    (tmp_path / kind / "results.json").write_bytes(BAD_RESULTS[kind](_tiny_results()))
    assert report.main([str(tmp_path / kind), "--output", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / kind / 'results.json'} ")


def test_an_unusable_results_json_found_in_a_folder_is_left_out(tmp_path, capsys):
    root = tmp_path / "runs"
    _write(root / "good", _tiny_results())
    for kind, content in BAD_RESULTS.items():
        (root / kind).mkdir()
        (root / kind / "results.json").write_bytes(content(_tiny_results()))
    broken_sweep = root / "sweep"                   # a sweep whose run list names a broken results.json
    _sweep(broken_sweep, {"seed=1": (None, _tiny_results())})
    (broken_sweep / "seed=1" / "results.json").write_text("[")
    assert report.main([str(root), "--output", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    left_out = [line for line in (tmp_path / "rep" / "report.md").read_text().splitlines() if line.startswith("- ")]
    assert len(left_out) == len(BAD_RESULTS) + 1
    assert all(str(root) in line and "results.json" in line and line.endswith("(left out)") for line in left_out)
    assert report.main([str(broken_sweep), "--output", str(tmp_path / "rep2")]) == 2    # its only run: nothing
    assert "is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("content", ['{"spec": {', '{"spec": {}}', "[]", '{"runs": [5]}'])
def test_an_unusable_sweep_json_is_exit_2(tmp_path, capsys, content):
    root = _sweep(tmp_path / "sw", {"seed=1": (None, _tiny_results())})
    (root / "sweep.json").write_text(content)
    assert report.main([str(root), "--output", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {root / 'sweep.json'} ")
    # a run folder below it, given itself, still reports (the sweep.json only orders and names rows)
    assert len(_table([root / "seed=1"])) == 1


def test_an_unusable_output_folder_is_exit_2(tmp_path, capsys):
    run = _write(tmp_path / "run", _tiny_results())
    (tmp_path / "afile").write_text("x")
    for out, says in ((tmp_path / "afile", "is a file, not a folder"),
                      (tmp_path / "afile" / "sub", f"cannot be created: {tmp_path / 'afile'} is a file")):
        assert report.main([str(run), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(out) in err and says in err


def test_odd_folder_names_and_paths_are_reported_not_crashed_on(tmp_path, capsys):
    """A non-UTF-8 folder name crashed report.md's writing; a sweep.json run name longer than the
    file system allows crashed the search (ENAMETOOLONG); names with a newline, or outside the
    sweep, were taken as they were; a results.json that is a folder was 'no results.json found'."""
    import os

    root = tmp_path / "odd"
    _write(Path(os.fsdecode(bytes(root) + b"/good_\xff")), _tiny_results())
    (root / "bad" / "results.json").mkdir(parents=True)
    sw = _sweep(tmp_path / "sw", {"seed=1": (None, _tiny_results())})
    listed = json.loads((sw / "sweep.json").read_text())
    listed["runs"] += [{"name": "x" * 300}, {"name": "../odd"}, {"name": "/abs"}, {"name": "a\nb"}]
    (sw / "sweep.json").write_text(json.dumps(listed))
    assert report.main([str(root), str(sw), "--output", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    assert "good_\\udcff" in out and "\n- " + str(root / "bad" / "results.json") + " is a folder, not a file" in md
    assert md.count("is not a folder inside the sweep (left out)") == 2 and "a\\nb" in md
    assert f"{sw / ('x' * 300)}: no results.json yet (left out)" in md
    # a results.json or sweep.json named directly stands for its folder
    assert len(_table([sw / "seed=1" / "results.json"])) == len(_table([sw / "sweep.json"])) == 1
    assert report.main([str(root / "bad")]) == 2
    assert f"{root / 'bad' / 'results.json'} is a folder, not a file" in capsys.readouterr().err
    assert report.main([str(sw), "--output", ""]) == 2 and "--output is empty" in capsys.readouterr().err


def test_null_accuracies_of_a_task_without_test_images_are_reported(tmp_path, capsys):
    """The trainer writes a null top-1 for a phase or task without test images; the matrix plot
    divided None by an int after report.md was written."""
    res = _tiny_results(1)
    res["phases"][0]["cnn"]["top1"] = None
    res["summary"]["cnn_accuracy_matrix"] = [[None], [None, 50.0], [None, 45.0, 35.0]]
    res["summary"]["cnn_forgetting"] = None
    run_dir = _write(tmp_path / "run", res)
    assert report.main([str(run_dir), "--output", str(tmp_path / "rep"), "--tensorboard"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png"))[0].startswith("accuracy_curve")
    assert len(list((tmp_path / "rep").glob("accuracy_matrix_*.png"))) == 1


def test_a_row_whose_runs_ran_on_several_code_versions_says_so(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed, code in ((1, "aaaa"), (2, "bbbb+dirty")):
        res = _tiny_results(seed)
        for p in res["phases"]:
            p["code"] = code
        _write(root / f"s{seed}", res)
    _report_rows([root], tmp_path / "rep", capsys)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "more than one version of the code" in md and "aaaa, bbbb+dirty" in md
    _report_rows([root / "s1"], tmp_path / "rep1", capsys)     # one version: nothing to say
    assert "version of the code" not in (tmp_path / "rep1" / "report.md").read_text()


def test_a_run_that_finished_its_known_plan_stays_beside_a_longer_one(tmp_path, capsys):
    """The 'longest run of the row' rule is for runs whose plan is unknown: a run that finished
    its own plan was left out as partial beside a run of the same configuration with more phases."""
    root = tmp_path / "runs"
    _write(root / "s1", _tiny_results(1, (60.0, 50.0, 40.0)))                      # 3 of 3 phases
    longer = _tiny_results(2, (60.0, 50.0, 40.0, 30.0))
    longer["class_order"] = list(range(8))                                           # 8 classes: 4 phases
    _write(root / "s2", longer)
    notes = []
    (row,) = report.group(report.collect([root])[0], notes)
    assert sorted(r.folder.name for r in row.runs) == ["s1", "s2"] and notes == []


def test_a_missing_path_says_it_does_not_exist(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: does not exist" in capsys.readouterr().err


def test_matrix_file_names_are_distinct(tmp_path, capsys):
    long = "longvariantname" * 9           # two labels that agree in their first 120 characters
    root = _sweep(tmp_path / "lv", {f"{long}_a/seed=1": (f"{long}_a", _tiny_results()),
                                    f"{long}_b/seed=1": (f"{long}_b", _tiny_results(memory_size=30))})
    rows = _report_rows([root], tmp_path / "rep", capsys)
    assert len(rows) == 2
    assert len(list((tmp_path / "rep").glob("accuracy_matrix_*.png"))) == 2
    assert report.unique_names(["a b", "a?b", "a_b", "x" * 130, "x" * 125]) == [
        "a_b", "a_b_2", "a_b_3", "x" * 120, "x" * 120 + "_2"]


def test_row_labels_use_the_keys_every_row_has(tmp_path, capsys):
    runs = {f"{m}/seed={s}": (m, _tiny_results(s, model_name=m)) for m in ("icarl", "lucir") for s in (1, 2)}
    rows = _table([_sweep(tmp_path / "var", runs)])
    assert set(rows) == {"icarl, model_name=icarl, weight_decay=0.0002", "lucir, model_name=lucir, weight_decay=0.0005"}
    # memory_per_class varies but only takes effect with fixed_memory: shown only in that row
    root = tmp_path / "mem"
    _write(root / "a", _tiny_results(1))
    _write(root / "b", _tiny_results(1, fixed_memory=True, memory_per_class=5))
    rows = _table([root])
    assert set(rows) == {"fixed_memory=false", "fixed_memory=true, memory_per_class=5"}


def test_a_one_configuration_row_is_not_named_by_a_seed(tmp_path, capsys):
    root = _sweep(tmp_path / "SEEDS", {f"seed={s}": (None, _tiny_results(s)) for s in (1, 2)}, spec_name="seeds")
    assert list(_report_rows([root], tmp_path / "rep", capsys)) == ["seeds"]
    assert (tmp_path / "rep" / "accuracy_matrix_seeds.png").is_file()
    plain = tmp_path / "plain"                    # no sweep, no prefix: the folder holding the seeds
    for s in (1, 2):
        _write(plain / f"s{s}", _tiny_results(s))
    assert list(_table([plain])) == ["plain"]
    _write(tmp_path / "pre" / "s1", _tiny_results(1, prefix="mine"))
    assert list(_table([tmp_path / "pre"])) == ["mine"]


def test_long_labels_do_not_squeeze_the_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [report.RunResult(tmp_path / f"r{i}", _tiny_results(1, memory_size=20 + 10 * i), f"variant{i}-" + "x" * 150)
            for i in range(4)]
    rows = report.group(runs)
    assert all(len(r.label) > 150 for r in rows)
    curve, matrix, memory = (report.accuracy_curve_figure(rows), report.matrix_figure(rows[0]),
                             report.memory_figure(rows))
    assert curve.axes[0].get_position().width > 0.75                 # the legend sits below the axes
    assert matrix.axes[0].get_position().height > 0.7                # the wrapped title sits above it
    assert all(ax.get_position().width > 0.35 for ax in memory.axes)
    legend = curve.axes[0].get_legend()
    assert all(max(map(len, t.get_text().split("\n"))) <= 110 for t in legend.get_texts())   # wrapped
    for fig in (curve, matrix, memory):
        plt.close(fig)
