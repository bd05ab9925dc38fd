"""The command line end to end: output folders, seed lists, --resume, divergence."""
from __future__ import annotations

import json

import pytest
from pathlib import Path

import main
from conftest import read_results, run, tiny_config, without_seconds, write_config
from utils.config import config_hash, resolve_config

FAST = dict(num_phases=2, init_epochs=1, epochs=1)


def test_default_output_folder_and_one_run_per_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    raw = tiny_config(seed=[1, 2], **FAST)
    write_config(tmp_path / "tiny.json", raw)
    assert main.main(["--config", "tiny", "--device", "cpu"]) == 0
    base = Path("logs") / "icarl" / "shapes" / f"tiny-{config_hash(resolve_config(raw))}"
    assert sorted(p.name for p in (tmp_path / "logs").rglob("seed*")) == ["seed1", "seed2"]
    orders = []
    for seed in (1, 2):
        out = tmp_path / base / f"seed{seed}"
        for name in ("config.json", "results.json", "metrics.jsonl", "log.txt", "checkpoints/phase_0.pt",
                     "checkpoints/phase_1.pt"):
            assert (out / name).is_file(), name
        results = read_results(out)
        assert results["config"]["seed"] == seed
        assert json.loads((out / "config.json").read_text())["seed"] == seed
        assert [p["phase"] for p in results["phases"]] == [0, 1]
        orders.append(results["class_order"])
    assert orders[0] != orders[1]           # the seed also draws the class order


def test_prefix_names_the_folder_and_explicit_output_with_seed_list(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    raw = tiny_config(prefix="myrun", seed=[3, 4])
    write_config(tmp_path / "tiny.json", raw)
    assert main.main(["--config", "tiny.json", "--check"]) == 0
    out = capsys.readouterr().out.replace("\\", "/")
    h = config_hash(resolve_config(raw))
    assert f"output: logs/icarl/shapes/myrun-{h}/seed3" in out
    assert f"output: logs/icarl/shapes/myrun-{h}/seed4" in out
    write_config(tmp_path / "one.json", tiny_config(seed=5))
    assert main.main(["--config", "one", "--check", "--output", "somewhere"]) == 0
    assert "output: somewhere\n" in capsys.readouterr().out.replace("\\", "/")


def test_cli_resume_matches_the_uninterrupted_run(tmp_path, monkeypatch, capsys, tiny_reference):
    _, ref = tiny_reference
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config())
    out = tmp_path / "out"
    run(tiny_config(), out, stop_after_phase=0)            # an interrupted run
    assert main.main(["--config", "tiny", "--output", str(out), "--resume"]) == 0
    assert without_seconds(read_results(out)) == without_seconds(ref)


def test_cli_resume_into_a_folder_of_another_config_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    run(tiny_config(**FAST), out, stop_after_phase=0)
    write_config(tmp_path / "changed.json", tiny_config(**FAST, memory_size=40))
    capsys.readouterr()
    assert main.main(["--config", "changed", "--output", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot resume in") and "memory_size" in err and "Traceback" not in err
    assert len(read_results(out)["phases"]) == 1


def test_cli_diverged_loss_exits_1_and_keeps_earlier_phases(tmp_path, monkeypatch, capsys):
    from models.icarl import ICaRL

    original = ICaRL.loss

    def nan_in_phase_1(self, out, batch):
        loss, parts = original(self, out, batch)
        if "old_logits" in out:      # only with an old model: phase >= 1
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(ICaRL, "loss", nan_in_phase_1)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**FAST))
    out = tmp_path / "out"
    assert main.main(["--config", "tiny", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Training diverged in phase 1, stage 'train', epoch 1" in err
    assert "Traceback" not in err
    results = read_results(out)
    assert [p["phase"] for p in results["phases"]] == [0]
    assert results["phases"][0]["cnn"]["top1"] > 0


# ---- issue 12: Ctrl-C, full disk, unusable output and cache paths -------------------------------

def _no_data_loading(monkeypatch):
    import trainer

    def fail(*a, **k):
        raise AssertionError("the dataset must not be loaded before the paths are checked")

    monkeypatch.setattr(trainer, "load_dataset", fail)


def test_ctrl_c_stops_cleanly_naming_the_saved_phase_and_the_resume_command(tmp_path, monkeypatch, capsys):
    import trainer

    original = trainer.Trainer.run_phase

    def interrupt_in_phase_1(self, phase):
        if phase.index == 1:
            raise KeyboardInterrupt
        return original(self, phase)

    monkeypatch.setattr(trainer.Trainer, "run_phase", interrupt_in_phase_1)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**FAST))
    out = tmp_path / "out"
    assert main.main(["--config", "tiny", "--output", str(out)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert f"interrupted (Ctrl-C): phase 0 is saved in {out}; resume with: " \
           f"python main.py --config tiny --output {out} --resume" in err
    assert not (out / "run.lock").exists()
    monkeypatch.setattr(trainer.Trainer, "run_phase", original)
    assert main.main(["--config", "tiny", "--output", str(out), "--resume"]) == 0
    assert [p["phase"] for p in read_results(out)["phases"]] == [0, 1]


def test_ctrl_c_while_loading_data_keeps_the_saved_phases_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """It said "nothing was saved" even when a --resume was loading the data of a folder with saved
    phases; rerunning without --resume on that word would have removed them."""
    import trainer

    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**FAST))
    out = tmp_path / "out"
    monkeypatch.setattr(trainer.Trainer, "run_phase", _interrupt_in(trainer.Trainer.run_phase, 1))
    assert main.main(["--config", "tiny", "--output", str(out)]) == 130
    capsys.readouterr()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "load_dataset", interrupt)
    assert main.main(["--config", "tiny", "--output", str(out), "--resume"]) == 130
    err = capsys.readouterr().err
    assert "nothing was saved" not in err and "Traceback" not in err
    assert ("interrupted (Ctrl-C) before training started; the phases saved earlier stay saved; continue with: "
            f"python main.py --config tiny --output {out} --resume") in err
    assert (out / "checkpoints" / "phase_0.pt").exists()


