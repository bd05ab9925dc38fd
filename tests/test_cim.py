"""The CIM plugin (models/cim.py): policies, artifact augmentation, the bilevel step, the memory
with compression on, every learner end to end, resume equality, the exemplar figure."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import REPO, run, tiny_config, without_seconds
from convs.activation import activation_sites
from models.cim import ExemplarCompression, center_boxes, random_boxes
from trainer import Trainer
from utils.compression import compress_images
from utils.config import resolve_config
from utils.errors import ConfigError
from utils.stage_data import EXEMPLAR, NEW, RawBatch

# One epoch per phase: enough to exercise every hook (boxes refreshed every epoch, p > 0 from epoch 1).
QUICK = {"init_epochs": 2, "epochs": 2, "cam_update_interval": 1, "randombbxblur_prob_incre": 0.5,
         "num_meta_iters_per_cls": 1.0, "meta_batch_size": 8}


def _trainer(tmp_path, **overrides) -> Trainer:
    return Trainer(resolve_config(tiny_config(**{**QUICK, **overrides})), tmp_path / "run", "tiny")


# ---- boxes of the simple policies ---------------------------------------------------------------

def test_center_and_random_boxes_have_the_asked_area():
    assert center_boxes(2, 16, 0.25).tolist() == [[4, 12, 4, 12]] * 2
    assert center_boxes(1, 15, 1.0).tolist() == [[0, 15, 0, 15]]
    assert center_boxes(1, 16, 0.0).tolist() == [[0, 0, 0, 0]]          # the empty-box convention
    assert random_boxes(3, 16, 0.0, torch.Generator()).tolist() == [[0, 0, 0, 0]] * 3
    b = random_boxes(500, 20, 0.36, torch.Generator().manual_seed(0))
    assert ((b[:, 1] - b[:, 0]) == 12).all() and ((b[:, 3] - b[:, 2]) == 12).all()
    assert b.min() >= 0 and b[:, 1].max() <= 20 and b[:, 3].max() <= 20
    assert len({tuple(r) for r in b.tolist()}) > 50          # positions really vary


# ---- config ---------------------------------------------------------------------------------------

def test_compression_needs_a_learner_with_memory():
    with pytest.raises(ConfigError, match="compression"):
        resolve_config(tiny_config(model_name="finetune", compression="cam"))
    with pytest.raises(ConfigError, match="compression"):
        resolve_config(tiny_config(compression="blur"))
    with pytest.raises(ConfigError, match="compress_ratio"):
        resolve_config(tiny_config(compression="cam", compress_ratio=0.5))


def test_plugin_is_off_without_compression(tmp_path):
    t = Trainer(resolve_config(tiny_config()), tmp_path / "run", "tiny")
    assert t.plugins == []


# ---- PAU switching and the bilevel step ------------------------------------------------------------

def _ready_for_bilevel(tmp_path, **overrides):
    """A trainer in phase 0 of a ``cim`` run, just before the first epoch (stage data set up)."""
    t = _trainer(tmp_path, compression="cim", **overrides)
    plugin: ExemplarCompression = t.plugins[0]
    phase = t.phases()[0]
    t.learner.grow_network(phase)
    plugin.after_grow(phase)
    t.learner_to_device()
    t.learner.begin_phase(phase)
    plugin.before_phase(phase)
    stage = t.learner.stages(phase)[0]
    plugin.before_stage(phase, stage, t.stage_data(phase, stage.data))
    return t, plugin, phase, stage


def test_every_activation_site_gets_a_pau_and_switches(tmp_path):
    t, plugin, phase, stage = _ready_for_bilevel(tmp_path)
    net = t.learner.net
    sites = activation_sites(net)
    assert sites and all(s.pau is not None for s in sites)
    assert len(plugin.phi()) == 2 * len(sites)                 # numerator + denominator per site
    with net.activations("pau"):
        assert all(s.mode == "pau" for s in sites)
    assert all(s.mode == "relu" for s in sites)
    # The PAUs are φ's, never θ's: the stage optimiser leaves them out.
    opt, _ = t._optimizer(stage)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in plugin.phi()}


def test_bilevel_step_changes_phi_and_only_phi(tmp_path):
    t, plugin, phase, stage = _ready_for_bilevel(tmp_path)
    net = t.learner.net
    phi_ids = {id(p) for p in plugin.phi()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    phi_before = [p.detach().clone() for p in plugin.phi()]
    plugin.bilevel_epoch(phase, stage, lr=0.1)
    assert plugin.meta_iterations == int(QUICK["num_meta_iters_per_cls"] * phase.num_new)
    assert plugin.meta_skipped == 0
    changed = [not torch.equal(a, p.detach()) for a, p in zip(phi_before, plugin.phi())]
    assert any(changed)
    names_of_phi = {n for n, p in net.named_parameters() if id(p) in phi_ids}
    for k, v in net.state_dict().items():
        if k not in names_of_phi:
            assert torch.equal(v, before[k]), f"{k} changed in the bilevel step"
    for _, p in net.named_parameters():
        if id(p) not in phi_ids:
            assert p.grad is None or not p.grad.abs().sum()


def test_the_bilevel_step_leaves_the_generator_of_the_picks_alone(tmp_path):
    """Under torchrun rank 0 alone runs the bilevel step while every rank draws the artifact
    augmentation's picks; had the step drawn from the picks' generator, rank 0's picks would part
    from the other ranks' (and from one process's) after the first epoch."""
    t, plugin, phase, stage = _ready_for_bilevel(tmp_path)
    picks_state = plugin.generator.get_state()
    meta_state = plugin.meta_generator.get_state()
    plugin.bilevel_epoch(phase, stage, lr=0.1)
    assert plugin.meta_iterations > 0
    assert torch.equal(plugin.generator.get_state(), picks_state)
    assert not torch.equal(plugin.meta_generator.get_state(), meta_state)


def test_the_bilevel_step_never_feeds_the_parameters_gradient_accumulators(tmp_path):
    """The step differentiates with respect to aliases of the parameters: a hook on a parameter's
    gradient (which fires when its accumulator is fed) stays silent. On a GPU an accumulator held
    from the training stream (by the last training step's graph, or by DDP) and fed from the
    stream a CUDA graph records on makes the recording fail."""
    t, plugin, phase, stage = _ready_for_bilevel(tmp_path)
    fed = []
    for name, p in t.learner.net.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, name=name: fed.append(name))
    phi_before = [p.detach().clone() for p in plugin.phi()]
    plugin.bilevel_epoch(phase, stage, lr=0.1)
    assert plugin.meta_iterations > 0 and fed == []
    assert any(not torch.equal(a, p.detach()) for a, p in zip(phi_before, plugin.phi()))


def test_a_nonfinite_bilevel_iteration_is_skipped_on_the_device(tmp_path):
    """A NaN outer loss (here: a BatchNorm variance below zero in the eval-mode network) leaves φ
    and its optimiser exactly as they were; the skip is counted on the device and read at the
    phase's report, where no applied iteration means no last outer loss."""
    t, plugin, phase, stage = _ready_for_bilevel(tmp_path)
    bn = next(m for m in t.learner.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var.fill_(-1.0)
    phi_before = [p.detach().clone() for p in plugin.phi()]
    plugin.bilevel_epoch(phase, stage, lr=0.1)
    iters = int(QUICK["num_meta_iters_per_cls"] * phase.num_new)
    assert plugin.meta_skipped == iters and plugin.meta_iterations == 0
    assert all(torch.equal(a, p.detach()) for a, p in zip(phi_before, plugin.phi()))
    assert not plugin.phi_opt.exp_avg.any() and float(plugin.phi_opt.steps) == 0
    bilevel = plugin.phase_report(phase)["compression"]["bilevel"]
    assert bilevel["iterations"] == 0 and bilevel["skipped_nonfinite"] == iters
    assert bilevel["last_outer_loss"] is None
    # and once the statistics are sound again, the iterations apply
    bn.running_var.fill_(1.0)
    plugin.bilevel_epoch(phase, stage, lr=0.1)
    assert plugin.meta_iterations == iters and plugin.meta_skipped == iters
    assert math.isfinite(plugin.last_outer_loss)


def test_the_first_bilevel_step_moves_each_phi_coefficient_by_the_learning_rate(tmp_path):
    """Known answer: Adam's first step moves every coefficient with a non-zero gradient g by
    lr · |g| / (|g| + eps) (m̂ / √v̂ = sign g, whatever the clipping), i.e. by lr but for the rare
    tiny gradient; with no weight decay and one iteration."""
    t, plugin, phase, stage = _ready_for_bilevel(tmp_path, num_meta_iters_per_cls=1.0 / 2, phi_weight_decay=0.0,
                                                 init_phi_lr=0.01)
    assert int(plugin.cfg["num_meta_iters_per_cls"] * phase.num_new) == 1
    phi_before = [p.detach().clone() for p in plugin.phi()]
    plugin.bilevel_epoch(phase, stage, lr=0.1)          # epoch 0: the cosine rate is init_phi_lr
    assert plugin.meta_iterations == 1
    moves = torch.cat([(p.detach() - a).abs().flatten() for a, p in zip(phi_before, plugin.phi())])
    moved = moves[moves > 0]
    assert moved.numel() > 0.9 * moves.numel()
    assert float(moved.max()) <= 0.01 * (1 + 1e-5)
    assert float((moved > 0.01 * (1 - 1e-3)).float().mean()) > 0.95


def test_phi_gradient_flows_through_the_inner_step(tmp_path):
    """With div and reg switched off, φ still gets a gradient: only through θ⁺ = θ − β∇θL(x̃(φ))."""
    t, plugin, phase, stage = _ready_for_bilevel(tmp_path, div_coef=0.0, reg_coef=0.0)
    phi_before = [p.detach().clone() for p in plugin.phi()]
    plugin.bilevel_epoch(phase, stage, lr=0.1)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(phi_before, plugin.phi()))
    # and with a zero inner step size nothing reaches φ through θ⁺:
    t2, plugin2, phase2, stage2 = _ready_for_bilevel(tmp_path / "b", div_coef=0.0, reg_coef=0.0, lr_ratio=0.0,
                                                     phi_weight_decay=0.0)
    phi2 = [p.detach().clone() for p in plugin2.phi()]
    plugin2.bilevel_epoch(phase2, stage2, lr=0.1)
    assert all(torch.equal(a, p.detach()) for a, p in zip(phi2, plugin2.phi()))


# ---- artifact augmentation ------------------------------------------------------------------------

def test_artifact_probability_grows_by_interval(tmp_path):
    t = _trainer(tmp_path, compression="cam", cam_update_interval=40, randombbxblur_prob_incre=0.1)
    p = t.plugins[0].augment_probability
    assert [p(e) for e in (0, 39, 40, 79, 80, 169)] == pytest.approx([0, 0, 0.1, 0.1, 0.2, 0.4])


def _ready_for_artifacts(tmp_path):
    """The ``center`` policy's plugin in phase 0's stage, artifact probability 1 from epoch 1."""
    t = _trainer(tmp_path, compression="center", box_area=0.25, randombbxblur_prob_incre=1.0,
                 cam_update_interval=1)
    plugin = t.plugins[0]
    phase = t.phases()[0]
    plugin.before_phase(phase)
    data = t.stage_data(phase, "phase")
    stage = type("S", (), {"data": "phase", "model": None})()
    plugin.before_stage(phase, stage, data)
    return plugin, data, stage


def test_artifact_augmentation_compresses_new_images_only(tmp_path):
    plugin, data, stage = _ready_for_artifacts(tmp_path)
    batch = data.images[:6].clone()
    origin = data.origin[:6].clone()
    origin[:2] = EXEMPLAR                                          # two "exemplars"
    raw = RawBatch(batch, data.labels[:6], origin, data.index[:6])
    out = plugin.before_augment(batch, raw, stage, epoch=1)   # p = 1
    assert torch.equal(out[:2], batch[:2])
    expect = compress_images(batch[2:], center_boxes(4, 16, 0.25), 4.0)
    assert torch.equal(out[2:], expect) and not torch.equal(out[2:], batch[2:])
    assert torch.equal(plugin.before_augment(batch, raw, stage, epoch=0), batch)   # p = 0


def test_artifact_picks_reach_the_device_without_a_host_sync(tmp_path, monkeypatch):
    """The picks are drawn on the host every step; they go to the device through
    ``batching.to_device`` (pinned memory, non-blocking), never a plain copy, which on a GPU waits
    for the queue to drain (caught by review: a ``.to(device)`` had stayed there)."""
    import models.cim as cim_module

    plugin, data, stage = _ready_for_artifacts(tmp_path)
    moved = []
    real = cim_module.batching.to_device
    monkeypatch.setattr(cim_module.batching, "to_device", lambda x, d: moved.append(x) or real(x, d))
    raw = RawBatch(data.images[:6], data.labels[:6], data.origin[:6], data.index[:6])
    plugin.before_augment(data.images[:6], raw, stage, epoch=1)
    assert [(m.dtype, m.shape) for m in moved] == [(torch.bool, (6,))]


def test_picked_rows_compress_alike_with_and_without_a_host_sync():
    """The GPU way (compress every row, keep the picked ones with torch.where: no host sync) gives
    the images the CPU way (compress the picked rows only) does; unpicked rows are untouched."""
    from models.cim import compress_picked

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 16, 16), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[2, 10, 3, 12]] * 7)
    pick = torch.tensor([True, False, True, True, False, False, True])
    by_rows = compress_picked(images, pick, boxes, 4.0, sync_free=False)
    by_where = compress_picked(images, pick, boxes, 4.0, sync_free=True)
    assert torch.equal(by_rows, by_where)
    assert torch.equal(by_rows[~pick], images[~pick]) and not torch.equal(by_rows[pick], images[pick])
    assert torch.equal(by_rows[pick], compress_images(images[pick], boxes[pick], 4.0))
    none = torch.zeros(7, dtype=torch.bool)
    assert torch.equal(compress_picked(images, none, boxes, 4.0, sync_free=True), images)
    assert compress_picked(images, none, boxes, 4.0, sync_free=False) is images


