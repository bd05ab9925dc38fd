"""exps/sweep.py: a grid of main.py subprocesses that skips finished runs, resumes stopped ones,
never runs one run twice at once, and refuses a bad spec (or reports missing data) before running."""
from __future__ import annotations

import json
import os
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
    real_launch, sweep.launch = sweep.launch, no_run
    try:
        code, out, _ = _sweep(capsys, spec, "--output", root)
    finally:
        sweep.launch = real_launch
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

    held = sweep.sweep_lock(root / "memory_size=100/seed=2")
    held.acquire()
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


class FakeChild:
    """Stands for a main.py subprocess that has already exited with ``code``."""

    def __init__(self, code=0):
        self.pid, self.returncode = -1, code

    def wait(self):
        return self.returncode

    def poll(self):
        return self.returncode


def test_jobs_pin_devices_round_robin(tmp_path, capsys, monkeypatch):
    seen = []

    def fake_launch(cmd, log, env):
        seen.append((env.get("CUDA_VISIBLE_DEVICES"), cmd))
        return FakeChild(0)

    monkeypatch.setattr(sweep, "launch", fake_launch)
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


# ---- bad input: refused before anything runs (exit 2, one line, nothing written) ------------------
def _refused(capsys, spec, root, *extra):
    """Run the sweep (with ``--dry-run`` and without): exit 2, one error line, no traceback, nothing written."""
    errs = []
    for dry in (["--dry-run"], []):
        code, out, err = _sweep(capsys, spec, "--output", root, *extra, *dry)
        assert code == 2, (out, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        errs.append(err)
    assert not Path(root).exists() or Path(root).is_file()
    return errs[0]


def _no_launch(*a, **k):
    pytest.fail("a run was started")


def test_each_runs_config_hash_is_computed_once(tmp_path, monkeypatch):
    """expand (its check for a run twice) and sweep.json share the hash each Run holds."""
    import utils.config

    calls = []
    real = utils.config.config_hash
    monkeypatch.setattr(utils.config, "config_hash", lambda cfg: calls.append(1) or real(cfg))
    spec = _spec(tmp_path, {"memory_size": [40, 60], "seed": [1, 2]})
    runs = sweep.expand(sweep.load_spec(spec), spec, tmp_path / "root")
    sweep.write_sweep_json(tmp_path / "root", sweep.load_spec(spec), spec, runs)
    assert len(calls) == len(runs) == 4
    saved = json.loads((tmp_path / "root" / "sweep.json").read_text())["runs"]
    assert [r["config_hash"] for r in saved] == [real(run.cfg) for run in runs]
    assert len({r["config_hash"] for r in saved}) == 2   # the seed is not part of the hash


def _finished(run, phases: int) -> None:
    """A results.json in ``run``'s folder as a run of its config leaves it after ``phases`` phases."""
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "results.json").write_text(json.dumps({"config": run.cfg, "summary": {}, "phases": [
        {"classes": [2 * k, 2 * k + 2], "memory": {"exemplars": 0}} for k in range(phases)]}))


def test_a_run_written_by_another_sweep_meanwhile_is_skipped_or_resumed(tmp_path, monkeypatch):
    """The states are read before any run starts; a run another sweep into the same root finished
    by the time this one got its lock was started afresh (no --resume), deleting its results."""
    spec = _spec(tmp_path, {"seed": [1, 2, 3]})
    runs = sweep.expand(sweep.load_spec(spec), spec, tmp_path / "root")
    n = sweep.planned_phases(runs[0].cfg)
    launched = []

    class Done:
        pid = -1

        def wait(self):
            return 0

    monkeypatch.setattr(sweep, "launch", lambda cmd, log, env: launched.append(cmd) or Done())
    said = []
    _finished(runs[0], n)          # finished by another sweep after this one read "missing"
    _finished(runs[1], n - 1)      # started (one phase short) by another sweep meanwhile
    assert sweep.execute(runs[0], "missing", None, said.append, num_phases=n) == "done"
    assert sweep.execute(runs[1], "missing", None, said.append, num_phases=n) == "finished"
    assert sweep.execute(runs[2], "missing", None, said.append, num_phases=n) == "finished"
    assert [cmd[-1] == "--resume" for cmd in launched] == [True, False]
    assert "written by another process meanwhile (done, skipped" in said[0]
    assert len(json.loads((runs[0].folder / "results.json").read_text())["phases"]) == n   # kept
    # a plan that cannot be known (no num_phases): resumed, never started afresh
    assert sweep.execute(runs[0], "missing", None, said.append) == "finished" and launched[-1][-1] == "--resume"


