"""exps/sweep.py: a grid of main.py subprocesses that skips finished runs, resumes stopped ones,
never runs one run twice at once, and refuses a bad spec (or reports missing data) before running."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_results, run, tiny_config, write_config

sys.path.insert(0, str(REPO / "exps"))
import sweep  # noqa: E402

# Two phases of one epoch each: a run is a few seconds plus the subprocess's start.
FAST = {"num_phases": 2, "init_epochs": 1, "epochs": 1}


def _spec(tmp_path, grid, **extra) -> Path:
    base = write_config(tmp_path / "base.json", tiny_config(**FAST))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"base": str(base), "grid": grid, **extra}))
    return path


def _sweep(capsys, *argv):
    code = sweep.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sweep_runs_skips_resumes_and_locks(tmp_path, capsys):
    root = tmp_path / "sweep"
    spec = _spec(tmp_path, {"memory_size": [40, 60], "seed": [1, 2]})
    names = ["memory_size=40/seed=1", "memory_size=40/seed=2", "memory_size=60/seed=1", "memory_size=60/seed=2"]

    code, out, _ = _sweep(capsys, spec, "--output", root, "--dry-run")
    assert code == 0
    for name in names:
        assert f"{name}  missing" in out
    assert not root.exists()   # a dry run writes nothing

    code, out, _ = _sweep(capsys, spec, "--output", root)
    assert code == 0, out
    for name in names:
        results = read_results(root / name)
        assert len(results["phases"]) == 2
        assert results["config"]["memory_size"] == int(name.split("=")[1].split("/")[0])
        assert results["config"]["seed"] == int(name[-1])
    listed = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in listed["runs"]] == names and listed["spec"]["grid"]["seed"] == [1, 2]

    # Second invocation: everything is done, nothing runs.
    def no_run(*a, **k):
        pytest.fail("a finished run was run again")
    real_run, sweep.subprocess.run = sweep.subprocess.run, no_run
    try:
        code, out, _ = _sweep(capsys, spec, "--output", root)
    finally:
        sweep.subprocess.run = real_run
    assert code == 0
    assert out.count("done, skipped") == 4 and "0 run, 4 already done" in out

    # A stopped run (a new grid point, stopped after phase 0 as an interrupted run would be) is
    # resumed from its checkpoint; a run locked by another sweep is left alone.
    spec = _spec(tmp_path, {"memory_size": [40, 60, 80, 100], "seed": [1, 2]})
    runs = {r.name: r for r in sweep.expand(sweep.load_spec(spec), spec, root)}
    stopped = runs["memory_size=80/seed=1"]
    run(stopped.cfg, stopped.folder, stop_after_phase=0)
    code, out, _ = _sweep(capsys, spec, "--output", root, "--dry-run")
    assert "memory_size=80/seed=1   partial  1/2 phases" in out
    assert "memory_size=40/seed=1   done     2/2 phases" in out
    assert "4 done, 1 partial, 3 missing" in out

    held = sweep.RunLock(root / "memory_size=100/seed=2")
    assert held.acquire()
    try:
        code, out, _ = _sweep(capsys, spec, "--output", root, "--dry-run")
        assert "memory_size=100/seed=2  running  locked by another sweep" in out
        code, out, _ = _sweep(capsys, spec, "--output", root)
    finally:
        held.release()
    assert code == 1   # the locked run is not finished
    assert "memory_size=100/seed=2: locked by another sweep, skipped" in out
    assert out.count("done, skipped") == 4
    assert "memory_size=80/seed=1: resume" in out
    assert "resume: restored phase 0" in (stopped.folder / "sweep_output.txt").read_text()
    assert [p["phase"] for p in read_results(stopped.folder)["phases"]] == [0, 1]
    assert len(read_results(root / "memory_size=100/seed=1")["phases"]) == 2
    assert not (root / "memory_size=100/seed=2" / "results.json").exists()


def test_spec_errors_are_refused_before_running(tmp_path, capsys):
    def refused(spec_obj, *needles):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(spec_obj))
        code, out, err = _sweep(capsys, path, "--output", tmp_path / "root")
        assert code == 2, (out, err)
        assert err.startswith("error: ") and "Traceback" not in err
        for needle in needles:
            assert needle in err, (needle, err)
        assert not (tmp_path / "root").exists()

    base = str(write_config(tmp_path / "base.json", tiny_config(**FAST)))
    refused({"base": base, "grid": {"seed": [1]}, "gird": {}}, "unknown top-level key(s) gird")
    refused({"base": base, "grid": {"memory_size": 500}}, "grid key 'memory_size'", "list")
    refused({"base": base, "grid": {"memroy_size": [1, 2]}}, "memroy_size=1", "memroy_size", "did you mean memory_size?")
    refused({"base": base, "set": {"compression": "zip"}}, "'compression'", "allowed")
    refused({"base": "no-such-config"}, "no-such-config")
    refused({"grid": {}}, "'base'")


def test_dry_run_with_missing_data_names_data_root(tmp_path, capsys):
    missing = tmp_path / "no-data"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": "cim-lucir-tinyimagenet50", "set": {"data_root": str(missing)},
                                "grid": {"compression": ["none", "cim"]}}))
    code, out, err = _sweep(capsys, spec, "--output", tmp_path / "root", "--dry-run")
    assert code == 2
    assert "compression=none" in out and "compression=cim" in out   # the runs are still listed
    assert "data_root" in err and str(missing) in err and "Traceback" not in err
    code, out, err = _sweep(capsys, spec, "--output", tmp_path / "root")
    assert code == 2 and "data_root" in err and not (tmp_path / "root").exists()


def test_jobs_pin_devices_round_robin(tmp_path, capsys, monkeypatch):
    seen = []

    def fake_run(cmd, stdout, stderr, env, cwd):
        seen.append((env.get("CUDA_VISIBLE_DEVICES"), cmd))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    spec = _spec(tmp_path, {"seed": [1, 2, 3, 4]})
    code, out, _ = _sweep(capsys, spec, "--output", tmp_path / "root", "--jobs", "2", "--devices", "0,1")
    assert code == 0 and len(seen) == 4
    assert {d for d, _ in seen} <= {"0", "1"}
    cmd = seen[0][1]
    assert cmd[1].endswith("main.py") and "--output" in cmd and "--resume" not in cmd
    assert "seed=1" in cmd or "seed=2" in cmd or "seed=3" in cmd or "seed=4" in cmd


PAPER = sorted((REPO / "exps" / "paper").glob("*.json"))


@pytest.mark.parametrize("spec", PAPER, ids=[p.stem for p in PAPER])
def test_paper_specs_validate(spec, tmp_path, capsys):
    """Every paper spec resolves; without its data on disk the dry run says so (exit 2, data_root)."""
    code, out, err = _sweep(capsys, spec, "--output", tmp_path / "root", "--dry-run")
    assert code in (0, 2), err
    assert "runs under" in out
    if code == 2:
        assert "data_root" in err and "Traceback" not in err
    assert not (tmp_path / "root").exists()


def test_paper_spec_dry_run_in_a_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "exps" / "sweep.py"), str(PAPER[0]), "--dry-run",
                           "--output", str(tmp_path / "root")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode in (0, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    if proc.returncode == 2:
        assert "data_root" in proc.stderr
