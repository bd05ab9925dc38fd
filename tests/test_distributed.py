"""Multi-process training as under torchrun, on the CPU: gloo, 2 processes on the loopback interface.

One ``torch.multiprocessing.spawn`` runs every 2-process job of this file in one process group (a
process start costs seconds on a busy CPU); the resume and error tests go through the command line
(``python -m torch.distributed.run`` and plain processes with torchrun's variables).

Tolerance of "2 processes vs 1" (same global batch, same samples, same augmentation draws): the two
runs differ only by floating-point summation order (the gradient all-reduce) and by BatchNorm, which
normalises each rank's 16-sample shard with that shard's statistics instead of the 32-sample batch
(rank 0's running statistics are kept at the end of a stage). Both effects are checked apart:

* BatchNorm frozen (eval mode) in both runs: only summation order is left. Measured on the tiny
  config: phase 0 equal to 1e-6 relative (its memory bit-identical), later epochs within 3e-4
  relative, CNN top-1 equal. Asserted: losses within 1e-3 relative, phase 0's accuracies and memory
  equal, later CNN top-1 within 2.5 points (3 of 120 test images), since herding is a discrete
  choice that a 1e-7 difference in a feature can flip.
* BatchNorm training as usual: measured phase-0 epoch-1 loss 0.931 vs 0.972 (4 %); the runs then
  drift apart as any two trainings of a tiny, high-learning-rate run do (later top-1 differ by up to
  17 points), so only the first epoch is compared (within 15 %).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, aspect_folder, read_metrics, read_results, run, tiny_config, without_seconds, write_config

WORLD = 2
TWO = dict(num_phases=2)                       # 2 phases: enough for a resume after phase 0
CIM = dict(compression="cim", cam_update_interval=1, randombbxblur_prob_incre=0.5,   # boxes from epoch 1
           num_meta_iters_per_cls=1, meta_batch_size=4)
FROZEN_BN = dict(init_lr=0.01, lr=0.01)          # no BatchNorm normalisation: a smaller step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def freeze_batchnorm() -> None:
    """Every BatchNorm layer stays in eval mode (running statistics, no batch statistics)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    _BatchNorm.train = lambda self, mode=True: torch.nn.Module.train(self, False)


def _worker(rank: int, port: int, jobs: list[dict], info_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from trainer import Trainer, TrainingDiverged
    from utils import distributed
    from utils.config import resolve_config

    distributed.init(torch.device("cpu"))
    try:
        from trainer import average_gradients

        gathered = distributed.all_gather(torch.arange(rank + 2) + 10 * rank)   # lengths 2 and 3
        # one row in all: rank 0's share is empty (an untyped 1-D empty tensor, as embed gives)
        one_row = distributed.map_shards(lambda rows: torch.ones(1, 3)[rows] if rows.stop > rows.start
                                         else torch.empty(0), 1)
        shared = distributed.map_shards(lambda rows: torch.arange(7)[rows].float()[:, None] * torch.ones(1, 2), 7)
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(rank + 1))     # a parameter no DDP wrapper holds
        average_gradients([p])
        for job in jobs:
            if job.get("freeze_bn"):
                freeze_batchnorm()
            trainer = Trainer(resolve_config(job["raw"]), Path(job["out"]), "tiny")
            if job.get("nan_on_rank") == rank:
                # This rank alone logs a NaN loss part (its gradients stay finite): only the
                # reduction of the logged losses over the ranks can stop the other rank too.
                def nan_part(out, batch, original=trainer.learner.loss):
                    loss, parts = original(out, batch)
                    return loss, {**parts, "ce": parts["ce"] * float("nan")}
                trainer.learner.loss = nan_part
            rows = count_rows(trainer)
            stage_starts = record_stage_starts(trainer)
            try:
                results = trainer.run()
            except TrainingDiverged as err:
                (Path(info_dir) / f"{job['name']}_rank{rank}.json").write_text(json.dumps({"diverged": str(err)}))
                continue
            state = [t for m in trainer.learner.state_dict().values() for t in m.values()]
            info = {"memory": trainer.memory_digests, "weights": distributed.tensor_digest(state),
                    "returned_phases": len(results["phases"]), "gathered": gathered.tolist(),
                    "averaged_grad": p.grad.tolist(), "one_row": one_row.tolist(), "shared": shared.tolist(),
                    "rows": rows, "stage_starts": stage_starts, "train_images": int((trainer.ctx.train_labels < trainer.phases()[-1].last).sum())}
            (Path(info_dir) / f"{job['name']}_rank{rank}.json").write_text(json.dumps(info))
    finally:
        distributed.shutdown()