def test_foster_compression_stage_keeps_the_boosting_probability_and_boxes(tmp_path):
    """FOSTER's compression stage trains the student, not the CAM network (the teacher): as in the
    official code (one loader for both stages) it goes on with the p and the boxes boosting ended
    with, instead of starting the schedule again at p = 0."""
    t = _trainer(tmp_path, model_name="foster", compression="center", epochs=3, compression_epochs=2,
                 cam_update_interval=1, randombbxblur_prob_incre=0.25)
    plugin = t.plugins[0]
    seen = []
    original = plugin.before_augment

    def spy(images, batch, stage, epoch):
        out = original(images, batch, stage, epoch)
        p = plugin.augment_probability(epoch) if plugin.fixed_p is None else plugin.fixed_p
        seen.append((plugin.phase.index, stage.name, epoch, p, plugin.refreshes, plugin.box_table))
        return out

    plugin.before_augment = spy
    t.run()
    later = [s for s in seen if s[0] == 1]
    boosting = {e: (p, n, tab) for _, name, e, p, n, tab in later if name == "boosting"}
    compression = {e: (p, n, tab) for _, name, e, p, n, tab in later if name == "compression"}
    assert [boosting[e][0] for e in range(3)] == pytest.approx([0.0, 0.25, 0.5])
    assert [compression[e][0] for e in range(2)] == pytest.approx([0.5, 0.5])
    refreshes_at_end_of_boosting = boosting[2][1]
    assert all(n == refreshes_at_end_of_boosting for _, n, _ in compression.values())   # no new refresh
    assert all(tab is boosting[2][2] for _, _, tab in compression.values())            # the same boxes


