"""The phase loop on real (procedural-data) runs: outputs, memory budget, resume, determinism, divergence."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import aspect_folder, read_metrics, read_results, run, tiny_config, without_seconds
from trainer import Trainer, TrainingDiverged
from utils.config import config_hash, resolve_config
from utils.errors import UserError


# ---- outputs of one run ---------------------------------------------------------------------------

def test_results_json_shape(icarl_run):
    out, results, raw = icarl_run
    assert read_results(out) == json.loads(json.dumps(results))
    cfg = resolve_config(raw)
    assert results["config"] == json.loads(json.dumps(cfg))
    assert json.loads((out / "config.json").read_text()) == results["config"]
    assert results["config_hash"] == config_hash(cfg)
    assert sorted(results["class_order"]) == list(range(6))
    assert [p["phase"] for p in results["phases"]] == [0, 1, 2]
    assert [p["classes"] for p in results["phases"]] == [[0, 2], [2, 4], [4, 6]]
    for k, p in enumerate(results["phases"]):
        assert {"phase", "classes", "cnn", "nme", "memory", "seconds"} <= set(p)
        assert isinstance(p["seconds"], float) and p["seconds"] > 0
        for model in ("cnn", "nme"):
            r = p[model]
            assert set(r) == {"top1", "top5", "per_task", "old", "new"}
            assert len(r["per_task"]) == k + 1
            assert all(0 <= a <= 100 for a in r["per_task"])
            assert r["top1"] <= r["top5"] <= 100
            assert (r["old"] is None) == (k == 0)
        assert {"budget", "used", "exemplars", "per_class"} <= set(p["memory"])
    summary = results["summary"]
    for key in ("cnn_avg_top1", "cnn_last_top1", "cnn_forgetting", "nme_avg_top1", "nme_last_top1", "nme_forgetting"):
        assert isinstance(summary[key], float), key


def test_summary_is_computed_from_the_phases(icarl_run):
    _, results, _ = icarl_run
    phases, summary = results["phases"], results["summary"]
    for model in ("cnn", "nme"):
        top1 = [p[model]["top1"] for p in phases]
        assert summary[f"{model}_avg_top1"] == pytest.approx(sum(top1) / len(top1), abs=1e-3)
        assert summary[f"{model}_last_top1"] == top1[-1]
        matrix = [p[model]["per_task"] for p in phases]
        drops = [max(matrix[p][t] for p in range(t, 2)) - matrix[2][t] for t in range(2)]
        assert summary[f"{model}_forgetting"] == pytest.approx(sum(drops) / 2, abs=1e-3)


def test_metrics_jsonl_has_one_line_per_epoch(icarl_run):
    out, _, raw = icarl_run
    lines = read_metrics(out)
    epochs = [raw["init_epochs"], raw["epochs"], raw["epochs"]]
    assert [(m["phase"], m["epoch"]) for m in lines] == [(k, e + 1) for k, n in enumerate(epochs) for e in range(n)]
    for m in lines:
        assert {"phase", "stage", "epoch", "lr", "losses", "train_acc", "seconds"} <= set(m)
        assert m["stage"] == "train"
        assert 0 <= m["train_acc"] <= 100 and m["seconds"] >= 0
        assert set(m["losses"]) == ({"loss", "ce"} if m["phase"] == 0 else {"loss", "ce", "kd"})
        assert m["losses"]["loss"] == pytest.approx(sum(v for k, v in m["losses"].items() if k != "loss"), abs=1e-5)
    # lr is the rate the epoch trained with: cosine from init_lr (phase 0) and lr (later phases).
    for m in lines:
        base, n = (raw["init_lr"], raw["init_epochs"]) if m["phase"] == 0 else (raw["lr"], raw["epochs"])
        assert m["lr"] == pytest.approx(base * (1 + math.cos(math.pi * (m["epoch"] - 1) / n)) / 2)
    assert lines[-1]["lr"] > 0


def test_log_txt_has_one_block_per_phase(icarl_run):
    out, results, _ = icarl_run
    log = (out / "log.txt").read_text()
    for k in range(3):
        assert log.count(f"== phase {k}:") == 1
        assert log.count(f"-- phase {k} done") == 1
    assert log.index("-- phase 0 done") < log.index("-- phase 1 done") < log.index("-- phase 2 done")
    assert "== summary" in log and "cnn_avg_top1" in log
    assert log.count("   memory   ") == 3


def test_checkpoints_of_every_phase(icarl_run):
    out, results, _ = icarl_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["phase_0.pt", "phase_1.pt", "phase_2.pt"]
    state = torch.load(out / "checkpoints" / "phase_2.pt", map_location="cpu", weights_only=False)
    assert state["phase"] == 2 and state["config_hash"] == results["config_hash"]
    assert without_seconds(json.loads(json.dumps(state["results"]))) == without_seconds(read_results(out))


# ---- memory ------------------------------------------------------------------------------------

def _check_memory(phases):
    for p in phases:
        m = p["memory"]
        classes_seen = p["classes"][1]
        assert m["used"] <= m["budget"] + 1e-9
        assert len(m["per_class"]) == classes_seen
        assert sum(m["per_class"]) == m["exemplars"]
        assert all(n <= m["class_budget"] for n in m["per_class"])
        assert m["used"] == pytest.approx(m["exemplars"])     # uncompressed: 1 unit each


def test_memory_never_exceeds_its_budget(icarl_run):
    out, results, _ = icarl_run
    phases = results["phases"]
    _check_memory(phases)
    # memory_size 60: 60 // classes seen per class, every class filled (40 images each).
    assert [p["memory"]["per_class"] for p in phases] == [[30] * 2, [15] * 4, [10] * 6]
    assert [p["memory"]["budget"] for p in phases] == [60, 60, 60]
    # Shrinking keeps a prefix of each old class's herding order (checkpointed memories).
    mems = [torch.load(out / "checkpoints" / f"phase_{k}.pt", map_location="cpu", weights_only=False)["memory"]
            for k in range(3)]
    for k in (1, 2):
        for c, ex in mems[k].items():
            if c in mems[k - 1]:
                n = len(ex["source_index"])
                assert torch.equal(ex["source_index"], mems[k - 1][c]["source_index"][:n])
                assert torch.equal(ex["images"], mems[k - 1][c]["images"][:n])


def test_fixed_memory_grows_with_the_classes_and_checkpoints_last(tmp_path):
    raw = tiny_config(fixed_memory=True, memory_per_class=5, memory_size=1, init_epochs=1, epochs=1,
                      checkpoints="last")
    results = run(raw, tmp_path / "run")
    _check_memory(results["phases"])
    assert [p["memory"]["budget"] for p in results["phases"]] == [10, 20, 30]
    assert [p["memory"]["per_class"] for p in results["phases"]] == [[5] * 2, [5] * 4, [5] * 6]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["phase_2.pt"]


def test_checkpoints_last_on_a_resume_of_an_all_run_keeps_only_the_newest(tmp_path):
    """`checkpoints: last` removed only the previous phase's file, so a resume that switched from
    "all" left every older checkpoint of the first attempt behind."""
    out = tmp_path / "run"
    run(tiny_config(init_epochs=1, epochs=1, checkpoints="all"), out, stop_after_phase=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["phase_0.pt", "phase_1.pt"]
    run(tiny_config(init_epochs=1, epochs=1, checkpoints="last"), out, resume=True)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["phase_2.pt"]


# ---- determinism and resume ---------------------------------------------------------------------

def test_two_cpu_runs_give_identical_results(tmp_path, tiny_reference):
    ref_out, ref = tiny_reference
    results = run(tiny_config(), tmp_path / "again")
    assert without_seconds(results) == without_seconds(ref)
    assert without_seconds(read_results(tmp_path / "again")) == without_seconds(read_results(ref_out))
    assert without_seconds(read_metrics(tmp_path / "again")) == without_seconds(read_metrics(ref_out))


@pytest.mark.parametrize("stop", [0, 1])
def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path, tiny_reference, stop):
    ref_out, ref = tiny_reference
    out = tmp_path / "run"
    partial = run(tiny_config(), out, stop_after_phase=stop)
    assert len(partial["phases"]) == stop + 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"phase_{k}.pt" for k in range(stop + 1)]
    assert len(read_results(out)["phases"]) == stop + 1
    if stop == 1:
        # A crash in the middle of phase 2 leaves some of its epochs (and a cut line) in metrics.jsonl.
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"phase": 2, "stage": "train", "epoch": 1, "lr": 0.1, "losses": {}}) + "\n")
            f.write('{"phase": 2, "sta')
    resumed = run(tiny_config(), out, resume=True)
    assert f"resume: restored phase {stop}" in (out / "log.txt").read_text()
    assert without_seconds(resumed) == without_seconds(ref)
    assert without_seconds(read_results(out)) == without_seconds(read_results(ref_out))
    # metrics.jsonl: every epoch exactly once, as in the uninterrupted run.
    assert without_seconds(read_metrics(out)) == without_seconds(read_metrics(ref_out))


def test_resume_of_a_finished_run_trains_nothing(tmp_path, tiny_reference):
    ref_out, ref = tiny_reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    before = (out / "metrics.jsonl").read_text()
    resumed = run(tiny_config(), out, resume=True)
    assert without_seconds(resumed) == without_seconds(ref)
    assert resumed["phases"][-1]["seconds"] == ref["phases"][-1]["seconds"]   # not re-run
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_refuses_another_config(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(num_phases=2, init_epochs=1), out, stop_after_phase=0)
    with pytest.raises(UserError, match=r"config differs from this one in .*init_lr"):
        run(tiny_config(num_phases=2, init_epochs=1, init_lr=0.05), out, resume=True)
    # The refused run changed nothing.
    assert json.loads((out / "config.json").read_text())["init_lr"] == 0.1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["phase_0.pt"]


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(num_phases=2, init_epochs=1), out, stop_after_phase=0)
    (out / "config.json").unlink()   # no config.json to compare with: the checkpoint's hash still guards
    with pytest.raises(UserError, match=r"phase_0.pt: its config differs from this one in memory_size\."):
        run(tiny_config(num_phases=2, init_epochs=1, memory_size=50), out, resume=True)
    assert not (out / "config.json").exists()      # the refused config was not recorded
    assert (out / "checkpoints" / "phase_0.pt").exists()


def test_fresh_run_never_reuses_old_checkpoints(tmp_path, tiny_reference):
    ref_out, _ = tiny_reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)             # a finished 3-phase run with phase_0..2.pt
    raw = tiny_config(num_phases=2, init_lr=0.05)
    results = run(raw, out, stop_after_phase=0)
    assert [p["phase"] for p in results["phases"]] == [0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["phase_0.pt"]
    state = torch.load(out / "checkpoints" / "phase_0.pt", map_location="cpu", weights_only=False)
    assert state["config_hash"] == config_hash(resolve_config(raw))
    assert {m["phase"] for m in read_metrics(out)} == {0}
    assert "-- phase 2 done" not in (out / "log.txt").read_text()
    assert read_results(out)["config"]["init_lr"] == 0.05
    # ...and resuming that fresh run continues it (the stale phase_2.pt is gone).
    resumed = run(raw, out, resume=True)
    assert [p["phase"] for p in resumed["phases"]] == [0, 1]


# ---- divergence --------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name, extra", [
    ("icarl", {}), ("der", {}), ("lucir", {"cbf_epochs": 1, "cbf_milestones": [], "cbf_lr": 0.044}),
    ("foster", {"compression_lr": 0.033}), ("foster", {"compression_lr": None})])
def test_every_stage_names_the_key_that_set_its_learning_rate(tmp_path, monkeypatch, model_name, extra):
    """A diverged stage's message names the key to lower (``Stage.lr_key``): it must be the key
    whose value the stage trains with, in every learner's every stage (each rate distinct here)."""
    seen = []
    monkeypatch.setattr(Trainer, "run_stage", lambda self, phase, stage, generator: seen.append(
        (phase.index, stage.name, stage.lr, stage.lr_key)))
    cfg = resolve_config(tiny_config(model_name=model_name, init_lr=0.011, lr=0.022, **extra))
    Trainer(cfg, tmp_path / "run", "tiny").run()
    assert seen and all(key is not None and cfg[key] == lr for _, _, lr, key in seen), seen
    assert {(k, name) for k, name, _, _ in seen} >= {(0, "train"), (1, seen[-1][1]), (2, seen[-1][1])}
    assert [key for k, _, _, key in seen if k == 0] == ["init_lr"]