def test_sweep_json_keeps_the_runs_of_an_earlier_spec_in_the_same_root(tmp_path):
    root = tmp_path / "root"
    a = _spec(tmp_path, {"memory_size": [40, 60]})
    sweep.write_sweep_json(root, sweep.load_spec(a), a, sweep.expand(sweep.load_spec(a), a, root))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({**json.loads(a.read_text()), "grid": {"memory_size": [60, 80]}}))
    sweep.write_sweep_json(root, sweep.load_spec(b), b, sweep.expand(sweep.load_spec(b), b, root))
    listed = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in listed["runs"]] == ["memory_size=60", "memory_size=80"]   # 40: no folder
    (root / "memory_size=40").mkdir()
    sweep.write_sweep_json(root, sweep.load_spec(a), a, sweep.expand(sweep.load_spec(a), a, root))
    sweep.write_sweep_json(root, sweep.load_spec(b), b, sweep.expand(sweep.load_spec(b), b, root))
    listed = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in listed["runs"]] == ["memory_size=60", "memory_size=80", "memory_size=40"]
    assert listed["spec"]["grid"] == {"memory_size": [60, 80]} and listed["spec_path"] == str(b)


@pytest.mark.parametrize("content", [b'{"runs": [', b"[]", b'{"runs": [5]}', b'{"x": "\xe9"}'])
def test_an_unusable_sweep_json_in_the_root_is_refused_not_replaced(tmp_path, capsys, monkeypatch, content):
    """A sweep.json that cannot be read was silently replaced, dropping the other specs' runs it listed:
    exit 2 naming it (with --dry-run too), nothing run, the file left as it was."""
    spec, run = _one_run(tmp_path)
    (run.folder.parent / "sweep.json").write_bytes(content)
    monkeypatch.setattr(sweep, "launch", _no_launch)
    for dry in (["--dry-run"], []):
        code, out, err = _sweep(capsys, spec, "--output", tmp_path / "root", *dry)
        assert code == 2 and err.startswith(f"error: {tmp_path / 'root' / 'sweep.json'} ") and "Traceback" not in err
        assert "fix it or remove it" in err and err.count("\n") == 1, err
    assert (tmp_path / "root" / "sweep.json").read_bytes() == content
    with pytest.raises(sweep.UserError, match="fix it or remove it"):
        sweep.write_sweep_json(tmp_path / "root", sweep.load_spec(spec), spec, [run])


def test_a_key_outside_the_runs_identity_or_equal_values_are_the_same_run_twice(tmp_path, capsys, monkeypatch):
    """Two runs of one (config hash, seed) would train the same thing twice; a report would count the
    second as another seed. Refused naming both runs and the key."""
    monkeypatch.setattr(sweep, "launch", _no_launch)
    root = tmp_path / "root"
    err = _refused(capsys, _spec(tmp_path, {"threads": [1, 2], "seed": [1]}), root)
    assert "'threads=1/seed=1' and 'threads=2/seed=1'" in err and "same run twice" in err
    assert "threads (1 vs 2) does not change the result" in err
    err = _refused(capsys, _spec(tmp_path, {"num_workers": [0, 2]}), root)
    assert "num_workers (0 vs 2) does not change the result" in err
    err = _refused(capsys, _spec(tmp_path, {"color_jitter": [0, 0.0]}), root)
    assert "'color_jitter=0' and 'color_jitter=0.0'" in err and "color_jitter (0 vs 0.0) resolves to the same value" in err
    err = _refused(capsys, _spec(tmp_path, {"seed": [1]}, variants={"a": {"memory_size": 60}, "b": {}}), root)
    assert "'a/seed=1' and 'b/seed=1'" in err   # the base's memory_size is 60 already
    # A grid key that does change the result, with one key that does not in "set", is fine.
    spec = _spec(tmp_path, {"memory_size": [40, 60], "seed": [1, 2]}, set={"threads": 1})
    assert len(sweep.expand(sweep.load_spec(spec), spec, root)) == 4