def test_cams_leave_the_network_mode_and_empty_input_alone(tmp_path):
    t, plugin, phase, stage = _ready_for_bilevel(tmp_path)
    net = t.learner.cam_network()
    data = t.stage_data(phase, "phase")
    images, labels = data.images, data.labels
    net.train()
    plugin.cams(images[:3], labels[:3])
    assert net.training
    net.eval()
    plugin.cams(images[:3], labels[:3])
    assert not net.training
    assert plugin.boxes(images[:0], labels[:0]).shape == (0, 4)


class _Unreadable(torch.utils.data.Dataset):
    """A streamed source whose every read fails the test."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        raise AssertionError(f"image {i} was read")


@pytest.mark.parametrize("policy", ["full", "center", "random"])
def test_pixel_free_boxes_are_refreshed_without_reading_an_image(tmp_path, policy):
    """The artifact boxes of a policy that ignores the pixels are drawn without decoding the
    stage's images (a streamed ImageNet stage would decode every new image at each refresh), and
    are the boxes that policy gives the images batch by batch (the same draws of ``random``)."""
    t, plugin, phase, _ = _ready_for_bilevel(tmp_path, cam_batch_size=7, eval_batch_size=5)
    plugin.policy = policy
    data = plugin.stage_data
    new = (data.origin == NEW).nonzero().flatten()
    assert new.numel() > 2 * 7
    start = plugin.generator.get_state()
    expect = torch.cat([plugin.boxes(data.images[c], data.labels[c]) for c in new.split(7)])
    after = plugin.generator.get_state()
    plugin.generator.set_state(start)
    data.images = _Unreadable(len(data.labels))
    plugin.refresh_boxes()
    table = plugin.box_table
    assert torch.equal(table[data.index[new]], expect)
    assert torch.equal(plugin.generator.get_state(), after)
    assert int(table.abs().sum()) == int(expect.abs().sum())    # no other row has a box
    if policy != "full":
        assert (expect[:, 1] > expect[:, 0]).all()
    if policy == "random":
        assert len({tuple(b) for b in expect.tolist()}) > 1


@pytest.mark.parametrize("policy", ["random", "cim"])
def test_the_memory_compressor_gives_each_share_the_rows_one_process_gets(tmp_path, policy):
    """The memory update hands the compressor a share (rows of the class's n images) per process.
    Every process's plugin starts from the same generator state; ``random`` draws for all n and
    keeps its rows, so the shares (an empty one too) concatenate to one process's boxes and every
    generator ends in step with it; ``cim`` boxes each image from its own CAM."""
    t, plugin, phase, _ = _ready_for_bilevel(tmp_path)
    plugin.policy = policy
    images = t.ctx.training_images(t.ctx.class_index(0))
    n = images.shape[0]
    compress = plugin.compressor(phase)
    start = plugin.generator.get_state()
    whole = compress(images, 0, slice(0, n), n)
    after_one = plugin.generator.get_state()
    for shares in (2, 3, n + 1):   # n + 1 processes: one of them has no rows
        parts = []
        for r in range(shares):
            plugin.generator.set_state(start)   # every process's own plugin, in the same state
            rows = slice(n * r // shares, n * (r + 1) // shares)
            parts.append(compress(images[rows], 0, rows, n))
            assert torch.equal(plugin.generator.get_state(), after_one), (shares, r)
        assert torch.equal(torch.cat(parts), whole), shares
    assert whole.shape == (n, 4) and len({tuple(b) for b in whole.tolist()}) > 1


def test_bilevel_batches_do_not_overlap_within_an_epoch(tmp_path):
    t, plugin, phase, stage = _ready_for_bilevel(tmp_path, meta_batch_size=4)
    order = plugin._meta_order(3)
    n = len(plugin.stage_data)
    assert order.numel() == 24 <= n
    assert len(set(order.tolist())) == 24                       # one shuffled pass: no repeats
    long = plugin._meta_order(n)                                # more than one pass: every index twice
    assert torch.equal(torch.bincount(long[:2 * n], minlength=n), torch.full((n,), 2))


def test_later_phase_clip_defaults_to_sqrt2_times_the_first(tmp_path):
    t = _trainer(tmp_path, compression="cim", max_phi_grad_norm=3.0)
    plugin, phases = t.plugins[0], t.phases()
    assert plugin.phi_clip(phases[0]) == 3.0
    assert plugin.phi_clip(phases[1]) == pytest.approx(3.0 * math.sqrt(2.0))
    t2 = _trainer(tmp_path / "b", compression="cim", max_phi_grad_norm=3.0, incre_max_phi_grad_norm=0.5)
    assert t2.plugins[0].phi_clip(t2.phases()[1]) == 0.5


# ---- memory with compression on -------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["full", "center", "cam"])
def test_memory_within_budget_and_more_exemplars_than_plain(tmp_path, policy):
    plain = run(tiny_config(**QUICK), tmp_path / "plain")
    res = run(tiny_config(compression=policy, box_area=0.25, **QUICK), tmp_path / policy)
    for p, q in zip(res["phases"], plain["phases"]):
        mem = p["memory"]
        assert mem["used"] <= mem["budget"] + 1e-6
        assert mem["exemplars"] > q["memory"]["exemplars"]
        assert mem["bytes"] <= mem["bytes_budget"] * 1.02     # bytes ≈ cost × full-image bytes
        assert mem["bytes"] == pytest.approx(mem["used"] * 3 * 16 * 16, rel=0.1)
        if policy == "full":
            assert mem["mean_cost"] == pytest.approx(0.25)
        if policy == "center":
            assert mem["mean_cost"] == pytest.approx(0.25 + 0.75 / 4)


def test_ratio_is_honoured_by_the_stored_exemplars(tmp_path):
    t = _trainer(tmp_path, compression="full", compress_ratio=16.0)
    t.run()
    ex = t.memory.classes[0]
    assert ex.compressed and ex.ratio == 16.0
    assert torch.allclose(ex.costs, torch.full_like(ex.costs, 1 / 16))
    originals = t.train_images[ex.source_index]
    assert torch.equal(ex.decode(), compress_images(originals, ex.boxes, 16.0))
    assert ex.nbytes() == len(ex) * 3 * 4 * 4                      # 16 px / sqrt(16) = 4 px


# ---- every learner x policy end to end --------------------------------------------------------------

LEARNER_KEYS = {"icarl": {}, "lucir": {"cbf_epochs": 1, "cbf_milestones": []}, "der": {},
                "foster": {"compression_epochs": 1, "beta1": 0.96}}


@pytest.mark.parametrize("learner", sorted(LEARNER_KEYS))
@pytest.mark.parametrize("policy", ["none", "cam", "cim"])
def test_every_learner_runs_with_every_policy(tmp_path, learner, policy):
    raw = tiny_config(model_name=learner, compression=policy, **{**QUICK, "init_epochs": 1, "epochs": 1},
                      **LEARNER_KEYS[learner])
    res = run(raw, tmp_path / "run")
    assert len(res["phases"]) == 3
    for p in res["phases"]:
        assert math.isfinite(p["cnn"]["top1"])
        assert p["memory"]["used"] <= p["memory"]["budget"] + 1e-6
        if policy != "none":
            assert p["compression"]["policy"] == policy
            assert (tmp_path / "run" / f"exemplars_phase_{p['phase']}.png").exists()
    if policy == "cim":
        assert res["phases"][0]["compression"]["bilevel"]["iterations"] >= 1


def test_old_backbone_paus_stay_frozen_and_the_foster_student_keeps_them(tmp_path):
    """Official CIM: φ excludes the frozen old backbone's Padé units; the next student takes the
    old backbone's units, not the new one's."""
    raw = tiny_config(model_name="foster", compression="cim", compression_epochs=1, **QUICK)
    t = Trainer(resolve_config(raw), tmp_path / "run", "tiny", stop_after_phase=1)
    t.run()
    phase0 = torch.load(tmp_path / "run" / "checkpoints" / "phase_0.pt", map_location="cpu",
                        weights_only=False)["learner"]["net"]
    old_sites = activation_sites(t.learner.teacher.backbones[0])
    new_sites = activation_sites(t.learner.teacher.backbones[1])
    student = activation_sites(t.learner.net.backbone)
    names = [n for n, m in t.learner.teacher.backbones[0].named_modules() if m in old_sites]
    for name, site in zip(names, old_sites):   # unchanged since phase 0
        assert torch.equal(site.pau.numerator, phase0[f"backbone.{name}.pau.numerator"])
    assert all(torch.equal(a.pau.numerator, b.pau.numerator) for a, b in zip(old_sites, student))
    plugin = t.plugins[0]
    phi = {id(p) for p in plugin.phi()}
    assert not phi & {id(p) for s in old_sites for p in s.pau.parameters()}
    assert {id(p) for s in new_sites for p in s.pau.parameters()} <= phi


def test_der_old_backbones_paus_are_not_in_phi(tmp_path):
    t = _trainer(tmp_path, model_name="der", compression="cim", num_phases=2, epochs=1, init_epochs=1)
    t.run()
    net, plugin = t.learner.net, t.plugins[0]
    phi = {id(p) for p in plugin.phi()}
    old = {id(p) for s in activation_sites(net.backbones[0]) for p in s.pau.parameters()}
    new = {id(p) for s in activation_sites(net.backbones[-1]) for p in s.pau.parameters()}
    assert old and not phi & old and new <= phi


def test_cim_resume_matches_uninterrupted(tmp_path):
    raw = tiny_config(compression="cim", **QUICK)
    full = run(raw, tmp_path / "full")
    run(raw, tmp_path / "resumed", stop_after_phase=0)
    resumed = run(raw, tmp_path / "resumed", resume=True)
    assert without_seconds(resumed) == without_seconds(full)


def test_exemplar_figure_shows_every_class_row_at_a_readable_size(tmp_path, monkeypatch):
    """4 classes x 2 rows of 8 tiles, each drawn at least MIN_TILE pixels on screen (the 16 px tiles
    used to be written at their own size, 146 x 290 px with no title or labels), labelled."""
    from PIL import Image

    from utils import exemplar_figure

    drawn = {}
    real = exemplar_figure.render_figure

    def spy(canvas, tile, pad, row_labels, title, key, path):
        drawn.update(canvas=canvas, row_labels=row_labels, title=title)
        real(canvas, tile, pad, row_labels, title, key, path)

    monkeypatch.setattr(exemplar_figure, "render_figure", spy)
    raw = tiny_config(compression="cam", **QUICK)
    run(raw, tmp_path / "run")
    assert tuple(drawn["canvas"].shape) == (3, 4 * 2 * 18 + 2, 8 * 18 + 2)   # 16 px tiles, 2 px apart
    img = Image.open(tmp_path / "run" / "exemplars_phase_2.png")
    assert img.size[0] >= 8 * exemplar_figure.MIN_TILE and img.size[1] >= 4 * 2 * exemplar_figure.MIN_TILE
    assert drawn["title"].startswith("Exemplars after phase 2") and "policy cam" in drawn["title"]
    assert len(drawn["row_labels"]) == 4 and "class 5 (new)" in drawn["row_labels"][-1][0]


def test_a_figure_that_cannot_be_drawn_is_a_note_not_a_lost_phase(tmp_path, monkeypatch):
    from utils import exemplar_figure

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(exemplar_figure, "render_figure", broken)
    res = run(tiny_config(compression="cam", **QUICK), tmp_path / "run")
    assert len(res["phases"]) == 3 and not list((tmp_path / "run").glob("exemplars_phase_*.png"))
    assert "note: could not write exemplars_phase_0.png: RuntimeError: no fonts here" in \
        (tmp_path / "run" / "log.txt").read_text()


def test_smoke_cli_accepts_every_learner_and_policy(capsys, monkeypatch):
    import main

    monkeypatch.chdir(REPO)
    for learner in ("icarl", "lucir", "der", "foster"):
        for policy in ("none", "full", "random", "center", "cam", "cim"):
            assert main.main(["--config", "smoke", "--set", f"model_name={learner}",
                              "--set", f"compression={policy}", "--check"]) == 0


def test_exemplar_figure_draws_whole_stored_images_at_their_aspect():
    from utils.exemplar_figure import letterbox

    tiles = torch.zeros(3, 3, 20, 20, dtype=torch.uint8)
    out = letterbox(tiles, torch.tensor([[30, 60], [60, 30], [40, 40]]))
    assert (out[0, :, :5] == 255).all() and (out[0, :, 15:] == 255).all() and (out[0, :, 5:15] == 0).all()
    assert (out[1, :, :, :5] == 255).all() and (out[1, :, :, 15:] == 255).all() and (out[1, :, :, 5:15] == 0).all()
    assert torch.equal(out[2], tiles[2])
    assert letterbox(tiles, None) is tiles


def test_a_streamed_cim_run_equals_the_in_memory_run(tmp_path):
    """CIM on a streamed set (in_memory false): its artifact boxes, bilevel batches and memory
    update decode through loaders with a worker, and the run gives exactly the in-memory run's
    results (the same pixels, order and random draws)."""
    from conftest import aspect_folder, read_results

    root = aspect_folder(tmp_path / "data", train_per_class=10, test_per_class=4, sizes=((24, 24), (30, 24)))
    raw = tiny_config(dataset="folder", data_root=str(root), shapes={}, image_size=24, input_size=20,
                      init_cls=2, increment=2, memory_size=16, batch_size=8, init_epochs=3, epochs=3,
                      model_name="lucir", cbf_epochs=1, cbf_milestones=[], compression="cim",
                      cam_update_interval=1, randombbxblur_prob_incre=0.5, num_meta_iters_per_cls=1.0,
                      meta_batch_size=4, stored_form="crop")   # streamed sets are stored as centre crops
    memory = run(raw, tmp_path / "memory")
    streamed = run({**raw, "in_memory": False, "num_workers": 1}, tmp_path / "streamed")
    assert streamed["config"]["in_memory"] is False and memory["config"]["in_memory"] is not False
    strip = lambda r: without_seconds({k: v for k, v in r.items() if k not in ("config", "config_hash")})  # noqa: E731
    assert strip(streamed) == strip(memory)
    cim = read_results(tmp_path / "streamed")["phases"][1]["compression"]
    assert cim["box_refresh"]["count"] > 0 and cim["bilevel"]["iterations"] > 0, cim


def test_pau_kernel_auto_is_fused_where_the_triton_kernels_run_and_autograd_elsewhere(tmp_path, monkeypatch):
    """The default, ``auto``: on an H200 the fused kernels took 37 % less device time per bilevel
    iteration and a quarter of the memory; on a CPU their torch formulas are 7 % slower than
    autograd. So: fused on a GPU whose Triton kernels build and check out, autograd elsewhere
    (the CPU's numbers stay those of the official Horner steps). The phase's report says which."""
    from types import SimpleNamespace

    from convs import pau_triton

    t, plugin, phase, stage = _ready_for_bilevel(tmp_path / "cpu", seed=1)
    assert plugin.cfg["pau_kernel"] == "auto" and plugin.pau_kernel() == "autograd"
    assert all(s.pau.kernel == "autograd" for s in activation_sites(t.learner.net))
    assert plugin.phase_report(phase)["compression"]["bilevel"]["pau_kernels"] == "autograd"

    def on(device, kernel="auto", why=None):
        monkeypatch.setattr(pau_triton, "why_unavailable", lambda d=None: why)
        cim = object.__new__(ExemplarCompression)
        cim.cfg, cim.ctx = {"pau_kernel": kernel}, SimpleNamespace(device=torch.device(device))
        return cim.pau_kernel(), cim.pau_kernel_description()

    assert on("cuda") == ("fused", "closed form, Triton kernels")
    assert on("cuda", why="Triton does not import") == (
        "autograd", "autograd (pau_kernel auto: Triton kernels unavailable: Triton does not import)")
    assert on("cuda", kernel="autograd") == ("autograd", "autograd")
    assert on("cuda", kernel="fused", why="no sm_90") == (
        "fused", "closed form, torch ops (Triton kernels unavailable: no sm_90)")
    assert on("cpu", kernel="fused") == ("fused", "closed form, torch ops")


def test_fused_pau_kernels_give_the_bilevel_step_autograds_gradient(tmp_path, capsys):
    """``pau_kernel: fused`` (closed-form derivatives, torch ops on the CPU) reaches every PAU and
    gives φ the gradient that autograd's Horner steps give, up to float32 rounding.

    Seed 1, not the default: with seed 1993 the first iteration's inner step meets a ReLU kink of
    the tiny untrained network (measured: adding noise of 1e-6 to its input x̃ moves the input's
    gradient by 3.7 %, noise of 1e-7 by 6e-7), so the two kernels' float32 rounding (1e-6 in x̃)
    gives φ gradients 1.5 % apart there."""
    grads = {}
    for kernel in ("autograd", "fused"):
        capsys.readouterr()
        t, plugin, phase, stage = _ready_for_bilevel(tmp_path / kernel, pau_kernel=kernel, seed=1)
        assert all(s.pau.kernel == kernel for s in activation_sites(t.learner.net))
        said = capsys.readouterr().out.count("PAU kernels: closed form, torch ops")
        assert said == (kernel == "fused")               # what runs, said in the log
        seen = []
        step = plugin.phi_opt.step

        def record(g, finite, step=step, seen=seen):
            seen.append([x.clone() for x in g])
            step(g, finite)

        plugin.phi_opt.step = record
        plugin.bilevel_epoch(phase, stage, lr=0.1)
        assert plugin.meta_skipped == 0 and len(seen) == plugin.meta_iterations > 0
        grads[kernel] = [torch.cat([g.flatten() for g in step_grads]) for step_grads in seen]
    for a, f in zip(grads["autograd"], grads["fused"]):    # measured: 4e-6 and 1.1e-5 apart
        assert float(a.norm()) > 0 and float((f - a).norm() / a.norm()) < 1e-4