def test_the_divergence_hint_names_each_stages_rate_and_bf16():
    from models.base import Stage
    from trainer import lower_lr_hint

    def stage(name, lr, key):
        return Stage(name, 1, [], lr, None, None, None, lr_key=key)

    two = [stage("boosting", 0.1, "lr"), stage("compression", 0.05, "compression_lr")]
    assert lower_lr_hint(two, bf16=False) == ("Try a lower learning rate than 0.1 (`lr`) in stage 'boosting', "
                                              "0.05 (`compression_lr`) in stage 'compression'.")
    assert lower_lr_hint([stage("train", 0.1, None)], bf16=True) == \
        "Try a lower learning rate than 0.1 in stage 'train', or `amp: false` (it ran in bfloat16)."


def test_nan_loss_stops_with_the_phase_and_epoch_and_keeps_earlier_results(tmp_path):
    out = tmp_path / "run"
    raw = tiny_config(num_phases=2, init_epochs=1, lr=1e30)       # phase 1 diverges
    trainer = Trainer(resolve_config(raw), out, "tiny")
    with pytest.raises(TrainingDiverged, match=r"phase 1, stage 'train', epoch 1: .*nan") as err:
        trainer.run()
    assert str(out) in str(err.value)
    assert str(err.value).endswith("Try a lower learning rate than 1e+30 (`lr`) in stage 'train'.")   # no bf16 on CPU
    kept = read_results(out)
    assert [p["phase"] for p in kept["phases"]] == [0]
    assert (out / "checkpoints" / "phase_0.pt").exists()
    assert not (out / "checkpoints" / "phase_1.pt").exists()