def record_stage_starts(trainer) -> list[list]:
    """[phase, stage, digest of every module's weights and buffers] at each stage's start, filled in
    while ``trainer`` runs: they must be equal on every rank."""
    from utils import distributed

    starts, run_stage = [], trainer.run_stage

    def recorded(phase, stage, generator):
        state = [t for m in trainer.learner.modules().values() if m is not None
                 for t in (*m.parameters(), *m.buffers())]
        starts.append([phase.index, stage.name, distributed.tensor_digest(state)])
        return run_stage(phase, stage, generator)
    trainer.run_stage = recorded
    return starts


def count_rows(trainer) -> dict:
    """Counts, filled in while ``trainer`` runs, of the images this process put through the network
    in the memory updates (features) and in CIM's box computations (CAMs)."""
    rows = {"memory_features": 0, "boxes": 0, "memory_decoded": 0, "memory_fetched": 0}
    ctx = trainer.ctx
    update, to_input, training_images, training_source = (trainer.update_memory, ctx.to_input,
                                                           ctx.training_images, ctx.training_source)
    add_class = trainer.memory.add_class
    fetching = []

    def counted_update(phase):
        def counted_input(images, orig_hw=None):
            rows["memory_features"] += images.shape[0]
            return to_input(images, orig_hw)

        def counted_images(index):   # a share's candidates, or (in add_class) the exemplars kept
            rows["memory_fetched" if fetching else "memory_decoded"] += len(index)
            return training_images(index)

        def counted_source(index):   # a share's candidates read as their features are computed
            rows["memory_decoded"] += len(index)
            return training_source(index)
        ctx.to_input, ctx.training_images, ctx.training_source = counted_input, counted_images, counted_source
        try:
            update(phase)
        finally:
            ctx.to_input, ctx.training_images, ctx.training_source = to_input, training_images, training_source

    def counted_add_class(*args, **kwargs):
        fetching.append(True)
        try:
            return add_class(*args, **kwargs)
        finally:
            fetching.clear()
    trainer.update_memory, trainer.memory.add_class = counted_update, counted_add_class
    for plugin in trainer.plugins:
        if hasattr(plugin, "cams"):   # CIM: the CAMs of boxes, not those of rank 0's exemplar figure
            cams, after_phase = plugin.cams, plugin.after_phase
            figure = []

            def counted_cams(images, labels, cams=cams, figure=figure):
                rows["boxes"] += 0 if figure else images.shape[0]
                return cams(images, labels)

            def uncounted_after_phase(phase, after_phase=after_phase, figure=figure):
                figure.append(True)
                try:
                    after_phase(phase)
                finally:
                    figure.clear()
            plugin.cams, plugin.after_phase = counted_cams, uncounted_after_phase
    return rows


