"""FOSTER on the procedural shapes data: class-balanced weights from real counts, the two-backbone teacher and
the one-backbone student, both reported, learning and resumption (student and teacher states).

Accuracy bounds (6 classes, chance 16.7 %): 2.5x chance for the last phase, well below what was
measured with this config (student last top-1 60.0 / 55.0 / 65.8, teacher 72.5 / 86.7 / 82.5 with
seeds 1993 / 1 / 7).
"""
from __future__ import annotations

import math
import re
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import read_metrics, read_results, run, tiny_config, without_seconds
from convs.foster_net import FosterNet
from convs.incremental_net import IncrementalNet
from convs.linears import SimpleLinear
from convs.registry import create_backbone
from models.base import Batch, Phase
from models.foster import FOSTER
from models.losses import balanced_kd_loss, class_balanced_weights, kd_loss
from trainer import Trainer
from utils.config import resolve_config

CHANCE = 100 / 6
FOSTER_RUN = dict(model_name="foster", convnet_type="resnet20",
                  shapes={"num_classes": 6, "train_per_class": 40, "test_per_class": 20},
                  batch_size=32, init_epochs=10, init_lr=0.1, epochs=8, lr=0.05, compression_epochs=12,
                  scheduler="cosine", checkpoints="all")


@pytest.fixture(scope="module")
def foster_run(tmp_path_factory):
    """(output folder, results, the Trainer after the run)."""
    out = tmp_path_factory.mktemp("foster") / "run"
    trainer = Trainer(resolve_config(tiny_config(**FOSTER_RUN)), out, "tiny")
    return out, trainer.run(), trainer


def _learner_state(out, k):
    return torch.load(out / "checkpoints" / f"phase_{k}.pt", map_location="cpu", weights_only=False)["learner"]