def test_resume_without_checkpoints_starts_over_cleanly(tmp_path):
    out = tmp_path / "run"
    raw = tiny_config(num_phases=2, init_epochs=1, epochs=1, checkpoints="none")
    run(raw, out, stop_after_phase=0)
    assert not (out / "checkpoints").exists()
    resumed = run(raw, out, resume=True)
    assert "resume: no checkpoint found" in (out / "log.txt").read_text()
    assert [p["phase"] for p in resumed["phases"]] == [0, 1]
    # Phase 0 ran twice, but metrics.jsonl holds each epoch once.
    assert [(m["phase"], m["epoch"]) for m in read_metrics(out)] == [(0, 1), (1, 1)]


# ---- issue 12: resume identity, run lock, unreadable files, tasks without test images -----------

FAST = dict(num_phases=2, init_epochs=1, epochs=1)


def test_resume_refuses_another_seed(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(**FAST), out, stop_after_phase=0)
    with pytest.raises(UserError, match=r"config differs from this one in seed\."):
        run(tiny_config(**FAST, seed=7), out, resume=True)
    (out / "config.json").unlink()   # the checkpoint's own config guards too
    with pytest.raises(UserError, match=r"Cannot resume from .*phase_0.pt: its config differs from this one in seed\."):
        run(tiny_config(**FAST, seed=7), out, resume=True)
    assert len(read_results(out)["phases"]) == 1


def test_a_second_run_into_a_locked_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from utils.run_lock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"Output folder {out} is in use by another run \(pid {holder.pid} on host"):
            run(tiny_config(**FAST), out)
        assert not (out / "results.json").exists() and (out / "run.lock").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now (killed: no release): its lock file is taken over with a notice; released at the end
    results = run(tiny_config(**FAST), out)
    assert len(results["phases"]) == 2
    assert f"taking over the stale lock {out / 'run.lock'} (of pid {holder.pid}" in capsys.readouterr().out
    assert not (out / "run.lock").exists()


def test_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged):
        Trainer(resolve_config(tiny_config(**FAST, lr=1e30)), out, "tiny").run()
    assert not (out / "run.lock").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "no_rng"])
def test_resume_falls_back_to_the_previous_intact_checkpoint(tmp_path, tiny_reference, damage):
    """A readable dict without a part of the state (no_rng) was a KeyError traceback."""
    ref_out, ref = tiny_reference
    out = tmp_path / "run"
    run(tiny_config(), out, stop_after_phase=1)
    bad = out / "checkpoints" / "phase_1.pt"
    if damage == "no_rng":
        state = torch.load(bad, weights_only=False)
        del state["rng"]
        torch.save(state, bad)
    else:
        bad.write_bytes(bad.read_bytes()[:1000] if damage == "truncated" else b"")
    resumed = run(tiny_config(), out, resume=True)
    log = (out / "log.txt").read_text()
    assert f"resume: checkpoint {bad} is unreadable" in log and "resume: restored phase 0" in log
    assert without_seconds(resumed) == without_seconds(ref)