JOBS = {
    "icarl": tiny_config(**TWO),
    "der_cim": tiny_config(model_name="der", **TWO, **CIM),
    "foster_cim": tiny_config(model_name="foster", **TWO, **CIM),
    "lucir": tiny_config(model_name="lucir", cbf_epochs=1, **TWO),
    "diverge": tiny_config(num_phases=1, init_epochs=1),              # a NaN logged on rank 1 only
    # synthetic replay made here (chunks shared out) and mixed into every batch (ratio); the
    # pipeline and cache folder are filled in by the fixture
    "replay": tiny_config(**TWO, synthetic_replay={"source": "diffusers", "per_class": 4, "num_inference_steps": 2,
                                                  "gen_batch_size": 2, "ratio": 0.5}),
    "frozen_bn": tiny_config(**TWO, **FROZEN_BN),   # last: these freeze BatchNorm in the workers
    # LUCIR's less-forget and margin ranking are means over old-class rows: exact only when divided
    # by the global batch's count of them (each shard's own count gave 1.4 % off in phase 1)
    "frozen_bn_lucir": tiny_config(model_name="lucir", cbf_epochs=1, **TWO, **FROZEN_BN),
}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Every job of JOBS run by 2 processes: {name: (output folder, {rank: info})}."""
    import torch.multiprocessing as mp

    from utils.tiny_diffusion import build_tiny_pipeline

    base = tmp_path_factory.mktemp("ddp")
    replay = JOBS["replay"]["synthetic_replay"]
    replay["model_path"] = build_tiny_pipeline(str(base / "pipe"), image_size=32)
    replay["cache_dir"] = str(base / "synthetic")
    jobs = [{"name": name, "raw": raw, "out": str(base / name), "freeze_bn": name.startswith("frozen_bn"),
             "nan_on_rank": 1 if name == "diverge" else None} for name, raw in JOBS.items()]
    mp.spawn(_worker, args=(free_port(), jobs, str(base)), nprocs=WORLD, join=True)
    return {name: (base / name, {r: json.loads((base / f"{name}_rank{r}.json").read_text()) for r in range(WORLD)})
            for name in JOBS}


def _load_worker(rank: int, port: int, raw: dict, info_dir: str) -> None:
    """Build a Trainer (which loads the data) and record how many splits this process decoded."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from trainer import Trainer
    from utils import datasets, distributed
    from utils.config import resolve_config

    decoded, decode = [], datasets._decode_split
    datasets._decode_split = lambda info, root, split, *a, **k: decoded.append(split) or decode(info, root, split, *a, **k)
    distributed.init(torch.device("cpu"))
    try:
        try:
            trainer = Trainer(resolve_config(raw), Path(info_dir) / "run", "tiny")
        except Exception as err:  # noqa: BLE001 - recorded for the test
            info = {"decoded": decoded, "error": f"{type(err).__name__}: {err}"}
        else:
            info = {"decoded": decoded, "train": distributed.tensor_digest([trainer.train_labels, trainer.train_images])}
        (Path(info_dir) / f"load_rank{rank}.json").write_text(json.dumps(info))
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("corrupt", [False, True])
def test_with_a_cache_one_process_a_machine_decodes_the_data(tmp_path, corrupt):
    """Under torchrun the first process of a machine decodes and writes cache_dir's file, the others
    read it (every process decoded the whole set and wrote the same file: with 8 GPUs, 8 decodes on
    all cores each and 8 copies of an ImageNet-size temporary file at once). An unreadable image
    stops both processes with its DataError, the waiting one included."""
    import torch.multiprocessing as mp

    data = aspect_folder(tmp_path / "data")
    if corrupt:
        (data / "train" / "class1" / "03.png").write_bytes(b"not a png")
    raw = tiny_config(dataset="folder", data_root=str(data), shapes={}, init_cls=2, increment=2,
                      image_size=16, input_size=16, cache_dir=str(tmp_path / "cache"), num_workers=1)
    mp.spawn(_load_worker, args=(free_port(), raw, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"load_rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[1]["decoded"] == []
    if corrupt:
        assert ranks[0]["error"] == ranks[1]["error"] and ranks[1]["error"].startswith("DataError: ")
        assert "03.png" in ranks[1]["error"]
        return
    assert ranks[0]["decoded"] == ["train", "test"]
    assert ranks[0]["train"] == ranks[1]["train"]
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1


# ---- pieces, in one process ---------------------------------------------------------------------

def test_shards_split_every_global_batch_and_one_process_keeps_todays_batches():
    from utils.batching import shard_batches

    order = torch.randperm(75, generator=torch.Generator().manual_seed(0))
    plain = [order[i:i + 16] for i in range(0, 75, 16) if len(order[i:i + 16]) >= 2]
    assert [b.tolist() for b in shard_batches(order, 16, 2)] == [b.tolist() for b in plain]
    for world in (2, 3):
        shards = [shard_batches(order, 16, 2, (r, world)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1                       # every rank: the same number of steps
        for k in range(len(shards[0])):
            parts = [s[k] for s in shards]
            assert min(len(p) for p in parts) >= 2
            assert sorted(torch.cat(parts).tolist()) == sorted(order[16 * k:16 * (k + 1)].tolist())


def test_stage_batches_shard_the_mixed_sources_and_draw_augmentation_for_the_global_batch():
    from utils.augment import BatchShard, _uniform
    from utils.stage_data import EXEMPLAR, NEW, SYNTHETIC, SourceData, StageData

    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 2, 2).contiguous()
    syn = torch.full((7, 3, 2, 2), 200, dtype=torch.uint8)
    data = StageData.assemble([SourceData("new", images[:30], torch.zeros(30, dtype=torch.long), NEW),
                               SourceData("exemplars", images[30:], torch.ones(10, dtype=torch.long), EXEMPLAR),
                               SourceData("syn", syn, torch.full((7,), 2), SYNTHETIC, ratio=0.25)])

    def batches(shard):
        return list(data.batches(16, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4),
                                 shard=shard))

    one = batches((0, 1))
    two = [batches((r, 2)) for r in range(2)]
    assert one[0].positions is None and one[0].global_size is None      # one process: as before
    for k, whole in enumerate(one):
        shards = [two[r][k] for r in range(2)]
        assert {s.global_size for s in shards} == {len(whole.labels)}
        rows = torch.cat([s.positions for s in shards])
        assert sorted(rows.tolist()) == list(range(len(whole.labels)))
        for s in shards:   # each shard's samples are the global batch's rows at its positions
            assert torch.equal(s.images, whole.images[s.positions]) and torch.equal(s.origin, whole.origin[s.positions])
        draws = [_uniform((len(s.labels), 2), BatchShard(torch.Generator().manual_seed(5), s.positions,
                                                           s.global_size)) for s in shards]
        full = _uniform((len(whole.labels), 2), torch.Generator().manual_seed(5))
        for s, d in zip(shards, draws):
            assert torch.equal(d, full[s.positions])


def test_whole_stored_images_carry_their_sizes_into_shards_and_crop_as_in_one_process():
    """Stored form "whole": the original sizes travel with every sample (new images, exemplars; the
    synthetic mixed source as (0, 0), "as stored"), and a shard's crops are the global batch's rows."""
    from utils.augment import BatchShard, TrainAugment
    from utils.stage_data import EXEMPLAR, NEW, SYNTHETIC, SourceData, StageData

    images = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images[:, 0, 0, 0] = torch.arange(40, dtype=torch.uint8)   # which image a batch row is
    hw = torch.stack([torch.arange(40) + 20, 60 - torch.arange(40)], dim=1)
    data = StageData.assemble([
        SourceData("new", images[:30], torch.zeros(30, dtype=torch.long), NEW, torch.arange(30), orig_hw=hw[:30]),
        SourceData("exemplars", images[30:], torch.ones(10, dtype=torch.long), EXEMPLAR, orig_hw=hw[30:]),
        SourceData("syn", images[:7], torch.full((7,), 2), SYNTHETIC, ratio=0.25)])
    augment = TrainAugment(8, (0.5,) * 3, (0.25,) * 3, mode="resized_crop")

    def batches(shard):
        return list(data.batches(16, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4),
                                 shard=shard))

    one = batches((0, 1))
    two = [batches((r, 2)) for r in range(2)]
    for k, whole in enumerate(one):
        epoch = whole.origin != SYNTHETIC
        expected = hw[whole.images[:, 0, 0, 0].long()]
        assert torch.equal(whole.orig_hw[epoch], expected[epoch])
        assert torch.equal(whole.orig_hw[~epoch], torch.zeros(int((~epoch).sum()), 2, dtype=torch.long))
        full = augment(whole.images, torch.Generator().manual_seed(5), whole.orig_hw)
        for s in (two[r][k] for r in range(2)):
            assert torch.equal(s.orig_hw, whole.orig_hw[s.positions])
            part = augment(s.images, BatchShard(torch.Generator().manual_seed(5), s.positions, s.global_size),
                           s.orig_hw)
            assert torch.equal(part, full[s.positions])


def test_a_plain_run_takes_no_distributed_path(monkeypatch):
    from utils import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.env_world() == (0, 1, 0)
    assert not distributed.is_distributed()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    t = torch.arange(3)
    assert distributed.all_gather(t) is t and distributed.all_reduce_sum(t) is t


# ---- 2 processes ------------------------------------------------------------------------------

def test_every_rank_holds_the_same_memory_and_weights(two_process_runs):
    for name, (out, ranks) in two_process_runs.items():
        if name == "diverge":
            continue
        results = read_results(out)
        hashes = [p["memory"]["hash"] for p in results["phases"]]
        assert len(hashes) == 2 and hashes[0] != hashes[1], name
        assert ranks[0]["memory"] == ranks[1]["memory"] == hashes, name
        assert ranks[0]["weights"] == ranks[1]["weights"], name      # CIM's φ and BatchNorm statistics included


def test_all_gather_of_unequal_lengths_and_gradients_averaged_by_hand(two_process_runs):
    _, ranks = two_process_runs["icarl"]
    assert ranks[0]["gathered"] == ranks[1]["gathered"] == [0, 1, 10, 11, 12]
    assert ranks[0]["averaged_grad"] == ranks[1]["averaged_grad"] == [1.5, 1.5, 1.5]


def test_map_shards_gathers_every_share_in_order_even_an_empty_one(two_process_runs):
    _, ranks = two_process_runs["icarl"]
    for r in range(WORLD):
        assert ranks[r]["one_row"] == [[1.0, 1.0, 1.0]]
        assert ranks[r]["shared"] == [[float(i)] * 2 for i in range(7)]


def test_the_ranks_share_out_the_memory_features_and_the_cam_boxes(two_process_runs):
    """Each rank decodes and embeds about half of the new classes' images for herding (every class
    seen is new once, so the shares add up to those classes' training images); rank 0 alone
    fetches the images it keeps, no more than the memory holds; each rank computes the CAMs of
    about half of the images whose boxes CIM needs; the memories still agree (test above)."""
    for name in ("icarl", "der_cim"):
        out, ranks = two_process_runs[name]
        for count in ("memory_features", "memory_decoded"):
            shares = [ranks[r]["rows"][count] for r in range(WORLD)]
            assert sum(shares) == ranks[0]["train_images"], (name, count)
            assert abs(shares[0] - shares[1]) <= 4, (name, count, shares)   # at most one row per class apart
        phases = read_results(out)["phases"]
        stored_new = sum(sum(p["memory"]["per_class"][p["classes"][0]:p["classes"][1]]) for p in phases)
        assert ranks[0]["rows"]["memory_fetched"] == stored_new > 0, name
        assert ranks[1]["rows"]["memory_fetched"] == 0, name
    boxes = [two_process_runs["der_cim"][1][r]["rows"]["boxes"] for r in range(WORLD)]
    assert min(boxes) > 0 and abs(boxes[0] - boxes[1]) <= 0.1 * sum(boxes), boxes


def test_rank_0_alone_writes_the_run_folder(two_process_runs):
    out, ranks = two_process_runs["icarl"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "checkpoints", "checkpoints/phase_0.pt", "checkpoints/phase_1.pt", "config.json", "log.txt",
        "metrics.jsonl", "results.json"]
    log = (out / "log.txt").read_text()
    for k in range(2):
        assert log.count(f"== phase {k}:") == 1 and log.count(f"-- phase {k} done") == 1
    assert "global batch 32 split across 2 processes" in log and "identical on 2 processes" in log
    assert [(m["phase"], m["epoch"]) for m in read_metrics(out)] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    results = read_results(out)
    assert results["world_size"] == 2
    assert ranks[0]["returned_phases"] == 2 and ranks[1]["returned_phases"] == 0


def test_cim_and_frozen_parts_train_under_ddp(two_process_runs):
    for name in ("der_cim", "foster_cim"):
        out, ranks = two_process_runs[name]
        # every stage starts from the same modules on both ranks (FOSTER's compression started from
        # a teacher whose BatchNorm statistics each rank had updated on its own shard while boosting)
        assert ranks[0]["stage_starts"] == ranks[1]["stage_starts"], name
        later = read_results(out)["phases"][1]["compression"]
        assert later["bilevel"]["iterations"] + later["bilevel"]["skipped_nonfinite"] == 2 * 2, name
        assert later["box_refresh"]["count"] >= 1, name
        assert (out / "exemplars_phase_1.png").is_file()
    lucir = read_metrics(two_process_runs["lucir"][0])
    assert [m["stage"] for m in lucir if m["phase"] == 1] == ["train", "train", "balanced_finetune"]


def test_a_nan_loss_on_one_rank_stops_every_rank(two_process_runs):
    out, ranks = two_process_runs["diverge"]
    for r in range(WORLD):
        assert ranks[r]["diverged"].startswith("Training diverged in phase 0, stage 'train', epoch 1"), r
    assert not (out / "results.json").exists()


def test_synthetic_replay_generated_in_shards_and_mixed_into_sharded_batches(two_process_runs):
    from utils import replay_folder

    out, _ = two_process_runs["replay"]
    results = read_results(out)
    # phase 0's classes are made when phase 1 begins, both ranks' chunks
    assert [p["synthetic_replay"]["generated_this_phase"] for p in results["phases"]][:2] == [0, 2 * 4]
    folder = Path(results["synthetic_replay"]["folder"])
    ids = results["class_names"][:2]
    assert sorted(replay_folder.read_manifest(str(folder))["classes"]) == sorted(ids)
    for cid in ids:
        assert sorted(p.name for p in (folder / cid).iterdir()) == [replay_folder.image_name(i) for i in range(4)]
    assert "each batch of 32 gets 16 more from synthetic" in (out / "log.txt").read_text()


def test_evaluation_on_rank_0_equals_one_process_on_the_same_weights(two_process_runs):
    from trainer import Trainer
    from utils.config import resolve_config

    out, _ = two_process_runs["icarl"]
    results = read_results(out)
    trainer = Trainer(resolve_config(JOBS["icarl"]), out.parent / "eval_copy", "tiny")
    state = torch.load(out / "checkpoints" / "phase_1.pt", map_location="cpu", weights_only=False)
    trainer.load_state(state)
    report = trainer.evaluate(trainer.phases()[1])
    for model in ("cnn", "nme"):
        assert report[model] == results["phases"][1][model], model


@pytest.mark.parametrize("job", ["frozen_bn", "frozen_bn_lucir"])
def test_two_processes_match_one_when_only_summation_order_differs(two_process_runs, tmp_path, monkeypatch, job):
    from torch.nn.modules.batchnorm import _BatchNorm

    monkeypatch.setattr(_BatchNorm, "train", lambda self, mode=True: torch.nn.Module.train(self, False))
    one = run(JOBS[job], tmp_path / "one")
    out, _ = two_process_runs[job]
    two = read_results(out)
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(out)):
        for key, value in a["losses"].items():
            assert b["losses"][key] == pytest.approx(value, rel=1e-3 if a["phase"] else 1e-5), (a["phase"], key)
    p1, p2 = one["phases"], two["phases"]
    assert p1[0]["memory"]["hash"] == p2[0]["memory"]["hash"]
    assert p1[0]["cnn"] == p2[0]["cnn"] and p1[0]["nme"] == p2[0]["nme"]
    assert p2[1]["cnn"]["top1"] == pytest.approx(p1[1]["cnn"]["top1"], abs=2.5)


