"""DER on the procedural shapes data: a frozen backbone per phase, the auxiliary loss, weight alignment,
parameter reports, learning and resumption.

Accuracy bound (6 classes, chance 16.7 %): 2.5x chance for the last phase, well below what was
measured with this config (last top-1 63.3 / 74.2 / 76.7 with seeds 1993 / 1 / 7).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from conftest import read_metrics, read_results, run, tiny_config, without_seconds
from convs.der_net import DERNet
from convs.linears import SimpleLinear
from models.base import Batch
from models.der import DER

CHANCE = 100 / 6
DER_RUN = dict(model_name="der", convnet_type="resnet20",
               shapes={"num_classes": 6, "train_per_class": 40, "test_per_class": 20},
               batch_size=32, init_epochs=10, init_lr=0.1, init_milestones=[], epochs=8, lr=0.05, milestones=[],
               scheduler="cosine", checkpoints="all")


@pytest.fixture(scope="module")
def der_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("der") / "run"
    return out, run(tiny_config(**DER_RUN), out)


def _ckpt(out, k):
    return torch.load(out / "checkpoints" / f"phase_{k}.pt", map_location="cpu", weights_only=False)["learner"]["net"]


def _backbone_state(state, j):
    return {k: v for k, v in state.items() if k.startswith(f"backbones.{j}.")}


# ---- the network ------------------------------------------------------------------------------

def test_new_backbone_copies_the_newest_and_the_others_are_frozen():
    net = DERNet("resnet20")
    net.add_backbone()
    net.fc = SimpleLinear(net.feature_dim, 2)
    with torch.no_grad():   # make the first backbone differ from a fresh one
        for p in net.backbones[0].parameters():
            p.add_(0.01)
    net.add_backbone()
    assert len(net.backbones) == 2
    first, second = (b.state_dict() for b in net.backbones)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert second[next(iter(second))].data_ptr() != first[next(iter(first))].data_ptr()   # a copy
    assert not any(p.requires_grad for p in net.backbones[0].parameters())
    assert all(p.requires_grad for p in net.backbones[1].parameters())
    net.train()
    assert not net.backbones[0].training and net.backbones[1].training   # frozen BN statistics


def test_forward_concatenates_backbones_and_the_aux_head_reads_the_newest():
    net = DERNet("resnet20")
    net.add_backbone()
    net.add_backbone()
    d = net.backbone_dim
    net.fc = SimpleLinear(2 * d, 5)
    net.aux_fc = SimpleLinear(d, 4)
    net.eval()
    x = torch.randn(3, 3, 16, 16)
    out = net(x)
    assert out["features"].shape == (3, 2 * d) and out["fmap"].shape[:2] == (3, 2 * d)
    assert out["logits"].shape == (3, 5) and out["aux_logits"].shape == (3, 4)
    newest = net.backbones[1](x)["features"]
    assert torch.allclose(out["features"][:, d:], newest)
    assert torch.allclose(out["aux_logits"], net.aux_fc(newest)["logits"])


def test_aux_loss_maps_old_classes_to_one_bucket():
    learner = DER({"aux_weight": 0.5}, ctx=None)
    logits = torch.randn(4, 5)            # 2 old + 3 new classes
    aux = torch.randn(4, 4)               # 3 new + 1 "old" bucket
    y = torch.tensor([0, 1, 2, 4])
    total, parts = learner.loss({"logits": logits, "aux_logits": aux}, Batch(None, y, y < 2))
    expected_aux = F.cross_entropy(aux, torch.tensor([0, 0, 1, 3]))
    assert torch.allclose(parts["aux"], expected_aux)
    assert torch.allclose(total, F.cross_entropy(logits, y) + 0.5 * expected_aux)
    ce_only, parts0 = learner.loss({"logits": logits}, Batch(None, y, y < 0))   # phase 0: no aux head
    assert set(parts0) == {"ce"} and torch.allclose(ce_only, F.cross_entropy(logits, y))


# ---- a real run -------------------------------------------------------------------------------

def test_each_phase_adds_a_backbone_and_old_ones_stay_bit_identical(der_run):
    out, _ = der_run
    states = [_ckpt(out, k) for k in range(3)]
    for k in range(1, 3):
        assert len({key.split(".")[1] for key in states[k] if key.startswith("backbones.")}) == k + 1
        for j in range(k):   # every earlier backbone, parameters and BatchNorm buffers alike
            before, after = _backbone_state(states[k - 1], j), _backbone_state(states[k], j)
            assert before.keys() == after.keys()
            assert all(torch.equal(before[key], after[key]) for key in before), (k, j)
        # ... while the new backbone (copied from backbone k-1) was trained.
        new = _backbone_state(states[k], k)
        prev = _backbone_state(states[k - 1], k - 1)
        assert any(not torch.equal(new[key.replace(f"backbones.{k - 1}.", f"backbones.{k}.", 1)], v)
                   for key, v in prev.items() if v.is_floating_point())


def test_classifier_spans_all_backbones_and_new_rows_are_weight_aligned(der_run):
    out, results = der_run
    for k, phase in enumerate(results["phases"]):
        first, last = phase["classes"]
        w = _ckpt(out, k)["fc.weight"]
        assert w.shape == (last, 64 * (k + 1))      # resnet20: 64 features per backbone
        if k > 0:
            norms = w.norm(dim=1)
            assert norms[first:].mean().item() == pytest.approx(norms[:first].mean().item(), rel=1e-5)
    assert (out / "log.txt").read_text().count("weight alignment") == 2


def test_loss_has_the_aux_term_in_later_phases_only(der_run):
    out, _ = der_run
    metrics = read_metrics(out)
    assert all(set(m["losses"]) == {"loss", "ce"} for m in metrics if m["phase"] == 0)
    later = [m for m in metrics if m["phase"] > 0]
    assert later and all(set(m["losses"]) == {"loss", "ce", "aux"} and m["losses"]["aux"] > 0 for m in later)


def test_parameter_counts_per_phase_are_reported(der_run):
    out, results = der_run
    params = [p["params"] for p in results["phases"]]
    assert [p["backbones"] for p in params] == [1, 2, 3]
    one = params[0]["total"]
    assert params[0]["trainable"] == one
    for k in (1, 2):
        # k+1 backbones; only the newest one and the heads train.
        assert params[k]["total"] > params[k - 1]["total"] + 0.9 * one
        assert params[k]["trainable"] < 1.1 * one
    assert read_results(out)["phases"][2]["params"] == params[2]
    assert "params   {'total'" in (out / "log.txt").read_text()


def test_der_learns_well_above_chance(der_run):
    _, results = der_run
    phases = results["phases"]
    assert phases[0]["cnn"]["top1"] >= 80                          # 2 classes; measured 90-97.5
    assert phases[-1]["cnn"]["top1"] >= 2.5 * CHANCE               # measured 63-77
    assert phases[-1]["nme"]["top1"] >= 2.5 * CHANCE               # measured 74-86


def test_resume_matches_an_uninterrupted_run(der_run, tmp_path):
    ref_out, ref = der_run
    out = tmp_path / "run"
    partial = run(tiny_config(**DER_RUN), out, stop_after_phase=1)
    assert len(partial["phases"]) == 2
    resumed = run(tiny_config(**DER_RUN), out, resume=True)
    assert "resume: restored phase 1" in (out / "log.txt").read_text()
    assert without_seconds(resumed) == without_seconds(ref)
    a, b = _ckpt(out, 2), _ckpt(ref_out, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