def test_resume_with_no_readable_checkpoint_names_it(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(**FAST, checkpoints="last"), out, stop_after_phase=0)
    bad = out / "checkpoints" / "phase_0.pt"
    bad.write_bytes(b"\x80\x02")
    with pytest.raises(UserError, match=rf"no checkpoint can be read \({bad} unreadable"):
        run(tiny_config(**FAST, checkpoints="last"), out, resume=True)


def test_corrupt_config_json_is_overwritten_by_a_fresh_run_and_named_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_config(**FAST), out, stop_after_phase=0)
    (out / "config.json").write_text('{"seed": 19')
    with pytest.raises(UserError, match=rf"its config.json is unreadable .*{out / 'config.json'}"):
        run(tiny_config(**FAST), out, resume=True)
    assert (out / "checkpoints" / "phase_0.pt").exists()
    results = run(tiny_config(**FAST), out)
    assert len(results["phases"]) == 2
    assert json.loads((out / "config.json").read_text())["seed"] == 1993
    assert "was unreadable" in (out / "log.txt").read_text()


def test_leftover_tmp_files_of_a_killed_write_are_removed_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(**FAST), out, stop_after_phase=0)
    leftovers = [out / ".results.json.abc123.tmp", out / "checkpoints" / ".phase_1.pt.xyz.tmp"]
    for p in leftovers:
        p.write_bytes(b"half")
    run(tiny_config(**FAST), out, resume=True)
    assert not any(p.exists() for p in leftovers)
    assert "removed 2 temporary file(s)" in (out / "log.txt").read_text()


def test_a_task_without_test_images_gets_null_accuracy_and_forgetting_skips_it(tmp_path):
    trainer = Trainer(resolve_config(tiny_config(**FAST)), tmp_path / "run", "tiny")
    keep = trainer.test_labels >= 2            # task 0 (classes 0, 1) loses every test image
    trainer.test_images, trainer.test_labels = trainer.test_images[keep], trainer.test_labels[keep]
    results = trainer.run()
    p0, p1 = results["phases"]
    assert p0["cnn"]["top1"] is None and p0["cnn"]["per_task"] == [None]
    assert p1["cnn"]["per_task"][0] is None and p1["cnn"]["per_task"][1] is not None
    s = results["summary"]
    assert s["cnn_forgetting"] is None and s["cnn_forgetting_pycil"] is None
    assert s["cnn_avg_top1"] == p1["cnn"]["top1"]
    assert "have no test images" in (tmp_path / "run" / "log.txt").read_text()
    from utils.results_file import load_results   # the one rule of resume, sweep and report accepts it
    assert load_results(tmp_path / "run" / "results.json")[1] is None


def test_results_record_the_code_version_and_environment(tmp_path):
    """A config hash names the settings, not the code: each phase records the commit it ran on."""
    from utils import provenance

    results = run(tiny_config(**FAST), tmp_path / "run")
    assert results["environment"]["code"] == provenance.code_version() != ""
    assert results["environment"]["torch"] == torch.__version__
    assert [p["code"] for p in results["phases"]] == [provenance.code_version()] * len(results["phases"])
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"code {provenance.code_version()}, python " in log
    # a phase's class range is half-open where it opens and where it ends
    assert "== phase 1: classes [2, 4) (2 new, 2 old)" in log and "done in" in log and ": classes [2, 4)\n" in log



def test_nme_flip_false_takes_class_means_from_the_exemplars_alone(tmp_path):
    """NME means from each exemplar and its mirror (iCaRL, default) or from the exemplar alone (PyCIL's
    figures): the CNN is untouched, the means are those of the unflipped features."""
    from utils import batching
    from utils.nme import class_means, nme_logits

    def last_nme_top1(trainer, flip):
        """The last phase's NME top-1 recomputed: plain means, or iCaRL's flipped ones (the official
        normalise(Σ n(f) + n(f′)), each exemplar's pair summed as it is)."""
        phase = trainer.phases()[-1]
        images, labels = trainer.memory.tensors()
        feats = trainer.ctx.embed(images, lambda x: trainer.learner.inference(x)["features"], flip=flip)
        means = class_means(feats, labels, phase.last, normalized=flip)
        seen = (trainer.test_labels < phase.last).nonzero().flatten()   # the plan may leave classes out
        test = trainer.ctx.embed(batching.select(trainer.test_images, seen), lambda x: trainer.learner.inference(x)["features"])
        return 100 * (nme_logits(test, means).argmax(1) == trainer.test_labels[seen]).float().mean().item()

    flipping = Trainer(resolve_config(tiny_config(**FAST)), tmp_path / "flip", "tiny")
    flipped = flipping.run()
    trainer = Trainer(resolve_config(tiny_config(**FAST, nme_flip=False)), tmp_path / "plain", "tiny")
    plain = trainer.run()
    assert [p["cnn"] for p in plain["phases"]] == [p["cnn"] for p in flipped["phases"]]
    assert plain["phases"][-1]["nme"]["top1"] == pytest.approx(last_nme_top1(trainer, False), abs=0.01)
    assert flipped["phases"][-1]["nme"]["top1"] == pytest.approx(last_nme_top1(flipping, True), abs=0.01)
    assert config_hash(resolve_config(tiny_config(nme_flip=True))) == config_hash(resolve_config(tiny_config()))
    assert config_hash(resolve_config(tiny_config(nme_flip=False))) != config_hash(resolve_config(tiny_config()))


def test_a_resume_on_other_code_says_so_and_each_phase_keeps_its_code(tmp_path, monkeypatch):
    from utils import provenance

    raw = tiny_config(**FAST)
    run(raw, tmp_path / "run", stop_after_phase=0)
    real = provenance.environment
    monkeypatch.setattr(provenance, "environment", lambda device: {**real(device), "code": "0123abcd+dirty"})
    results = run(raw, tmp_path / "run", resume=True)
    assert [p["code"] for p in results["phases"]] == [provenance.code_version(), "0123abcd+dirty"]
    assert results["environment"]["code"] == "0123abcd+dirty"
    assert (f"note: resume: the finished phases ran on code {provenance.code_version()}, this process runs "
            f"0123abcd+dirty") in (tmp_path / "run" / "log.txt").read_text()


