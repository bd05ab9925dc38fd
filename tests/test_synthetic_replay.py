"""Synthetic replay (SDDR) as a data source: a tiny random Stable-Diffusion-shaped pipeline built
offline, saved and reloaded with local_files_only; every learner end to end, with CIM too;
deterministic, resumable, cached generation; clear errors; an unchanged memory budget."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, run, tiny_config, without_seconds, write_config

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from utils import diffusion, replay_folder  # noqa: E402
from utils.tiny_diffusion import build_tiny_pipeline  # noqa: E402

QUICK = {"init_epochs": 1, "epochs": 1}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> str:
    return build_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_pipeline") / "pipe"), image_size=32)


def diffusers_block(pipe: str, cache: Path, **extra) -> dict:
    return {"source": "diffusers", "model_path": pipe, "cache_dir": str(cache), "per_class": 4,
            "num_inference_steps": 2, "gen_batch_size": 4, **extra}


def make_folder(root: Path, class_ids, per_class: int, manifest: dict | None = None, size: int = 24) -> Path:
    """A folder source of random images (class c's images are c-dependent noise)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in class_ids:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(img).save(root / c / replay_folder.image_name(i))
    replay_folder.write_manifest(str(root), manifest if manifest is not None else
                                 {"format": replay_folder.FORMAT, "generator": {"kind": "real-images"}})
    return root


def shape_ids(n=6):
    from utils import shapes

    return shapes.class_names(n)


# ---- generation ---------------------------------------------------------------------------------

def test_generation_is_deterministic_and_resumes_without_regenerating(tiny_pipeline, tmp_path):
    pipe = diffusion.load_pipeline(tiny_pipeline, "cpu")
    kw = dict(seed=3, steps=2, guidance=2.0, resolution=32, batch_size=2, device="cpu")
    assert diffusion.generate_class(pipe, str(tmp_path / "a"), "goose", "a photo of a goose", 5, **kw) == 5
    assert diffusion.generate_class(pipe, str(tmp_path / "b"), "goose", "a photo of a goose", 5, **kw) == 5
    a = [Path(p).read_bytes() for p in replay_folder.class_files(str(tmp_path / "a"), "goose")]
    b = [Path(p).read_bytes() for p in replay_folder.class_files(str(tmp_path / "b"), "goose")]
    assert len(a) == 5 and a == b                                   # same seed -> same bytes
    assert len(set(a)) == 5                                         # every image its own seed
    # A stop: two files lost (one of a full chunk, one of the last); a rerun writes only those.
    os.remove(tmp_path / "b" / "goose" / replay_folder.image_name(1))
    os.remove(tmp_path / "b" / "goose" / replay_folder.image_name(4))
    assert diffusion.generate_class(pipe, str(tmp_path / "b"), "goose", "a photo of a goose", 5, **kw) == 2
    assert [Path(p).read_bytes() for p in replay_folder.class_files(str(tmp_path / "b"), "goose")] == a
    assert diffusion.generate_class(pipe, str(tmp_path / "b"), "goose", "a photo of a goose", 5, **kw) == 0
    # Another seed gives other images; shards split the chunks between processes.
    diffusion.generate_class(pipe, str(tmp_path / "c"), "goose", "a photo of a goose", 5, **{**kw, "seed": 4})
    assert Path(replay_folder.class_files(str(tmp_path / "c"), "goose")[0]).read_bytes() != a[0]
    for rank in (0, 1):
        diffusion.generate_class(pipe, str(tmp_path / "d"), "goose", "a photo of a goose", 5, shard=(rank, 2), **kw)
    assert [Path(p).read_bytes() for p in replay_folder.class_files(str(tmp_path / "d"), "goose")] == a


def test_generation_chunks_are_numbered_across_classes(tiny_pipeline, tmp_path):
    """Two processes, two classes of one chunk each: each rank makes one class (chunks were numbered per
    class, so rank 0 made both and rank 1 idled at the barrier, into the collective timeout)."""
    pipe = diffusion.load_pipeline(tiny_pipeline, "cpu")
    kw = dict(seed=3, steps=2, guidance=2.0, resolution=32, batch_size=2, device="cpu")
    made = {rank: [diffusion.generate_class(pipe, str(tmp_path), cid, f"a photo of a {cid}", 2, shard=(rank, 2),
                                            first_chunk=k, **kw) for k, cid in enumerate(("goose", "heron"))]
            for rank in (0, 1)}
    assert made == {0: [2, 0], 1: [0, 2]}


def test_a_generation_numbers_its_chunks_across_its_classes(tiny_pipeline, tmp_path, monkeypatch):
    """The plugin passes each class the count of chunks before it (2 per class here: 3 images, 2 a chunk)."""
    firsts = []
    real = diffusion.generate_class

    def spy(*args, first_chunk=0, **kw):
        firsts.append(first_chunk)
        return real(*args, first_chunk=first_chunk, **kw)
    monkeypatch.setattr(diffusion, "generate_class", spy)
    block = diffusers_block(tiny_pipeline, tmp_path / "cache", when="upfront", per_class=3, gen_batch_size=2)
    run(tiny_config(**QUICK, synthetic_replay=block), tmp_path / "run", stop_after_phase=0)   # 4 replayed classes
    assert firsts == [0, 2, 4, 6]


# ---- every learner end to end --------------------------------------------------------------------

@pytest.mark.parametrize("learner,extra", [("icarl", {}), ("lucir", {"cbf_epochs": 1}), ("der", {}),
                                           ("foster", {"compression_epochs": 1}),
                                           ("foster", {"compression_epochs": 1, "compression": "cim"})])
def test_every_learner_trains_with_diffusers_replay(tiny_pipeline, tmp_path, learner, extra):
    raw = tiny_config(model_name=learner, **QUICK, **extra,
                      synthetic_replay=diffusers_block(tiny_pipeline, tmp_path / "cache"))
    res = run(raw, tmp_path / "run")
    assert res["external_generator"] is True
    assert res["synthetic_replay"]["source"] == "diffusers" and res["synthetic_replay"]["resolution_generated"] == 32
    reports = [p["synthetic_replay"] for p in res["phases"]]
    assert [r["classes_replayed"] for r in reports] == [0, 2, 4]
    assert [r["images"] for r in reports] == [0, 8, 16] and reports[2]["images_per_class"] == 4
    # per_phase: phase k's new classes are made when phase k+1 begins (after phase k's checkpoint),
    # the last phase's never (nothing replays them)
    assert [r["generated_this_phase"] for r in reports] == [0, 8, 8]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "'synthetic': 16" in log                               # phase 2's stages saw them
    assert all(m["train_acc"] >= 0 for m in read_metrics(tmp_path / "run"))


def test_cache_is_reused_by_another_run_and_learner(tiny_pipeline, tmp_path):
    block = diffusers_block(tiny_pipeline, tmp_path / "cache", when="upfront")
    first = run(tiny_config(**QUICK, synthetic_replay=block), tmp_path / "one")
    assert [p["synthetic_replay"]["generated_this_phase"] for p in first["phases"]] == [16, 0, 0]
    second = run(tiny_config(model_name="lucir", **QUICK, cbf_epochs=0, synthetic_replay=block), tmp_path / "two")
    assert [p["synthetic_replay"]["generated_this_phase"] for p in second["phases"]] == [0, 0, 0]
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 1                                        # one generation key
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert manifest["guidance_scale"] == 2.0 and manifest["num_inference_steps"] == 2
    assert manifest["generator"]["weights_hash"] and manifest["scheduler"] == "DDIMScheduler"
    # dtype "auto" is keyed as what it means here: float16 images (CUDA) never share float32's folder
    assert manifest["dtype"] == manifest["generator"]["dtype"] == "float32"
    assert sorted(manifest["classes"]) == sorted(first["class_names"][:4])
    # Another setting that changes the pixels is another key (never a stale cache).
    run(tiny_config(**QUICK, synthetic_replay={**block, "guidance_scale": 3.0}), tmp_path / "three")
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_other_class_names_are_another_cache_key(tiny_pipeline, tmp_path):
    """The key covers every class's prompt: a names file (or a dataset that shares class ids but names
    them otherwise) never reuses images made from other names (it used to: same folder, 0 made)."""
    block = diffusers_block(tiny_pipeline, tmp_path / "cache", when="upfront")
    first = run(tiny_config(**QUICK, synthetic_replay=block), tmp_path / "one")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{cid}\tzebra number {i}\n" for i, cid in enumerate(shape_ids())))
    second = run(tiny_config(**QUICK, synthetic_replay={**block, "class_names": str(names)}), tmp_path / "two")
    assert second["phases"][0]["synthetic_replay"]["generated_this_phase"] == 16
    assert second["synthetic_replay"]["folder"] != first["synthetic_replay"]["folder"]
    manifest = json.loads((Path(second["synthetic_replay"]["folder"]) / "manifest.json").read_text())
    assert all(c["prompt"].startswith("a photo of a zebra number") for c in manifest["classes"].values())


def test_a_failed_generation_keeps_the_trained_phase(tiny_pipeline, tmp_path, capsys):
    """A pipeline folder without weights passes the file checks and fails when loaded: the phase
    before has its results and checkpoint (generation runs after them, at the next phase's start)."""
    import shutil

    import main

    broken = tmp_path / "no_weights"
    shutil.copytree(tiny_pipeline, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = write_config(tmp_path / "cfg.json", tiny_config(**QUICK, synthetic_replay=diffusers_block(
        str(broken), tmp_path / "cache")))
    code = main.main(["--config", str(cfg), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Cannot load the pipeline" in err and "Traceback" not in err, err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [p["phase"] for p in res["phases"]] == [0]
    assert (tmp_path / "out" / "checkpoints" / "phase_0.pt").is_file()


def test_generating_draws_nothing_from_the_runs_random_streams(tiny_pipeline, tmp_path, monkeypatch):
    """A run that generates its images trains as one that found them made: loading a pipeline that
    draws from torch's generator (random initialisation in some diffusers versions) must leave the
    phase's seeded global generator as it was (today's training draws from explicit generators, so
    the accuracies would match either way; the state check is what catches a draw)."""
    real = diffusion.load_pipeline

    def drawing(*args, **kwargs):
        torch.rand(1000)
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "load_pipeline", drawing)
    from models.synthetic_replay import SyntheticReplay

    states, before_phase = [], SyntheticReplay.before_phase

    def watched(self, phase):
        start = torch.get_rng_state()
        before_phase(self, phase)
        states.append(torch.equal(start, torch.get_rng_state()))

    monkeypatch.setattr(SyntheticReplay, "before_phase", watched)
    block = diffusers_block(tiny_pipeline, tmp_path / "cache")
    cold = run(tiny_config(**QUICK, synthetic_replay=block), tmp_path / "cold")
    assert states == [True, True, True]   # phases 1 and 2 generated, and left torch's generator as it was
    warm = run(tiny_config(**QUICK, synthetic_replay=block), tmp_path / "warm")
    assert sum(p["synthetic_replay"]["generated_this_phase"] for p in cold["phases"]) == 16
    assert sum(p["synthetic_replay"]["generated_this_phase"] for p in warm["phases"]) == 0
    assert [p["cnn"] for p in cold["phases"]] == [p["cnn"] for p in warm["phases"]]
    assert [p["memory"]["hash"] for p in cold["phases"]] == [p["memory"]["hash"] for p in warm["phases"]]


def test_weights_hash_reads_whole_files(tmp_path):
    """Two same-size weight files that differ only in the middle are two pipelines (the hash used to
    read only the first and last MiB of files over 64 MiB)."""
    size = 65 << 20
    digests = []
    for k, name in enumerate(("a", "b")):
        folder = tmp_path / name
        folder.mkdir()
        data = bytearray(size)
        data[size // 2] = k
        (folder / "unet.bin").write_bytes(bytes(data))
        digests.append(diffusion.weights_hash(str(folder)))
    assert digests[0] != digests[1]
    (tmp_path / "a" / "unet.bin").write_bytes(b"\1" * 10)          # changed on disk: hashed again
    changed = diffusion.weights_hash(str(tmp_path / "a"))
    assert changed not in digests
    # kept in a memo file for later processes: a memo hit reads no weights
    memo = tmp_path / "cache"
    assert diffusion.weights_hash(str(tmp_path / "b"), str(memo)) == digests[1]
    assert (memo / diffusion.WEIGHTS_MEMO).is_file()
    diffusion._content_digest.cache_clear()

    def must_not_read(*args):
        raise AssertionError("the weights were read again")

    real, diffusion._content_digest = diffusion._content_digest, must_not_read
    try:
        assert diffusion.weights_hash(str(tmp_path / "b"), str(memo)) == digests[1]
    finally:
        diffusion._content_digest = real


def test_resume_with_replay_matches_an_uninterrupted_run(tiny_pipeline, tmp_path):
    raw = tiny_config(**QUICK, synthetic_replay=diffusers_block(tiny_pipeline, tmp_path / "cache", ratio=0.5))
    full = run(raw, tmp_path / "full")
    run(raw, tmp_path / "resumed", stop_after_phase=1)
    resumed = run(raw, tmp_path / "resumed", resume=True)

    def comparable(res):
        res = without_seconds(res)
        for p in res["phases"]:
            p["synthetic_replay"].pop("generation_seconds")
            p["synthetic_replay"].pop("generated_this_phase")   # the second run found them made
        return res
    assert comparable(resumed) == comparable(full)


# ---- folder source, budget, losses ---------------------------------------------------------------

def test_folder_source_takes_the_first_images_in_seed_order(tmp_path):
    root = make_folder(tmp_path / "syn", shape_ids(), per_class=5)
    raw = tiny_config(**QUICK, synthetic_replay={"source": "folder", "path": str(root), "per_class": 3})
    from trainer import Trainer
    from utils.config import resolve_config

    t = Trainer(resolve_config(raw), tmp_path / "run")
    plugin = next(p for p in t.plugins if type(p).__name__ == "SyntheticReplay")
    phase = t.phases()[2]
    plugin.before_phase(phase)
    cid = t.ctx.class_names[1]
    expect = replay_folder.load_images([str(root / cid / replay_folder.image_name(i)) for i in range(3)], 16)
    assert torch.equal(plugin.images[1], expect)
    (source,) = plugin.sources(phase, "phase")
    assert len(source) == 4 * 3 and bool((source.labels < phase.first).all())
    assert plugin.sources(phase, "memory") == []                  # class-balanced finetuning: real memory only


def test_memory_budget_and_exemplar_counts_are_unchanged_by_replay(tmp_path):
    root = make_folder(tmp_path / "syn", shape_ids(), per_class=6)
    plain = run(tiny_config(**QUICK), tmp_path / "plain")
    replay = run(tiny_config(**QUICK, synthetic_replay={"source": "folder", "path": str(root), "per_class": 6}),
                 tmp_path / "replay")
    for a, b in zip(plain["phases"], replay["phases"]):
        # Budget and counts; not the digest of the stored bytes (other training, other exemplars).
        assert {k: v for k, v in a["memory"].items() if k != "hash"} == \
            {k: v for k, v in b["memory"].items() if k != "hash"}
    assert "external_generator" not in plain and replay["external_generator"] is True


def test_use_in_ce_false_keeps_synthetic_images_out_of_the_classification_loss(tmp_path):
    from models.base import Batch
    from models.icarl import ICaRL
    from utils.config import resolve_config
    from utils.stage_data import EXEMPLAR, NEW, SYNTHETIC, SourceData, StageData

    y = torch.tensor([0, 1, 2, 3])
    parts = [SourceData("new", torch.zeros(2, 3, 4, 4, dtype=torch.uint8), y[2:], NEW),
             SourceData("exemplars", torch.zeros(1, 3, 4, 4, dtype=torch.uint8), y[:1], EXEMPLAR),
             SourceData("synthetic", torch.zeros(1, 3, 4, 4, dtype=torch.uint8), y[1:2], SYNTHETIC, in_ce=False)]
    data = StageData.assemble(parts)
    origin = torch.tensor([NEW, NEW, EXEMPLAR, SYNTHETIC], dtype=torch.int8)
    ce_mask, kd_mask = data.loss_masks(origin)
    assert ce_mask.tolist() == [True, True, True, False] and kd_mask is None
    learner = ICaRL(resolve_config(tiny_config()), ctx=None)
    logits, old = torch.randn(4, 4), torch.randn(4, 2)
    labels = torch.tensor([2, 3, 0, 1])
    loss, terms = learner.loss({"logits": logits, "old_logits": old}, Batch(None, labels, labels < 2, origin, ce_mask))
    assert torch.allclose(terms["ce"], torch.nn.functional.cross_entropy(logits[:3], labels[:3]))
    from models.losses import kd_loss
    assert torch.allclose(terms["kd"], kd_loss(logits[:, :2], old, 2.0))   # all four distilled


# ---- errors: exit 2 with the field or path named -------------------------------------------------

def _main(tmp_path, block, *flags, **extra) -> tuple[int, str]:
    import main

    cfg = write_config(tmp_path / "cfg.json", tiny_config(**QUICK, synthetic_replay=block, **extra))
    return main.main(["--config", str(cfg), "--output", str(tmp_path / "out"), *flags]), ""


@pytest.mark.parametrize("flags", [(), ("--check",)], ids=["run", "check"])
@pytest.mark.parametrize("case", ["manifest", "hub", "missing", "no_images", "few_images", "no_path", "template",
                                  "names", "resolution", "steps", "classes_type", "no_generator"])
def test_bad_sources_stop_with_exit_2_naming_the_field_or_path(tiny_pipeline, tmp_path, capsys, monkeypatch, case,
                                                               flags):
    """Found from file listings alone: ``--check`` fails as the run would, and the run stops before
    its dataset is loaded (on ImageNet that is the minutes of decoding a bad path used to cost)."""
    import trainer

    def loaded(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the synthetic-replay inputs were checked")

    monkeypatch.setattr(trainer, "load_dataset", loaded)
    ids = shape_ids()
    if case == "manifest":
        root = make_folder(tmp_path / "syn", ids, 2, {"format": replay_folder.FORMAT, "guidance_scale": 7.5,
                                                      "generator": {"kind": "diffusers"}})
        block, expect = {"source": "folder", "path": str(root), "per_class": 2}, ["guidance_scale", "7.5", "2.0"]
    elif case == "hub":
        block, expect = {"source": "diffusers", "model_path": "runwayml/stable-diffusion-v1-5"}, \
            ["model_path", "hub id", "Nothing is downloaded"]
    elif case == "missing":
        block, expect = {"source": "folder", "path": str(tmp_path / "nowhere")}, ["synthetic_replay.path", "nowhere"]
    elif case == "no_images":
        root = make_folder(tmp_path / "syn", ids[:2] + ids[3:], 2)   # dataset class 2: replayed (order 1)
        block, expect = {"source": "folder", "path": str(root), "per_class": 2}, [ids[2], str(root / ids[2])]
    elif case == "few_images":
        root = make_folder(tmp_path / "syn", ids, 2)
        block, expect = {"source": "folder", "path": str(root), "per_class": 3}, ["per_class is 3", "2 image(s)"]
    elif case == "no_path":
        block, expect = {"source": "folder"}, ["synthetic_replay.path"]
    elif case == "names":
        root = make_folder(tmp_path / "syn", ids, 2)
        names = tmp_path / "names.txt"
        names.write_text("".join(f"other{i}\tthing\n" for i in range(3)))
        block, expect = ({"source": "folder", "path": str(root), "per_class": 2, "class_names": str(names)},
                         [str(names), "no line names a class"])
    elif case == "resolution":   # diffusers refuses it, but only when generating (after phase 0 trained)
        block, expect = (diffusers_block(tiny_pipeline, tmp_path / "cache", resolution=36),
                         ["synthetic_replay.resolution", "36", "multiples of 8", "32", "40"])
    elif case in ("classes_type", "no_generator"):   # a TypeError traceback; {} accepted without a word
        manifest = ({"format": replay_folder.FORMAT, "generator": {"kind": "real-images"}, "classes": 5}
                    if case == "classes_type" else {})
        root = make_folder(tmp_path / "syn", ids, 2, manifest)
        block = {"source": "folder", "path": str(root), "per_class": 2}
        expect = (["field 'classes' must be an object", "got 5"] if case == "classes_type"
                  else ["field 'generator' must be an object", "real-images"])
    elif case == "steps":   # 1000 steps of 1000 timesteps (offset 1) ended in an IndexError, after phase 0
        block, expect = (diffusers_block(tiny_pipeline, tmp_path / "cache", num_inference_steps=1000),
                         ["synthetic_replay.num_inference_steps", "1000", "at most 999"])
    else:
        block, expect = {"source": "folder", "path": ".", "prompt_template": "a photo"}, ["prompt_template", "{name}"]
    code, _ = _main(tmp_path, block, *flags)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for word in expect:
        assert word in err, (word, err)
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_folder_needs_only_the_classes_a_later_phase_replays(tmp_path, capsys):
    """The last phase's classes are never replayed: a folder (and its manifest's class list) may lack
    them; a replayed class missing from the manifest is still refused."""
    from trainer import class_order
    from utils.config import phase_plan, resolve_config

    ids = shape_ids()
    cfg = resolve_config(tiny_config(**QUICK))
    order = [ids[c] for c in class_order(len(ids), cfg["seed"], True)]
    replayed = phase_plan(cfg, len(ids))[-1][0]
    for listed, code in ((order[:replayed], 0), (order[:replayed - 1], 2)):
        root = make_folder(tmp_path / f"syn{code}", listed, 2, {"format": replay_folder.FORMAT,
                                                                "generator": {"kind": "real-images"},
                                                                "classes": {c: {"name": c} for c in listed}})
        got = _main(tmp_path, {"source": "folder", "path": str(root), "per_class": 2}, "--check")[0]
        err = capsys.readouterr().err
        assert got == code, err
    assert "manifest field 'classes' lacks" in err and order[replayed - 1] in err


def test_inputs_are_checked_for_the_class_order_of_every_seed(tmp_path, capsys):
    """Each seed draws its own class order, so each replays other classes: a folder that serves the
    first seed but lacks a class another seed replays is refused before the first seed's run."""
    from trainer import class_order
    from utils.config import phase_plan, resolve_config

    ids = shape_ids()
    first = resolve_config(tiny_config(**QUICK))["seed"]
    replayed_before = phase_plan(resolve_config(tiny_config(**QUICK)), len(ids))[-1][0]
    replayed = {s: {ids[c] for c in class_order(len(ids), s, True)[:replayed_before]} for s in range(first, first + 20)}
    seed, cid = next((s, c) for s in replayed for c in sorted(replayed[s] - replayed[first]))
    root = make_folder(tmp_path / "syn", [c for c in ids if c != cid], 2)
    block = {"source": "folder", "path": str(root), "per_class": 2}
    assert _main(tmp_path, block, "--check")[0] == 0, capsys.readouterr().err
    code, _ = _main(tmp_path, block, "--check", seed=[first, seed])
    err = capsys.readouterr().err
    assert code == 2 and f"class {cid}" in err, err


def test_unknown_and_wrong_keys_of_the_block_are_refused(tmp_path):
    from utils.config import resolve_config
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"synthetic_replay.per_clas'.*Did you mean synthetic_replay.per_class"):
        resolve_config(tiny_config(synthetic_replay={"source": "folder", "path": ".", "per_clas": 3}))
    with pytest.raises(ConfigError, match=r"synthetic_replay.ratio"):
        resolve_config(tiny_config(synthetic_replay={"source": "folder", "path": ".", "ratio": -1}))
    with pytest.raises(ConfigError, match=r"synthetic_replay.source.*allowed"):
        resolve_config(tiny_config(synthetic_replay={"source": "stable-diffusion"}))
    cfg = resolve_config(tiny_config())
    assert cfg["synthetic_replay"]["source"] == "none" and cfg["synthetic_replay"]["guidance_scale"] == 2.0


def test_an_unreadable_folder_image_stops_the_run_before_any_training(tmp_path, capsys):
    """A corrupt image of a class that only the last phase replays is found before phase 0 trains
    (exit 2 naming the file), not after the phases before it have run."""
    from trainer import class_order
    from utils.config import phase_plan, resolve_config

    ids = shape_ids()
    cfg = resolve_config(tiny_config(**QUICK))
    order = [ids[c] for c in class_order(len(ids), cfg["seed"], True)]
    replayed = phase_plan(cfg, len(ids))[-1][0]
    root = make_folder(tmp_path / "syn", ids, per_class=2)
    bad = root / order[replayed - 1] / replay_folder.image_name(1)   # replayed by the last phase only
    bad.write_bytes(b"not an image")
    code = _main(tmp_path, {"source": "folder", "path": str(root), "per_class": 2})[0]
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err, err
    written = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and not [n for n in written if n.endswith(".pt") or n == "results.json"], written