@pytest.mark.parametrize("vname", ["", ".", "..", "..."])
def test_a_variant_name_that_is_no_folder_name_is_refused(tmp_path, capsys, vname):
    root = tmp_path / "root"
    err = _refused(capsys, _spec(tmp_path, {"seed": [1]}, variants={vname: {}}), root)
    assert f"variant name {json.dumps(vname)}" in err and "not a usable folder name" in err
    assert not (tmp_path / "seed=1").exists()


def test_every_run_folder_lies_inside_the_root(tmp_path):
    spec = _spec(tmp_path, {"seed": [1]})
    run = sweep.expand(sweep.load_spec(spec), spec, tmp_path / "root")[0]
    sweep.check_inside_root(run, tmp_path / "root")
    for name in ("../seed=1", "/seed=1", "a/../../x", "."):
        escaped = sweep.Run(name, run.base, run.overrides, run.cfg, None, tmp_path / "root" / name)
        with pytest.raises(sweep.ConfigError, match="not inside the sweep root"):
            sweep.check_inside_root(escaped, tmp_path / "root")


def test_spec_that_is_not_text_or_a_folder_is_refused(tmp_path, capsys):
    base = write_config(tmp_path / "base.json", tiny_config(**FAST))
    spec = tmp_path / "latin1.json"
    spec.write_bytes(b'{"base": "' + str(base).encode() + b'", "description": "caf\xe9"}')
    assert "is not UTF-8 text" in _refused(capsys, spec, tmp_path / "root")
    (tmp_path / "adir.json").mkdir()
    assert f"Sweep spec {tmp_path / 'adir.json'} is a folder" in _refused(capsys, tmp_path / "adir.json", tmp_path / "root")


def test_a_folder_name_longer_than_the_file_system_allows_is_refused_by_the_dry_run(tmp_path, capsys):
    long = "x" * 300
    err = _refused(capsys, _spec(tmp_path, {"seed": [1]}, variants={long: {}}), tmp_path / "root")
    assert "give the variant a shorter name" in err and "longer than the file system allows (255 bytes)" in err
    # A grid value that long is refused too (here by the config's own check of the key).
    err = _refused(capsys, _spec(tmp_path, {"prefix": [long]}), tmp_path / "root")
    assert "'prefix'" in err and "at most 240 bytes" in err
    # A name near the limit passes (one name of 255 bytes).
    ok = "y" * 255
    spec = _spec(tmp_path, {"seed": [1]}, variants={ok: {}})
    assert ok in sweep.expand(sweep.load_spec(spec), spec, tmp_path / "root")[0].folder.parts


def test_an_output_folder_name_longer_than_the_file_system_allows_is_refused(tmp_path, capsys, monkeypatch):
    """A --output with a name over 255 bytes ended in an OSError (File name too long) traceback in
    name_max (Python 3.11's Path.exists raises it), with --dry-run too."""
    spec = _spec(tmp_path, {"seed": [1]})
    monkeypatch.setattr(sweep, "launch", _no_launch)
    for root in (tmp_path / ("x" * 300), tmp_path / ("x" * 300) / "sub"):
        for dry in (["--dry-run"], []):
            code, out, err = _sweep(capsys, spec, "--output", root, *dry)
            assert code == 2 and err.startswith("error: --output ") and "Traceback" not in err, err
            assert "is 300 bytes, longer than the file system allows" in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["base.json", "spec.json"]