def _interrupt_in(run_phase, index):
    def run(self, phase):
        if phase.index == index:
            raise KeyboardInterrupt
        return run_phase(self, phase)
    return run


def test_a_full_disk_exits_2_naming_the_file(tmp_path, monkeypatch, capsys):
    import errno

    import utils.io

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.io.torch, "save", full)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**FAST))
    out = tmp_path / "out"
    assert main.main(["--config", "tiny", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"The disk is full: could not write {out / 'checkpoints' / 'phase_0.pt'}" in err
    assert not list(out.rglob("*.tmp")) and not (out / "run.lock").exists()


@pytest.mark.parametrize("case", ["existing file", "under a file", "read-only"])
def test_unusable_output_folder_exits_2_before_loading_data(tmp_path, monkeypatch, capsys, case):
    import errno
    import tempfile

    _no_data_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**FAST))
    (tmp_path / "afile").write_text("x")
    out = {"existing file": tmp_path / "afile", "under a file": tmp_path / "afile" / "run",
           "read-only": tmp_path / "ro" / "run"}[case]
    if case == "read-only":
        real = tempfile.mkstemp

        def read_only(*a, dir=None, **k):
            if str(dir).startswith(str(tmp_path)):
                raise OSError(errno.EROFS, "Read-only file system")
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    for extra in ([], ["--check"]):
        assert main.main(["--config", "tiny", "--output", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: Output folder") and str(out) in err and "Traceback" not in err
    assert "is an existing file" in err or "is a file" in err or "Read-only file system" in err


def test_unusable_cache_dir_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    _no_data_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    write_config(tmp_path / "f.json", tiny_config(dataset="folder", data_root=str(tmp_path / "data"),
                                                  cache_dir=str(tmp_path / "afile" / "cache"), **FAST))
    assert main.main(["--config", "f", "--check"]) == 2
    err = capsys.readouterr().err
    assert "'cache_dir'" in err and str(tmp_path / "afile" / "cache") in err and "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["--output", ""], "--output is an empty string"),
    (["--output", "  "], "--output is an empty string"),
    (["--device", ""], "'device'"),                  # not silently the config's device
])
def test_empty_command_line_values_exit_2(tmp_path, monkeypatch, capsys, argv, needle):
    _no_data_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**FAST))
    for extra in ([], ["--check"]):
        assert main.main(["--config", "tiny", *argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json"]


def test_check_refuses_a_device_this_machine_lacks(tmp_path, monkeypatch, capsys):
    """--check fails where the run would: a CUDA device without CUDA."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**FAST))
    assert main.main(["--config", "tiny", "--check", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "'device' is 'cuda'" in err and "CUDA is not available" in err
    assert main.main(["--config", "tiny", "--check", "--device", "cpu"]) == 0


def test_a_memory_of_less_than_one_image_per_class_is_noted(tmp_path, monkeypatch, capsys):
    """memory_size 3 with 4 classes seen keeps no exemplar: --check and the run's log say so (a
    learner without a memory, finetune, says nothing)."""
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**{**FAST, "memory_size": 3}))
    assert main.main(["--config", "tiny", "--check"]) == 0
    note = "note: memory_size 3 is less than one image per class from phase 1 on (4 classes seen)"
    assert note in capsys.readouterr().out
    assert main.main(["--config", "tiny", "--output", "run"]) == 0
    assert note in (tmp_path / "run" / "log.txt").read_text()
    capsys.readouterr()
    write_config(tmp_path / "ft.json", tiny_config(**{**FAST, "memory_size": 3, "model_name": "finetune"}))
    assert main.main(["--config", "ft", "--check"]) == 0
    assert "note: memory_size" not in capsys.readouterr().out


def test_settings_without_effect_are_noted_by_check_and_the_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**{**FAST, "scheduler": "multistep", "init_milestones": [9]}))
    assert main.main(["--config", "tiny", "--check"]) == 0
    note = f"note: init_milestones 9 is not below init_epochs {FAST['init_epochs']}: the lr never decays there."
    assert note in capsys.readouterr().out
    assert main.main(["--config", "tiny", "--output", "run"]) == 0
    assert note in (tmp_path / "run" / "log.txt").read_text()


def test_sync_bn_in_one_process_is_noted(tmp_path, monkeypatch, capsys):
    """sync_bn changes a run's identity but acts only under torchrun; in one process it said nothing."""
    from utils.config import phase_plan, resolve_config, run_notes

    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**{**FAST, "sync_bn": True}))
    assert main.main(["--config", "tiny", "--check"]) == 0
    note = "note: sync_bn is true but this run has one process, so it has no effect here"
    assert note in capsys.readouterr().out
    assert main.main(["--config", "tiny", "--output", "run"]) == 0
    assert note in (tmp_path / "run" / "log.txt").read_text()
    cfg = resolve_config(tiny_config(**{**FAST, "sync_bn": True}))
    plan = phase_plan(cfg, 6)
    assert not any("sync_bn" in n for n in run_notes(cfg, plan, 6, True, world=2))
    assert not any("sync_bn" in n for n in run_notes({**cfg, "sync_bn": False}, plan, 6, True))


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    """A scheduler's preemption (or a sweep stopping its runs) sends SIGTERM: the run used to die
    where it stood, its lock left behind and no word said. Now: exit 143, the saved phase and the
    resume command in one line, and the lock released."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    write_config(tmp_path / "slow.json", tiny_config(num_phases=3, init_epochs=1, epochs=40, threads=1))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--config", str(tmp_path / "slow.json"),
                             "--output", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "phase_0.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    try:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert f"interrupted (SIGTERM): phase 0 is saved in {out}; resume with: " in err
    assert not (out / "run.lock").exists()
    assert "interrupted (SIGTERM)" in (out / "log.txt").read_text()


def test_forked_decode_workers_end_quietly_under_the_sigterm_handler(tmp_path):
    """A decode pool ends its forked workers with SIGTERM: with main.py's handler inherited, each
    printed a Terminated traceback after every parallel decode of a file-based dataset."""
    import subprocess
    import sys

    from PIL import Image

    from conftest import REPO

    for i in range(32):
        Image.new("RGB", (20, 12), (i * 8, 0, 0)).save(tmp_path / f"{i}.png")
    code = ("import sys, glob; import main; from utils import image_cache; main.stop_on_sigterm(); "
            "images = image_cache.decode_images(sorted(glob.glob(sys.argv[1] + '/*.png')), 8, workers=2, "
            "chunk_size=8, progress=False)[0]; print(images.shape)")   # 4 chunks: a pool of 2 workers
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "(32, 3, 8, 8)", done.stderr
    assert "Traceback" not in done.stderr and "Terminated" not in done.stderr, done.stderr


def test_sigterm_to_the_process_group_stops_a_streamed_run_as_ctrl_c_does(tmp_path):
    """`timeout`, a scheduler or a terminal signals the whole process group, so a streamed run's
    loader workers get SIGTERM too. The run used to end in a traceback ("DataLoader worker ... is
    killed by signal: Terminated" replacing the interruption), or (on an H200 under `timeout`) went on
    training: the handler's exception, raised inside a loader's ``__del__``, was printed and ignored,
    until SIGKILL. Now: exit 143 with the one line, whichever arrives first."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, aspect_folder

    root = aspect_folder(tmp_path / "data", train_per_class=24, test_per_class=2, sizes=((24, 24), (30, 24)))
    write_config(tmp_path / "streamed.json", tiny_config(
        dataset="folder", data_root=str(root), shapes={}, image_size=24, input_size=20, in_memory=False,
        num_workers=2, batch_size=4, num_phases=2, init_epochs=1, epochs=400, threads=1, stored_form="crop"))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--config", str(tmp_path / "streamed.json"),
                             "--output", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "phase_0.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)   # phase 1's epochs, each with its loader's workers
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert f"interrupted (SIGTERM): phase 0 is saved in {out}; resume with: " in err
    assert not (out / "run.lock").exists()


@pytest.fixture
def termination_flag():
    from utils.errors import TERMINATION

    TERMINATION.clear()
    yield TERMINATION
    TERMINATION.clear()


def test_a_sigterm_lost_in_a_finalizer_stops_the_run_at_the_next_step(tmp_path, monkeypatch, capsys, termination_flag):
    """SIGTERM's exception raised inside a finalizer (a loader's __del__) is printed and ignored by
    Python; the handler's flag alone then stops the run at its next training step, as SIGTERM."""
    from utils.augment import TrainAugment

    augment = TrainAugment.__call__
    steps = []

    def augment_then_lose_a_sigterm(self, *args):
        steps.append(1)
        if len(steps) == 2:             # the handler ran, and its exception was lost
            termination_flag.set()
        return augment(self, *args)

    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**FAST))
    monkeypatch.setattr(TrainAugment, "__call__", augment_then_lose_a_sigterm)
    out = tmp_path / "out"
    assert main.main(["--config", "tiny", "--output", str(out)]) == 143
    err = capsys.readouterr().err
    assert f"interrupted (SIGTERM): no phase was finished yet in {out}" in err and "Traceback" not in err
    assert len(steps) == 2   # not one step more (phase 0 has 3 at batch 32)
    assert not (out / "run.lock").exists()