def test_a_resume_whose_weights_are_another_networks_is_refused_by_name(tmp_path):
    """A checkpoint saved by code with another architecture (cosine_resnet32 took option-B shortcuts)
    stops the resume with exit-2 error naming the checkpoint, not load_state_dict's traceback."""
    raw = tiny_config(**FAST)
    out = tmp_path / "run"
    run(raw, out, stop_after_phase=0)
    path = out / "checkpoints" / "phase_0.pt"
    state = torch.load(path, weights_only=False)
    weights = next(v for v in state["learner"].values() if isinstance(v, dict) and v)
    weights.pop(next(iter(weights)))
    torch.save(state, path)
    with pytest.raises(UserError, match=rf"Cannot resume from {path}: its weights do not fit this code's network "
                                        r".*Missing key"):
        run(raw, out, resume=True)


def test_leftover_classes_form_a_smaller_last_phase(tmp_path):
    results = run(tiny_config(init_cls=2, increment=3, init_epochs=1, epochs=1), tmp_path / "run")
    assert [p["classes"] for p in results["phases"]] == [[0, 2], [2, 5], [5, 6]]
    assert [len(p["cnn"]["per_task"]) for p in results["phases"]] == [1, 2, 3]


def test_a_full_disk_while_logging_names_the_file(tmp_path):
    import errno

    from utils.io import DiskFull
    from utils.run_log import RunLog

    log = RunLog(tmp_path)
    log.open()

    class Full:
        name = str(tmp_path / "log.txt")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    log._text = Full()
    with pytest.raises(DiskFull, match=rf"The disk is full: could not write {tmp_path / 'log.txt'}"):
        log.info("x")