def _sub(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the math ---------------------------------------------------------------------------------

def test_class_balanced_weights_on_a_hand_made_count_table():
    counts = torch.tensor([20.0, 20.0, 13.0, 500.0, 480.0])
    beta = 0.96
    raw = [(1 - beta) / (1 - beta ** n) for n in (20, 20, 13, 500, 480)]
    expected = torch.tensor([r / sum(raw) * 5 for r in raw])
    w = class_balanced_weights(counts, beta)
    assert torch.allclose(w, expected, rtol=1e-6)
    assert w.sum().item() == pytest.approx(5.0)
    assert w[2] > w[0] > w[3] > 0 and w[3] == pytest.approx(w[4].item(), rel=1e-6)  # fewer samples, more weight
    assert torch.equal(class_balanced_weights(counts, 0.0), torch.ones(5))          # beta 0: no balancing
    assert torch.isfinite(class_balanced_weights(torch.tensor([0.0, 10.0]), 0.97)).all()


def test_balanced_kd_reweights_the_teacher_probabilities():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.allclose(balanced_kd_loss(s, t, 2.0, torch.ones(3)), kd_loss(s, t, 2.0))
    w = torch.tensor([2.0, 1.0, 0.5])
    q = F.softmax(t / 2, dim=1) * w
    q = q / q.sum(1, keepdim=True)
    expected = -(q * F.log_softmax(s / 2, dim=1)).sum(1).mean()
    assert torch.allclose(balanced_kd_loss(s, t, 2.0, w), expected)


def test_weights_come_from_the_trainers_counts_as_balance_counts_says():
    real = torch.tensor([7.0, 9.0, 40.0, 40.0])     # old: exemplars in memory; new: training images
    seen = {"ce": real + torch.tensor([5.0, 5.0, 0.0, 0.0]),   # + synthetic replay images in the CE
            "kd": real + torch.tensor([3.0, 3.0, 0.0, 0.0])}   # ... and in the KD (another source setting)
    budget = torch.tensor([20.0, 20.0, 40.0, 40.0])
    phase = Phase(1, 2, 4, ((0, 2), (2, 4)))
    for how, ce, kd in (("seen", seen["ce"], seen["kd"]), ("real", real, real), ("budget", budget, budget)):
        logged = []
        ctx = types.SimpleNamespace(class_counts=lambda phase: real.clone(),
                                    added_counts=lambda phase: {k: v - real for k, v in seen.items()},
                                    memory=types.SimpleNamespace(class_budget=lambda classes_seen: 40 // classes_seen),
                                    device=torch.device("cpu"), log=types.SimpleNamespace(info=logged.append))
        learner = FOSTER({"beta1": 0.95, "beta2": 0.97, "balance_counts": how}, ctx)
        learner.set_balance_weights(phase)
        assert torch.allclose(learner.boost_weights, class_balanced_weights(ce, 0.95)), how
        assert torch.allclose(learner.distill_weights, class_balanced_weights(kd, 0.97)), how
        old = ", ".join(str(int(v)) for v in ce[:2].tolist())
        assert f"class counts ({how}): old [{old}], new [40, 40]" in logged[0], logged
        assert ("class counts of the compression KD: old [10, 12], new [40, 40]" in logged[1]) == (how == "seen")


def test_synthetic_images_in_the_ce_count_in_the_weights_and_budget_counts_the_quota(tmp_path):
    """``seen`` adds the synthetic images that count in each loss to the old classes' n_c (the default
    ``real`` counts the exemplars alone); ``budget`` gives old classes the official code's
    memory_size // old classes, whatever CIM stores."""
    from test_synthetic_replay import make_folder, shape_ids

    root = make_folder(tmp_path / "syn", shape_ids(), per_class=6)
    quick = dict(model_name="foster", init_epochs=1, epochs=1, compression_epochs=1)
    counts = {}
    block_keys = ("ratio", "use_in_kd")
    seen = {"balance_counts": "seen"}
    for name, extra in (("seen", seen), ("real", {}), ("ratio", {**seen, "ratio": 0.5}),
                        ("no_kd", {**seen, "use_in_kd": False}),
                        ("budget", {"balance_counts": "budget", "compression": "cim"})):
        block = {"source": "folder", "path": str(root), "per_class": 6,
                 **{k: v for k, v in extra.items() if k in block_keys}}
        cfg = tiny_config(**quick, synthetic_replay=block, **{k: v for k, v in extra.items() if k not in block_keys})
        res = run(cfg, tmp_path / name)
        log = (tmp_path / name / "log.txt").read_text()
        found = re.findall(r"class counts \((\w+)\): old \[([\d., ]*)\], new \[([\d., ]*)\]", log)
        assert len(found) == 2, log
        kd_lines = re.findall(r"class counts of the compression KD: old \[([\d., ]*)\]", log)
        assert len(kd_lines) == (2 if name == "no_kd" else 0), log   # the KD's counts differ only there
        if kd_lines:
            kd_old = [[float(v) for v in old.split(",")] for old in kd_lines]
        counts[name] = [([float(v) for v in old.split(",")], [float(v) for v in new.split(",")], res)
                        for _, old, new in found]
    for k, (old, new, res) in enumerate(counts["real"], start=1):
        stored = res["phases"][k - 1]["memory"]["per_class"]
        assert old == stored
        assert counts["seen"][k - 1][0] == [n + 6 for n in stored] and counts["seen"][k - 1][1] == new
    # ratio 0.5, batch 32: the expected draws of the epoch, spread over the old classes
    old, new, res = counts["ratio"][0]
    epoch = int(sum(counts["real"][0][0]) + sum(counts["real"][0][1]))
    draws = sum(round(0.5 * min(32, epoch - s)) for s in range(0, epoch, 32) if min(32, epoch - s) >= 2)
    assert old == pytest.approx([n + draws / 2 for n in counts["real"][0][0]], abs=0.01)
    # use_in_kd false: the compression KD's weights count the real samples only
    assert [old for old, _, _ in counts["no_kd"]] == [old for old, _, _ in counts["seen"]]
    assert kd_old == [old for old, _, _ in counts["real"]]
    old, new, res = counts["budget"][1]
    assert old == [res["config"]["memory_size"] // 4] * 4
    assert res["phases"][1]["memory"]["per_class"] != old            # CIM stores more than the quota


def test_boosting_loss_is_balanced_ce_plus_fe_ce_plus_kd_on_old_classes():
    learner = FOSTER({"lambda_okd": 0.5, "T": 2.0}, ctx=None)
    learner.boost_weights = torch.tensor([1.2, 1.1, 0.9, 0.8])
    torch.manual_seed(1)
    out = {"logits": torch.randn(5, 4), "fe_logits": torch.randn(5, 4), "old_logits": torch.randn(5, 2)}
    y = torch.tensor([0, 1, 2, 3, 3])
    total, parts = learner.boosting_loss(out, Batch(None, y, y < 2))
    clf = F.cross_entropy(out["logits"] / learner.boost_weights, y)
    fe = F.cross_entropy(out["fe_logits"], y)
    kd = 0.5 * kd_loss(out["logits"][:, :2], out["old_logits"], 2.0)
    assert torch.allclose(parts["clf"], clf) and torch.allclose(parts["fe"], fe) and torch.allclose(parts["kd"], kd)
    assert torch.allclose(total, clf + fe + kd)


# ---- the networks -----------------------------------------------------------------------------

def test_teacher_holds_the_frozen_old_model_and_a_copy_of_its_backbone():
    old = IncrementalNet("resnet20")
    old.head = SimpleLinear(old.feature_dim, 2)
    old.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        old_out = old(x)
    teacher = FosterNet(old, 4, "resnet20")
    assert len(teacher.backbones) == 2 and teacher.backbones[0] is old.backbone
    assert _equal(teacher.backbones[0].state_dict(), teacher.backbones[1].state_dict())
    assert not any(p.requires_grad for p in teacher.backbones[0].parameters())
    assert not any(p.requires_grad for p in teacher.old_fc.parameters())
    assert all(p.requires_grad for m in (teacher.backbones[1], teacher.fc, teacher.fe_fc) for p in m.parameters())
    assert torch.equal(teacher.fc.weight[:2, :64], old.head.weight)
    teacher.train()
    assert not teacher.backbones[0].training and teacher.backbones[1].training
    teacher.eval()
    with torch.no_grad():
        out = teacher(x)
    assert out["logits"].shape == (3, 4) and out["fe_logits"].shape == (3, 4) and out["features"].shape == (3, 128)
    assert torch.allclose(out["old_logits"], old_out["logits"], atol=1e-6)


# ---- a real run (foster_deploy: teacher, the default) -------------------------------------------------------------------------------

def test_at_most_two_backbones_and_the_student_matches_the_config(foster_run):
    out, results, trainer = foster_run
    learner = trainer.learner
    student, teacher = learner.net, learner.teacher
    assert isinstance(student, IncrementalNet) and isinstance(teacher, FosterNet)
    reference = create_backbone("resnet20").state_dict()
    got = student.backbone.state_dict()
    assert got.keys() == reference.keys() and all(got[k].shape == reference[k].shape for k in got)
    assert student.head.weight.shape == (6, 64)
    assert len(teacher.backbones) == 2
    params = [p["params"] for p in results["phases"]]
    assert [p["backbones"] for p in params] == [1, 1, 1]
    assert [p["teacher_backbones"] for p in params] == [None, 2, 2]
    backbone = sum(v.numel() for v in create_backbone("resnet20").parameters())
    assert [p["total"] for p in params] == [backbone + 64 * c for c in (2, 4, 6)]
    # The carried model is the student: the next phase's teacher is built on it.
    for k in (1, 2):
        prev, cur = _learner_state(out, k - 1), _learner_state(out, k)
        assert _equal(_sub(prev["net"], "backbone."), _sub(cur["teacher"], "backbones.0."))
        assert _equal(_sub(prev["net"], "head."), _sub(cur["teacher"], "old_fc."))
    assert "teacher" not in _learner_state(out, 0)


def test_boosting_and_compression_run_in_every_later_phase(foster_run):
    out, _, _ = foster_run
    metrics = read_metrics(out)
    assert {m["stage"] for m in metrics if m["phase"] == 0} == {"train"}
    for k in (1, 2):
        boost = [m for m in metrics if m["phase"] == k and m["stage"] == "boosting"]
        comp = [m for m in metrics if m["phase"] == k and m["stage"] == "compression"]
        assert len(boost) == 8 and len(comp) == 12                # epochs, compression_epochs
        assert all(set(m["losses"]) == {"loss", "clf", "fe", "kd"} for m in boost)
        assert all(set(m["losses"]) == {"loss", "bkd"} for m in comp)
        # cosine from lr over compression_epochs (the logged rate is the one the epoch used)
        assert comp[0]["lr"] == pytest.approx(0.05)
        assert comp[1]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi / 12)) / 2)