def test_output_that_is_a_file_is_refused_by_the_dry_run(tmp_path, capsys):
    spec = _spec(tmp_path, {"seed": [1]})
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert f"--output {afile} is a file, not a folder" in _refused(capsys, spec, afile)
    err = _refused(capsys, spec, afile / "sub")
    assert f"--output {afile / 'sub'} lies under {afile}, which is a file" in err
    assert afile.read_text() == "keep"
    root = tmp_path / "root"
    root.mkdir()
    (root / "seed=1").write_text("")   # a file where the run's folder goes
    code, _, err = _sweep(capsys, spec, "--output", root, "--dry-run")
    assert code == 2 and "seed=1 is a file, not a folder; the sweep needs a folder there" in err and "Traceback" not in err
    os.symlink(tmp_path / "gone", tmp_path / "broken")   # it said "is a file" for a broken link too
    assert f"--output {tmp_path / 'broken'} is a broken symbolic link" in _refused(capsys, spec, tmp_path / "broken")
    code, _, err = _sweep(capsys, spec, "--output", "", "--dry-run")   # it used logs/sweeps/<spec> instead
    assert code == 2 and "--output is empty" in err


@pytest.mark.parametrize("devices, needle", [
    ("x,,y", '"x" is not a CUDA device id'), (",", "lists no device"), ("", "lists no device"),
    ("0,,1", "entry 2 is empty"), ("-1", '"-1" is not a CUDA device id'), ("cuda:0", '"cuda:0"'),
    ("GPU-", '"GPU-"')])
def test_bad_devices_are_refused(tmp_path, capsys, monkeypatch, devices, needle):
    monkeypatch.setattr(sweep, "launch", _no_launch)
    spec = _spec(tmp_path, {"seed": [1]})
    err = _refused(capsys, spec, tmp_path / "root", "--devices", devices)
    assert "--devices" in err and needle in err