def test_compile_compiles_each_stage_forward_and_trains_the_same(tmp_path, tiny_reference, monkeypatch):
    """``compile: true`` wraps each stage's forward in torch.compile (here with the aot_eager
    backend: the real graph capture through forward and backward, without slow C++ code generation)
    once per stage, and the run learns the same: torch.compile changes speed, not the maths."""
    import torch

    real = torch.compile
    compiled = []

    def fake_compile(fn, mode=None):
        compiled.append((fn, mode))
        return real(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", fake_compile)
    res = run(tiny_config(compile=True, compile_mode="max-autotune"), tmp_path / "compiled")
    assert len(compiled) == 3 and {m for _, m in compiled} == {"max-autotune"}   # iCaRL: one stage per phase
    reference = tiny_reference[1]
    ref = reference["summary"]["cnn_accuracy_matrix"]
    got = res["summary"]["cnn_accuracy_matrix"]
    for ref_row, got_row in zip(ref, got):
        assert got_row == pytest.approx(ref_row, abs=5.0)
    assert res["config_hash"] == reference["config_hash"]   # compile is not part of a run's identity


# ---- stored form "whole": a resized_crop folder dataset of non-square images ------------------------

def _whole_config(root, **overrides):
    return tiny_config(**{**dict(dataset="folder", data_root=str(root), shapes={}, image_size=24, input_size=20,
                                 augment="resized_crop", rrc_scale=[0.35, 1.0], init_cls=2, increment=2,
                                 memory_size=16, batch_size=16, init_epochs=8, epochs=6, init_lr=0.05, lr=0.02,
                                 scheduler="cosine"), **overrides})


@pytest.fixture(scope="module")
def aspect_data(tmp_path_factory):
    return aspect_folder(tmp_path_factory.mktemp("aspect") / "data")


@pytest.mark.parametrize("learner", [{"model_name": "icarl"},
                                     {"model_name": "lucir", "cbf_epochs": 2, "cbf_milestones": [],
                                      "compression": "cim", "cam_update_interval": 2, "randombbxblur_prob_incre": 0.5,
                                      "num_meta_iters_per_cls": 1.0, "meta_batch_size": 8}])
def test_whole_form_trains_with_memory_across_phases_and_resumes_exactly(tmp_path, aspect_data, learner):
    raw = _whole_config(aspect_data, **learner)
    cfg = resolve_config(raw)
    assert cfg["stored_form"] == "whole"      # the default of a resized_crop folder dataset
    trainer = Trainer(cfg, tmp_path / "ref", "whole")
    results = trainer.run()
    # the original sizes reached the trainer and follow the exemplars (through their training-set index)
    hw = trainer.train_orig_hw
    assert hw is not None and {tuple(x) for x in hw.tolist()} == {(24, 36), (36, 24), (30, 30), (22, 40)}
    last = trainer.phases()[-1]
    data = trainer.stage_data(last, "phase")
    mem_index = trainer.memory.source_indices()
    assert len(mem_index) > 0 and data.orig_hw is not None
    assert torch.equal(data.orig_hw[data.origin == 1], hw[mem_index])
    assert torch.equal(data.orig_hw[data.origin == 0], hw[data.index[data.origin == 0]])
    memory = results["phases"][-1]["memory"]
    assert memory["exemplars"] > 0 and memory["used"] <= memory["budget"]
    if "compression" in learner:   # compressed exemplars of whole-stored images, drawn at their aspect
        assert memory["mean_cost"] < 1.0 and (tmp_path / "ref" / "exemplars_phase_1.png").exists()
    # it learns: 4 classes, chance 25 %
    assert results["summary"]["cnn_last_top1"] > 50.0, results["summary"]
    assert results["phases"][-1]["nme"]["top1"] > 50.0
    # resume after phase 0 equals the uninterrupted run
    out = tmp_path / "resumed"
    run(raw, out, stop_after_phase=0)
    resumed = run(raw, out, resume=True)
    assert without_seconds(resumed) == without_seconds(results)
    assert without_seconds(read_metrics(out)) == without_seconds(read_metrics(tmp_path / "ref"))


def test_whole_form_of_square_images_is_exactly_the_crop_form(tmp_path):
    """Square originals of the stored size: the whole image is the centre crop and original pixels are
    stored pixels, so every path of the whole form (sizes through stage data, memory, per-sample
    boxes, centre view) must reduce to the crop form's numbers exactly, with the same random stream.
    (Originals of another size would not: the whole form draws boxes in the original's pixels.)"""
    root = aspect_folder(tmp_path / "data", train_per_class=8, test_per_class=4, sizes=((24, 24),))
    raw = dict(model_name="lucir", cbf_epochs=1, cbf_milestones=[], init_epochs=2, epochs=2)
    crop = run(_whole_config(root, stored_form="crop", **raw), tmp_path / "crop")
    whole = run(_whole_config(root, **raw), tmp_path / "whole")
    assert whole["config"]["stored_form"] == "whole" and crop["config"]["stored_form"] == "crop"
    assert whole["config_hash"] != crop["config_hash"]
    strip = lambda r: without_seconds({k: v for k, v in r.items() if k not in ("config", "config_hash")})  # noqa: E731
    assert strip(whole) == strip(crop)
    assert without_seconds(read_metrics(tmp_path / "whole")) == without_seconds(read_metrics(tmp_path / "crop"))


def test_streamed_run_decoding_on_the_device_goes_through_one_decoder(tmp_path, monkeypatch):
    """stream_decode "device" on a CPU run (torchvision decodes in this process): a LUCIR run over
    two phases completes with Pillow forbidden, and training batches (new images joined with
    exemplars), evaluation, herding's features, imprinting and the exemplars kept (``batching.materialize``)
    all decoded their streamed images through the one finishing step."""
    import inspect

    from utils import image_cache, stream_decode

    root = aspect_folder(tmp_path / "data", train_per_class=8, test_per_class=4, ext="jpg")
    raw = _whole_config(root, model_name="lucir", cbf_epochs=1, cbf_milestones=[], init_epochs=2, epochs=2,
                        in_memory=False, stream_decode="device")
    cfg = resolve_config(raw)
    assert cfg["stored_form"] == "crop" and cfg["stream_decode"] == "device"

    def no_pillow(*args, **kwargs):
        raise AssertionError("a streamed JPEG was decoded with Pillow")

    callers = set()
    real = stream_decode.finish_batch

    def recording(items, size, device):
        callers.update(f.function for f in inspect.stack()[1:8])
        return real(items, size, device)

    monkeypatch.setattr(image_cache, "decode_image", no_pillow)
    monkeypatch.setattr(stream_decode, "finish_batch", recording)
    trainer = Trainer(cfg, tmp_path / "device", "device")
    assert trainer.train_images.decode_on == trainer.device
    results = trainer.run()
    assert [p["phase"] for p in results["phases"]] == [0, 1]
    assert results["phases"][-1]["memory"]["exemplars"] > 0 and results["phases"][-1]["nme"] is not None
    # training, evaluation, the kept exemplars (training_images), and the memory update's shares and
    # LUCIR's imprinting, which embed the streamed source itself (each process its share)
    assert {"batches", "evaluate", "training_images", "materialize", "begin_phase", "embed"} <= callers, callers
    # feature extraction of a streamed source decodes the same way as of its decoded tensors
    from utils import batching

    callers.clear()
    index = torch.arange(5)
    feats = trainer.ctx.embed(batching.select(trainer.train_images, index), lambda x: x.flatten(1))
    assert "embed" in callers and torch.equal(feats, trainer.ctx.embed(
        batching.materialize(batching.select(trainer.train_images, index)), lambda x: x.flatten(1)))
    assert results["config_hash"] != config_hash(resolve_config({**raw, "stream_decode": "workers"}))


@pytest.mark.parametrize("model_name", ["icarl", "lucir", "der", "foster"])
def test_no_training_graph_is_alive_when_the_plugins_end_an_epoch(tmp_path, model_name):
    """The last step's autograd graph is dropped before ``after_epoch``: kept alive, its gradient
    accumulators (made on the training stream) stop CIM's bilevel step from being recorded as a
    CUDA graph (on the H200 every phase-0 capture failed, after the warning that names this)."""
    import gc
    import warnings

    from models.plugins import Plugin

    def graphs_alive() -> int:
        gc.collect()
        with warnings.catch_warnings():   # isinstance on every object touches deprecated torch aliases
            warnings.simplefilter("ignore", FutureWarning)
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)

    counts = {"before": [], "after": []}

    class Probe(Plugin):
        def before_stage(self, phase, stage, data):
            counts["before"].append(graphs_alive())

        def after_epoch(self, phase, stage, epoch, lr):
            counts["after"].append(graphs_alive())

    t = Trainer(resolve_config(tiny_config(model_name=model_name, init_epochs=2, epochs=2)), tmp_path / "run",
                "tiny", stop_after_phase=1)
    t.plugins.append(Probe(t.cfg, t.ctx))
    t.run()
    assert len(counts["after"]) >= 4                     # two epochs of phases 0 and 1 (and any later stage)
    assert set(counts["after"]) == {counts["before"][0]}