def test_counts_are_real_exemplar_and_image_counts(foster_run):
    out, results, _ = foster_run
    logged = re.findall(r"class counts \(real\): old \[([\d, ]*)\], new \[([\d, ]*)\]", (out / "log.txt").read_text())
    assert len(logged) == 2
    for k, (old, new) in enumerate(logged, start=1):
        assert [int(v) for v in old.split(",")] == results["phases"][k - 1]["memory"]["per_class"]
        assert [int(v) for v in new.split(",")] == [40, 40]


def test_teacher_is_deployed_and_the_student_reported(foster_run):
    """Published protocol (SPEC.md §4): the two-backbone teacher is evaluated as `cnn`, herds and
    gives the NME means; the student is reported beside it and carried into the next phase."""
    _, results, trainer = foster_run
    phases, summary = results["phases"], results["summary"]
    for p in phases:
        assert p["student"].keys() == p["cnn"].keys() and "teacher" not in p
    assert phases[0]["student"] == phases[0]["cnn"]               # phase 0: one network, both roles
    assert [p["deployed"] for p in phases] == ["single network", "teacher", "teacher"]
    assert summary["cnn_model"] == "teacher"
    assert summary["student_last_top1"] == phases[-1]["student"]["top1"]
    assert summary["student_avg_top1"] == pytest.approx(sum(p["student"]["top1"] for p in phases) / 3, abs=1e-3)
    assert summary["cnn_last_top1"] == phases[-1]["cnn"]["top1"]
    # inference() — what the trainer evaluates, herds with and computes NME means with — is the teacher
    learner = trainer.learner
    x = torch.randn(4, 3, 16, 16)
    learner.teacher.eval(), learner.net.eval()
    with torch.no_grad():
        got, want = learner.inference(x), learner.teacher(x)
    assert torch.equal(got["logits"], want["logits"]) and got["features"].shape == (4, 128)