def test_device_ids_and_gpu_uuids_are_accepted(tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(sweep, "launch", lambda cmd, log, env: seen.append(env["CUDA_VISIBLE_DEVICES"]) or FakeChild(0))
    spec = _spec(tmp_path, {"seed": [1, 2, 3]})
    code, _, err = _sweep(capsys, spec, "--output", tmp_path / "root", "--devices", "1, GPU-5d8e-aa,MIG-1f2e")
    assert code == 0, err
    assert seen == ["1", "1", "1"]   # --jobs 1: one slot, pinned to the first device


def test_a_config_error_of_the_dataset_is_not_reported_as_data_missing(tmp_path, capsys):
    spec = _spec(tmp_path, {"seed": [1]}, set={"dataset": "folder", "data_root": str(tmp_path / "nope")})
    err = _refused(capsys, spec, tmp_path / "root")
    assert "The 'shapes' options only apply to dataset 'shapes'" in err and "data missing" not in err


# ---- state of a run folder -----------------------------------------------------------------------
def _one_run(tmp_path):
    spec = _spec(tmp_path, {"seed": [1]})
    run = sweep.expand(sweep.load_spec(spec), spec, tmp_path / "root")[0]
    run.folder.mkdir(parents=True)
    return spec, run


@pytest.mark.parametrize("content, why", [   # (the wording of utils/results_file.py, shared with report.py)
    (b"[1, 2]", "does not hold a results object (a JSON list)"),
    (b'{"config": {"memory_size": 6', "truncated?)"),
    (b"hello", "is not valid JSON"),
    (b'{"phases": []}', 'has no "config" object'),
    (b'{"config": [1], "phases": []}', 'has no "config" object'),
    (b'{"config": {}, "phases": 3}', 'has no "phases" list'),
    (b'{"x": "\xe9"}', "is not UTF-8 text"),
])
def test_an_unreadable_results_json_has_its_own_state_and_is_left_alone(tmp_path, capsys, monkeypatch, content, why):
    spec, run = _one_run(tmp_path)
    (run.folder / "results.json").write_bytes(content)
    state, detail = sweep.run_state(run, 3)
    assert state == "unreadable" and detail.startswith("results.json ") and why in detail, detail
    assert "delete it or the folder" in detail and "another config" not in detail
    monkeypatch.setattr(sweep, "launch", _no_launch)
    code, out, err = _sweep(capsys, spec, "--output", tmp_path / "root")
    assert code == 1 and "Traceback" not in err
    assert "seed=1: results.json " in out and why in out and "left alone" in out
    assert (run.folder / "results.json").read_bytes() == content


def test_a_results_json_of_another_config_is_still_stale(tmp_path):
    from utils.config import resolve_config

    _, run = _one_run(tmp_path)
    other = resolve_config({**tiny_config(**FAST), "seed": 1, "memory_size": 40})
    phase = {"classes": [0, 2], "memory": {"exemplars": 40}}
    (run.folder / "results.json").write_text(json.dumps({"config": other, "phases": [phase]}))
    assert sweep.run_state(run, 2) == ("stale", "results.json written by another config")
    (run.folder / "results.json").write_text(json.dumps({"config": run.cfg, "phases": [phase]}))
    assert sweep.run_state(run, 2) == ("partial", "1/2 phases")


def test_a_run_whose_main_py_holds_its_run_lock_is_running(tmp_path, capsys, monkeypatch):
    """A main.py left running (its sweep killed) holds the run folder's run.lock: the run is
    "running", not "partial" (a resume would fail on that lock)."""
    spec, run = _one_run(tmp_path)
    (run.folder / "config.json").write_text("{}")   # a started run
    assert sweep.run_state(run, 2)[0] == "partial"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from utils.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
                               "print('held', flush=True); sys.stdin.read()", str(run.folder)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        state, detail = sweep.run_state(run, 2)
        assert state == "running" and f"main.py (pid {holder.pid} on host " in detail and "holds its lock" in detail
        monkeypatch.setattr(sweep, "launch", _no_launch)
        code, out, _ = _sweep(capsys, spec, "--output", tmp_path / "root")
        assert code == 1 and f"seed=1: main.py (pid {holder.pid} on host " in out and "skipped" in out
    finally:
        holder.communicate("", timeout=30)
    assert sweep.run_state(run, 2)[0] == "partial"   # released (the lock file is removed)
    (run.folder / "run.lock").write_text("999999999 elsewhere\n")   # left by a killed run: free, main.py takes it over
    assert sweep.run_state(run, 2)[0] == "partial"


def test_dry_run_leaves_sweep_locks_untouched(tmp_path, capsys):
    import os

    spec, run = _one_run(tmp_path)
    lock = run.folder / ".sweep.lock"
    lock.write_text("12345\n")
    os.utime(lock, (1_000_000, 1_000_000))
    code, out, _ = _sweep(capsys, spec, "--output", tmp_path / "root", "--dry-run")
    assert code == 0 and "seed=1  missing" in out
    assert lock.read_text() == "12345\n" and lock.stat().st_mtime == 1_000_000
    held = sweep.sweep_lock(run.folder)
    held.acquire()
    try:
        assert sweep.is_locked(run.folder) and lock.read_text().split()[0] == str(os.getpid())
    finally:
        held.release()
    assert not sweep.is_locked(run.folder)


# ---- stopping the sweep --------------------------------------------------------------------------
# A stand-in for main.py: on SIGINT it takes a moment to save (a second signal then must not kill it), exits 130.
SLEEPER = ("import sys, time\nprint('ready', flush=True)\ntry:\n    time.sleep(10)\n"
           "except KeyboardInterrupt:\n    print('got SIGINT', flush=True)\n    time.sleep(0.5)\n    sys.exit(130)\n")


def test_sigint_stops_the_running_child_and_starts_no_more(tmp_path, capsys, monkeypatch):
    """Ctrl-C: the running child gets one SIGINT (its own process group, so a terminal's Ctrl-C is
    not delivered twice), the next run is not started, exit 130 with one line and no traceback."""
    import os
    import signal
    import threading
    import time

    monkeypatch.setattr(sweep, "command", lambda run, resume: [sys.executable, "-c", SLEEPER])
    monkeypatch.setattr(sweep.Children, "ESCALATE_AFTER_S", 30.0)   # a loaded machine may delay the copy
    spec = _spec(tmp_path, {"seed": [1, 2]})
    log = tmp_path / "root" / "seed=1" / "sweep_output.txt"

    def interrupt():
        for _ in range(300):
            if log.exists() and "ready" in log.read_text():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)   # a second copy at once (timeout, a terminal) does not escalate

    class StrayInterrupt(Exception):
        pass

    def stray(signum, frame):   # a SIGINT the sweep does not handle fails this test, not the session
        raise StrayInterrupt

    before = signal.signal(signal.SIGINT, stray)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        code, out, err = _sweep(capsys, spec, "--output", tmp_path / "root")
        assert signal.getsignal(signal.SIGINT) is stray   # the sweep's handler is gone
    finally:
        signal.signal(signal.SIGINT, before)
    assert code == 130 and "Traceback" not in err
    assert err.strip() == ("interrupted (SIGINT): 1 running run(s) stopped (their finished phases are saved), "
                           "1 not started; rerun the same command to resume.")
    assert "seed=1: interrupted (exit 130)" in out and "seed=2" not in out
    assert log.read_text().splitlines() == ["ready", "got SIGINT"]
    assert not (tmp_path / "root" / "seed=2").exists()