def test_a_streamed_run_spreads_its_small_passes_over_the_workers_and_equals_the_in_memory_run(tmp_path, monkeypatch):
    """LUCIR on a streamed set with 2 loader workers: herding's features of each class (64 images),
    LUCIR's imprinting and the evaluation read the files with the images spread over both workers
    (a plain loader in batches of ``eval_batch_size`` 48 would give one worker 48 of 64) and re-cut
    to ``eval_batch_size`` batches; the memory update decodes no class whole, only the exemplars
    it keeps. The results are exactly those of the same folder held in memory."""
    from utils import batching

    root = aspect_folder(tmp_path / "data", train_per_class=64, test_per_class=4, sizes=((24, 24), (30, 24)))
    raw = _whole_config(root, model_name="lucir", cbf_epochs=1, cbf_milestones=[], init_epochs=1, epochs=1,
                        stored_form="crop", eval_batch_size=48, batch_size=64)
    memory = run(raw, tmp_path / "memory")
    started, decoded_whole = [], []
    real_loader, real_materialize = batching.DataLoader, batching.materialize

    def loader(*args, **kwargs):
        started.append((kwargs["num_workers"], [len(b) for b in kwargs["batch_sampler"]]))
        return real_loader(*args, **kwargs)

    def materialize(images, *args, **kwargs):
        decoded_whole.append(len(images))
        return real_materialize(images, *args, **kwargs)
    monkeypatch.setattr(batching, "DataLoader", loader)
    monkeypatch.setattr(batching, "materialize", materialize)
    streamed = run({**raw, "in_memory": False, "num_workers": 2}, tmp_path / "streamed")
    strip = lambda r: without_seconds({k: v for k, v in r.items() if k not in ("config", "config_hash")})  # noqa: E731
    assert strip(streamed) == strip(memory)
    assert started.count((2, [32, 32])) >= 4 + 2        # herding of the 4 classes, imprinting of the 2 new ones
    assert (2, [48, 16]) not in started
    kept = sum(p["memory"]["per_class"][c] for p in streamed["phases"] for c in range(*p["classes"]))
    assert sum(decoded_whole) == kept > 0                # only the exemplars kept are decoded whole


# ---- a sweep of run-folder states (2026-11-27): resume and fresh runs keep what they must ------

@pytest.mark.parametrize("damage", ["deleted", "truncated", "a phase too many"])
def test_resume_with_nothing_left_to_run_rewrites_results_json(tmp_path, tiny_reference, damage):
    """A stop between the last phase's checkpoint and its results.json (or a damaged results.json)
    used to stay: the resume ran no phase, so it never wrote the file, and exited 0."""
    ref_out, ref = tiny_reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    path = out / "results.json"
    if damage == "deleted":
        path.unlink()
    elif damage == "truncated":
        path.write_text(path.read_text()[:100])
    else:
        saved = json.loads(path.read_text())
        saved["phases"].append(dict(saved["phases"][-1], phase=3))
        path.write_text(json.dumps(saved))
    run(tiny_config(), out, resume=True)
    assert without_seconds(read_results(out)) == without_seconds(ref)


def test_resume_of_a_finished_run_without_checkpoints_keeps_its_results(tmp_path, tiny_reference):
    """checkpoints "none", or checkpoints deleted after the run: --resume used to delete the
    finished results.json and train everything again (an interruption then left less than before)."""
    ref_out, ref = tiny_reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    shutil.rmtree(out / "checkpoints")
    metrics = (out / "metrics.jsonl").read_text()
    resumed = run(tiny_config(), out, resume=True)
    assert "holds every phase of this run and no checkpoint is left; nothing to run" in (out / "log.txt").read_text()
    assert resumed["phases"][-1]["seconds"] == ref["phases"][-1]["seconds"]     # not trained again
    assert read_results(out) == ref and (out / "metrics.jsonl").read_text() == metrics
    # Nothing ran, so the settings outside the run's identity stay those it ran with (it used to
    # write this call's there).
    run(tiny_config(threads=2), out, resume=True)
    assert read_results(out) == ref
    # A results.json of fewer phases is not a finished run: that one starts over, as before.
    shutil.copytree(ref_out, tmp_path / "partial")
    shutil.rmtree(tmp_path / "partial" / "checkpoints")
    saved = read_results(tmp_path / "partial")
    (tmp_path / "partial" / "results.json").write_text(json.dumps({**saved, "phases": saved["phases"][:2]}))
    again = run(tiny_config(), tmp_path / "partial", resume=True)
    assert "no checkpoint found, starting from phase 0" in (tmp_path / "partial" / "log.txt").read_text()
    assert without_seconds(again) == without_seconds(ref)


def test_resume_refuses_when_the_dataset_gained_or_lost_classes(tmp_path):
    """The classes on disk are not in the config: a class folder added between a stop and --resume
    used to continue with another class order and more phases (removed: a size-mismatch traceback)."""
    from conftest import COLOURS

    root = aspect_folder(tmp_path / "data", train_per_class=6, test_per_class=2)
    raw = tiny_config(dataset="folder", data_root=str(root), shapes={}, image_size=16, input_size=16, init_cls=2,
                      increment=1, memory_size=8, batch_size=8, init_epochs=1, epochs=1)
    out = tmp_path / "run"
    run(raw, out, stop_after_phase=0)
    assert len(COLOURS) == 4
    shutil.copytree(root / "train" / "class3", root / "train" / "class9")
    shutil.copytree(root / "val" / "class3", root / "val" / "class9")
    with pytest.raises(UserError, match=r"phase_0.pt: the dataset's classes differ from the saved run's \(4 classes "
                                        r"\(class0, class2, class3, …\) then, 5 now"):
        run(raw, out, resume=True)
    shutil.rmtree(root / "train" / "class9")
    shutil.rmtree(root / "val" / "class9")
    shutil.rmtree(root / "train" / "class3")
    shutil.rmtree(root / "val" / "class3")
    with pytest.raises(UserError, match=r"4 classes .* then, 3 now"):
        run(raw, out, resume=True)

    # A finished run without checkpoints: a renamed class folder is another class too.
    data = aspect_folder(tmp_path / "data2", train_per_class=6, test_per_class=2)
    raw = {**raw, "data_root": str(data), "checkpoints": "none"}
    run(raw, tmp_path / "finished")
    for split in ("train", "val"):
        (data / split / "class3").rename(data / split / "class7")
    with pytest.raises(UserError, match=r"Cannot resume in .*finished: the dataset's classes differ"):
        run(raw, tmp_path / "finished", resume=True)