def test_two_processes_with_batchnorm_stay_close_to_one(two_process_runs, tmp_path):
    one = run(JOBS["icarl"], tmp_path / "one")
    out, _ = two_process_runs["icarl"]
    a, b = read_metrics(tmp_path / "one")[0], read_metrics(out)[0]
    assert b["losses"]["loss"] == pytest.approx(a["losses"]["loss"], rel=0.15)
    two = read_results(out)
    for p1, p2 in zip(one["phases"], two["phases"]):
        assert p1["memory"]["per_class"] == p2["memory"]["per_class"]   # same budget, same counts


# ---- the command line under torchrun ------------------------------------------------------------

def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_resume_under_torchrun_equals_the_uninterrupted_run(two_process_runs, tmp_path):
    out, _ = two_process_runs["icarl"]
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "checkpoints" / "phase_1.pt").unlink()          # stopped after phase 0
    config = write_config(tmp_path / "tiny.json", JOBS["icarl"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(REPO / "main.py"), "--config", str(config), "--output", str(resumed), "--resume"]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert without_seconds(read_results(resumed)) == without_seconds(read_results(out))
    log = (resumed / "log.txt").read_text()
    assert log.count("resume: restored phase 0") == 1 and log.count("== phase 1:") == 2   # first run + resumed


def _start(args: list[str], cwd: Path, rank_args: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
    """``main.py args`` (and ``rank_args[rank]``) in 2 processes with the variables torchrun sets."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, str(REPO / "main.py"), *args, *(rank_args or {}).get(r, [])],
                             cwd=cwd, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r),
                                  "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(r)})
            for r in range(WORLD)]


def _outcomes(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    """Each process's exit status and output; a process still running after 180 s fails the test."""
    outcomes = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process hung")
        outcomes.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return outcomes


def test_sync_bn_on_the_cpu_is_refused_before_the_process_group(tmp_path, monkeypatch, capsys):
    import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    write_config(tmp_path / "tiny.json", tiny_config(sync_bn=True))
    assert main.main(["--config", "tiny"]) == 2
    assert "sync_bn" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("flags", [[], ["--check"]])
def test_a_batch_too_small_to_split_is_refused_before_training(tmp_path, monkeypatch, capsys, flags):
    """batch_size 3 over 2 processes: shares of one sample, each dropped, so every step was skipped and
    the untrained network saved as finished phases (exit 0)."""
    import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    write_config(tmp_path / "tiny.json", tiny_config(batch_size=3))
    assert main.main(["--config", "tiny", *flags]) == 2
    err = capsys.readouterr().err
    assert "Config key 'batch_size' is 3, split across 2 processes" in err and "at least 4" in err
    assert not (tmp_path / "logs").exists()


def test_config_errors_stop_every_process_with_exit_2(two_process_runs, tmp_path):
    out, _ = two_process_runs["icarl"]
    # Before the process group exists: every rank validates the same config.
    write_config(tmp_path / "bad.json", tiny_config(memroy_size=10))
    bad = _start(["--config", "bad"], tmp_path)
    # After: rank 0 refuses to resume into a folder of another config; every rank exits 2 with it.
    other = tmp_path / "other"
    shutil.copytree(out, other)
    write_config(tmp_path / "changed.json", {**JOBS["icarl"], "memory_size": 40})
    changed = _start(["--config", "changed", "--output", str(other), "--resume"], tmp_path)
    # Rank 0 alone takes the run lock; a folder locked by another live run is refused on every rank.
    locked = tmp_path / "locked"
    shutil.copytree(out, locked)
    from utils.run_lock import RunLock

    lock = RunLock(locked)
    lock.acquire()
    held = (locked / "run.lock").read_text()
    write_config(tmp_path / "same.json", JOBS["icarl"])
    busy = _start(["--config", "same", "--output", str(locked), "--resume"], tmp_path)
    # A process started with another setting (or config file, checkout, data): both stop, naming it
    # (rank 1 trained another run beside rank 0, or both hung in a collective).
    unlike = _start(["--config", "same", "--output", str(tmp_path / "unlike")], tmp_path,
                    rank_args={1: ["--set", "init_lr=0.5"]})
    # A cache on one machine and none on another: the processes would wait for each other in
    # different collectives (the data-loading wait and the next comparison); refused before the data.
    # Another cache folder (per machine) is allowed.
    cached = _start(["--config", "same", "--output", str(tmp_path / "cached")], tmp_path,
                    rank_args={1: ["--set", f"cache_dir={tmp_path / 'cache'}"]})
    for done in _outcomes(bad):
        assert done.returncode == 2, done.stderr
        assert "memroy_size" in done.stderr and "Traceback" not in done.stderr
    for done in _outcomes(changed):
        assert done.returncode == 2, done.stderr
        assert "Cannot resume in" in done.stderr and "memory_size" in done.stderr
    for done in _outcomes(busy):
        assert done.returncode == 2, done.stderr
        assert "in use by another run" in done.stderr and "Traceback" not in done.stderr
    for done in _outcomes(unlike):
        assert done.returncode == 2, done.stderr
        assert ("The 2 processes did not start the same run: the config of rank(s) 1 differ from rank 0's "
                "(config keys: init_lr)") in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "unlike" / "results.json").exists()
    for done in _outcomes(cached):
        assert done.returncode == 2, done.stderr
        assert "the config of rank(s) 1 differ from rank 0's (config keys: cache)" in done.stderr, done.stderr
    assert (locked / "run.lock").read_text() == held == f"{os.getpid()} {socket.gethostname()}\n"   # untouched
    lock.release()