def test_sigterm_stops_a_real_sweep_and_its_training(tmp_path):
    """SIGTERM to the sweep (not its process group): its main.py child is stopped too (no orphan
    training on), exit 130 with an "interrupted" line; the run is then partial and resumable."""
    import os
    import signal
    import time
    from utils.run_lock import pid_alive

    base = write_config(tmp_path / "base.json", tiny_config(init_epochs=1, epochs=200))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": str(base), "grid": {"seed": [1]}}))
    root = tmp_path / "root"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "exps" / "sweep.py"), str(spec), "--output", str(root)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        results, lock = root / "seed=1" / "results.json", root / "seed=1" / "run.lock"
        deadline = time.time() + 60
        while not results.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert results.exists(), proc.communicate(timeout=30)
        child = int(lock.read_text().split()[0])
        assert pid_alive(child)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if child is not None and pid_alive(child):   # a failed test leaves no training behind
            os.killpg(child, signal.SIGKILL)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and err.startswith("interrupted (SIGTERM): 1 running run(s) stopped")
    assert not pid_alive(child) and not lock.exists()   # main.py stopped cleanly, its lock released
    assert "seed=1: interrupted (exit 130)" in out
    run = sweep.expand(sweep.load_spec(spec), spec, root)[0]
    assert sweep.run_state(run, 3) == ("partial", "1/3 phases")


def test_a_run_ended_by_sigterm_is_interrupted_not_failed(tmp_path, capsys, monkeypatch):
    """main.py exits 143 after SIGTERM (a scheduler's preemption) with its phases saved: a rerun
    resumes it, so the sweep says interrupted, not FAILED."""
    monkeypatch.setattr(sweep, "command", lambda run, resume: [sys.executable, "-c", "import sys; sys.exit(143)"])
    spec = _spec(tmp_path, {"seed": [1]})
    code, out, _ = _sweep(capsys, spec, "--output", tmp_path / "root")
    assert code == 1 and "seed=1: interrupted (exit 143)" in out and "FAILED" not in out


def test_a_variant_changes_only_the_block_fields_it_names(tmp_path):
    """A spec's set, a variant and a grid may name block fields (as a block or as block.field); the
    base config's other fields of the block stay, in the sweep's resolution and in the run's."""
    base = write_config(tmp_path / "base.json", tiny_config(**FAST, shapes={"num_classes": 6, "train_per_class": 40,
                                                                            "test_per_class": 20}))
    spec = {"base": str(base), "set": {"shapes.train_per_class": 30},
            "variants": {"few-test": {"shapes": {"test_per_class": 5}}}, "grid": {"shapes.num_classes": [4, 6]}}
    runs = sweep.expand(spec, tmp_path / "spec.json", tmp_path / "root")
    assert [r.name for r in runs] == ["few-test/shapes.num_classes=4", "few-test/shapes.num_classes=6"]
    assert [r.cfg["shapes"] for r in runs] == [{"num_classes": n, "train_per_class": 30, "test_per_class": 5}
                                               for n in (4, 6)]
    cmd = sweep.command(runs[0], resume=False)   # main.py gets the block's named fields, and merges them alike
    assert [json.loads(a[len("shapes="):]) for a in cmd if a.startswith("shapes=")] == [
        {"train_per_class": 30, "test_per_class": 5, "num_classes": 4}]