def test_a_fresh_run_removes_the_earlier_runs_files_and_nothing_else(tmp_path, tiny_reference):
    """A fresh run used to rmtree checkpoints/ (a file of another tool in it too) when any config.json
    was there, and to keep (append to) an earlier run's files when none was. Now: the files a run
    writes, by name, with a note, where config.json says they are a run's; without config.json, or
    with another tool's, the folder is refused and nothing is removed."""
    ref_out, _ = tiny_reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    (out / "exemplars_phase_1.png").write_bytes(b"png")
    (out / "checkpoints" / "best_model.pt").write_bytes(b"mine")
    (out / "checkpoints" / "phase_01.pt").write_bytes(b"a copy")
    (out / "notes.txt").write_text("mine")
    raw = tiny_config(**FAST)
    run(raw, out, stop_after_phase=0)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best_model.pt", "phase_0.pt", "phase_01.pt"]
    assert (out / "notes.txt").read_text() == "mine" and not (out / "exemplars_phase_1.png").exists()
    assert {m["phase"] for m in read_metrics(out)} == {0}
    log = (out / "log.txt").read_text()
    assert ("note: a fresh run (no --resume): removed 7 file(s) of an earlier run in this folder: results.json, "
            "metrics.jsonl, log.txt, exemplars_phase_1.png, checkpoints/phase_0.pt") in log
    assert [p["phase"] for p in run(raw, out, resume=True)["phases"]] == [0, 1]

    (out / "config.json").unlink()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(UserError, match=r"holds results.json, metrics.jsonl, log.txt, checkpoints/phase_0.pt … but no "
                                        r"config.json"):
        run(raw, out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    foreign = tmp_path / "foreign"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "config.json").write_text('{"lr": 0.01, "project": "mine"}')
    (foreign / "checkpoints" / "best_model.pt").write_bytes(b"mine")
    (foreign / "log.txt").write_text("my notes")
    with pytest.raises(UserError, match=r"holds a config.json that is not a config of this framework"):
        run(raw, foreign)
    assert sorted(p.name for p in foreign.rglob("*")) == ["best_model.pt", "checkpoints", "config.json", "log.txt"]


def test_only_checkpoint_names_of_the_form_phase_k_count(tmp_path):
    """``phase_1 copy.pt`` crashed --resume (and the Ctrl-C message); ``phase_0_backup.pt`` was read
    as phase 0."""
    from trainer import saved_checkpoints

    ckpts = tmp_path / "checkpoints"
    (ckpts / "phase_3.pt").mkdir(parents=True)
    for name in ("phase_1 copy.pt", "phase_0_backup.pt", "phase_2.pt", "phase_.pt", "phase_2.pt.bak", "phase_02.pt"):
        (ckpts / name).write_bytes(b"x")
    assert saved_checkpoints(tmp_path) == {2: ckpts / "phase_2.pt"}


def test_resume_drops_a_metrics_line_that_is_not_utf8(tmp_path, tiny_reference):
    ref_out, _ = tiny_reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    (out / "checkpoints" / "phase_2.pt").unlink()
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")
    run(tiny_config(), out, resume=True)
    assert without_seconds(read_metrics(out)) == without_seconds(read_metrics(ref_out))


@pytest.mark.parametrize("entry", ["results.json", "log.txt", "checkpoints"])
def test_an_entry_of_the_wrong_kind_in_the_run_folder_stops_before_training(tmp_path, entry):
    out = tmp_path / "run"
    out.mkdir()
    if entry == "checkpoints":
        (out / entry).write_text("x")
    else:
        (out / entry).mkdir()
    kind = "a file, not a folder" if entry == "checkpoints" else "a folder, not a file"
    with pytest.raises(UserError, match=rf"{out / entry} is {kind}, where the run keeps its {entry}"):
        run(tiny_config(**FAST), out)
    assert not (out / "metrics.jsonl").exists()


def test_a_resume_with_another_learner_names_model_name_first(tmp_path, tiny_reference):
    ref_out, _ = tiny_reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    with pytest.raises(UserError, match=r"its config differs from this one in model_name, [A-Z]"):
        run(tiny_config(model_name="lucir"), out, resume=True)


def test_a_resume_with_other_settings_says_so(tmp_path, tiny_reference):
    """Keys outside the run's identity (threads, device, eval_batch_size, ...) may change on resume;
    another thread count or device can change the numbers slightly, so the log names them."""
    ref_out, _ = tiny_reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    run(tiny_config(eval_batch_size=128), out, resume=True)   # (not threads: it would stay set for the suite)
    assert ("note: resuming with other settings than the saved run's (not part of its identity): eval_batch_size "
            "256 → 128.") in (out / "log.txt").read_text()


def test_a_last_step_that_breaks_the_network_stops_the_phase_before_it_is_saved(tmp_path):
    """One batch per epoch and a huge lr: the only step of phase 0 leaves weights whose outputs
    overflow, after a finite loss. The phase used to be evaluated (a constant argmax looks like 50 %),
    herded, saved and checkpointed; the run stopped only in phase 1."""
    out = tmp_path / "run"
    raw = tiny_config(**FAST, batch_size=1000, init_lr=1e30, lr=1e30)
    with pytest.raises(TrainingDiverged, match=r"phase 0: after stage\(s\) 'train' the network's outputs are not finite"):
        Trainer(resolve_config(raw), out, "tiny").run()
    assert not (out / "results.json").exists() and not (out / "checkpoints" / "phase_0.pt").exists()


def test_a_stage_of_0_epochs_says_so(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(**{**FAST, "epochs": 0}), out)
    assert "  stage train: 0 epochs, not trained" in (out / "log.txt").read_text()