def test_an_error_after_sigterm_is_taken_for_the_interruption(tmp_path, monkeypatch, capsys, termination_flag):
    """A process-group SIGTERM also ends a streamed loader's workers, and the loader's RuntimeError
    can overtake the handler's exception. Once SIGTERM has arrived any error ends the run as SIGTERM
    (exit 143, one line), during training and while the data load; without it an error is a bug."""
    import trainer

    def worker_killed(*args, **kwargs):
        termination_flag.set()
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**FAST))
    monkeypatch.setattr(trainer.Trainer, "run_phase", _raise_in(trainer.Trainer.run_phase, 1, worker_killed))
    out = tmp_path / "out"
    assert main.main(["--config", "tiny", "--output", str(out)]) == 143
    err = capsys.readouterr().err
    assert f"interrupted (SIGTERM): phase 0 is saved in {out}; resume with: " in err and "Traceback" not in err
    assert "interrupted (SIGTERM)" in (out / "log.txt").read_text()
    monkeypatch.setattr(trainer, "load_dataset", worker_killed)
    termination_flag.clear()
    assert main.main(["--config", "tiny", "--output", str(out), "--resume"]) == 143
    assert "interrupted (SIGTERM) before training started" in capsys.readouterr().err
    termination_flag.clear()

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(trainer, "load_dataset", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main.main(["--config", "tiny", "--output", str(out), "--resume"])


def _raise_in(run_phase, index, fail):
    def run(self, phase):
        if phase.index == index:
            fail()
        return run_phase(self, phase)
    return run


def test_finalizer_errors_are_kept_quiet_only_after_sigterm(termination_flag):
    """main.py's hook for exceptions Python could not raise drops them once SIGTERM has arrived
    (the run is being torn down, and they are its consequences) and passes them on otherwise."""
    import signal
    import sys

    previous = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    passed_on = []
    try:
        sys.unraisablehook = lambda report: passed_on.append(report.exc_value)
        main.stop_on_sigterm()

        class Finalizer:
            def __del__(self):
                raise RuntimeError("DataLoader worker (pid 7) is killed by signal: Terminated.")

        Finalizer()
        assert [str(e) for e in passed_on] == ["DataLoader worker (pid 7) is killed by signal: Terminated."]
        termination_flag.set()
        Finalizer()
        assert len(passed_on) == 1
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        sys.unraisablehook = previous[1]


def test_a_reader_that_goes_away_ends_the_output_without_a_traceback():
    """`main.py --keys | head -1` (or --check): the closed pipe gave a BrokenPipeError traceback."""
    import subprocess
    import sys

    from conftest import REPO

    for args in (["--keys"], ["--config", "smoke", "--check"]):
        proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.stdout.close()   # the reader is gone before the first line
        err = proc.stderr.read()
        proc.wait(timeout=120)
        assert proc.returncode == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