def test_foster_deploy_student_evaluates_and_herds_with_the_student(tmp_path):
    raw = tiny_config(**{**FOSTER_RUN, "init_epochs": 1, "epochs": 1, "compression_epochs": 1, "num_phases": 2},
                      foster_deploy="student")
    trainer = Trainer(resolve_config(raw), tmp_path / "run", "tiny")
    results = trainer.run()
    assert "teacher" in results["phases"][1] and "student" not in results["phases"][1]
    assert results["summary"]["cnn_model"] == "student"
    x = torch.randn(2, 3, 16, 16)
    trainer.learner.net.eval()
    with torch.no_grad():
        assert trainer.learner.inference(x)["features"].shape == (2, 64)


def test_foster_learns_well_above_chance(foster_run):
    _, results, _ = foster_run
    phases = results["phases"]
    assert phases[0]["cnn"]["top1"] >= 80                          # 2 classes; measured 90-97.5
    assert phases[-1]["cnn"]["top1"] >= 2.5 * CHANCE               # teacher (deployed)
    assert phases[-1]["student"]["top1"] >= 2.5 * CHANCE           # student


def test_resume_matches_an_uninterrupted_run_student_and_teacher_included(foster_run, tmp_path):
    ref_out, ref, _ = foster_run
    out = tmp_path / "run"
    run(tiny_config(**FOSTER_RUN), out, stop_after_phase=1)
    assert set(_learner_state(out, 1)) == {"net", "teacher"}
    resumed = run(tiny_config(**FOSTER_RUN), out, resume=True)
    assert "resume: restored phase 1" in (out / "log.txt").read_text()
    assert without_seconds(resumed) == without_seconds(ref)
    assert without_seconds(read_results(out)) == without_seconds(read_results(ref_out))
    a, b = _learner_state(out, 2), _learner_state(ref_out, 2)
    assert set(a) == set(b) == {"net", "teacher"}
    assert _equal(a["net"], b["net"]) and _equal(a["teacher"], b["teacher"])
