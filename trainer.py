"""The phase loop: the one place that knows about devices, AMP, epochs, data, memory, evaluation,
logs and checkpoints. Learners (``models/``) supply network changes, stages and losses; plugins
(``models/plugins.py``) attach to named hooks.

Per phase k: learner grows its network → run the learner's stages, each on data assembled from
a list of sources (new-class images, the exemplar memory, and what plugins add, e.g. synthetic
replay; ``utils/stage_data.py``) → end-of-training step → memory update (herding) → post-memory
stages → evaluation (CNN, NME, extra models) → checkpoint and results.json, both atomic.

Learners and plugins see a :class:`models.context.RunContext`, never the trainer.

Under ``torchrun`` (``utils/distributed.py``) every process runs this loop on its shard of each
global batch, the stage's network wrapped in DistributedDataParallel; the ranks share out the
memory update (each decodes, boxes and embeds its share of the new classes' images), rank 0
alone decides the memory (then broadcast), evaluates, and writes the run folder.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.base import Batch, Learner, Phase, Stage
from models.context import RunContext
from models.plugins import PLUGINS
from models.registry import get_learner_class
from utils import batching, distributed, image_cache, provenance
from utils.augment import BatchShard, TrainAugment
from utils.config import config_hash, hashed_keys, phase_plan, resolve_saved_config, result_key_differences, run_notes
from utils.datasets import DATASETS, load_dataset
from utils.errors import ConfigError, UserError, interruption_of, raise_if_terminated
from utils.io import check_entry_kinds, remove_stale_tmp, save_torch, write_json
from utils.memory import Candidates, ExemplarMemory, candidate_share
from utils.metrics import accuracy_report, summarize
from utils.results_file import load_results
from utils.nme import class_means, nme_logits
from utils.run_lock import RunLock
from utils.run_log import RunLog
from utils.seeding import phase_seed, rng_states, seed_everything, set_rng_states
from utils.stage_data import EXEMPLAR, NEW, SourceData, StageData, epoch_class_counts


def lower_lr_hint(stages: list[Stage], bf16: bool) -> str:
    """What to change after ``stages`` diverged: their learning rates, each with the config key
    that set it (``Stage.lr_key``), and bf16 autocast (``amp``) where it ran."""
    rates = ", ".join(f"{s.lr:g}" + (f" (`{s.lr_key}`)" if s.lr_key else "") + f" in stage '{s.name}'" for s in stages)
    return (f"Try a lower learning rate than {rates}" + (", or `amp: false` (it ran in bfloat16)" if bf16 else "")
            + ".")


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the phase, stage and epoch."""


class RunInterrupted(Exception):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (``utils.errors.Terminated``) during a run.
    ``saved_phase``: the newest phase whose checkpoint is on disk (None: nothing to resume from);
    ``out``: the run folder; ``how``: "Ctrl-C" or "SIGTERM"."""

    def __init__(self, out: Path, saved_phase: int | None, checkpoints: str, how: str = "Ctrl-C"):
        self.out, self.saved_phase, self.checkpoints, self.how = out, saved_phase, checkpoints, how
        super().__init__(f"interrupted ({how}) in {out}")


def resolve_device(name: str) -> torch.device:
    """The device of this process. Under torchrun ("cuda" or "auto" with CUDA): ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"Config key 'device' is '{name}' but CUDA is not available here; use 'cpu' or 'auto'.")
    _, world, local_rank = distributed.env_world()
    if world > 1 and name.startswith("cuda"):
        if name != "cuda":
            raise UserError(f"Config key 'device' is '{name}', but under torchrun every process uses the GPU of its "
                            f"LOCAL_RANK: use 'cuda' or 'auto'.")
        return torch.device("cuda", local_rank)
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"Config key 'device' is '{name}', but this machine has {torch.cuda.device_count()} GPU(s) "
                        f"(cuda:0 … cuda:{torch.cuda.device_count() - 1}); use one of them, 'cuda' or 'auto'.")
    return device


def class_order(num_classes: int, seed: int, shuffle: bool) -> list[int]:
    """The class order (dataset class indices): a permutation seeded with ``seed`` (SPEC.md §1)."""
    if not shuffle:
        return list(range(num_classes))
    import numpy as np

    return np.random.RandomState(seed).permutation(num_classes).tolist()


def stage_parameters(stage: Stage) -> list[torch.nn.Parameter]:
    """The parameters of ``stage.params`` (plain, or flattened from parameter groups)."""
    out = []
    for p in stage.params:
        out += list(p["params"]) if isinstance(p, dict) else [p]
    return out


# What save_checkpoint writes, and so what a resume needs (a file without one of them is skipped).
CHECKPOINT_KEYS = ("phase", "config_hash", "class_order", "learner", "memory", "plugins", "results", "rng")


def global_mask_count(share: float):
    """``Batch.mask_count`` of a shard holding ``share`` of the global batch: the global batch's count
    of the mask's rows (at least 1; an all-reduce) × ``share``. A term divided by it and weighted by
    the shard's share (the backward's loss scaling) averages over the ranks to the global masked mean."""
    def count(mask: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(mask.sum().float()).clamp(min=1) * share
    return count


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks (for parameters no DDP wrapper holds)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(distributed.all_reduce_sum(p.grad) / distributed.world_size())


def reduce_epoch_sums(sums: dict, correct: torch.Tensor, seen: int) -> tuple[dict, torch.Tensor, int]:
    """An epoch's per-rank sums (loss × samples by name, correct predictions, samples) summed over
    the ranks, in one collective."""
    keys = sorted(sums)
    device = correct.device
    local = torch.stack([torch.as_tensor(sums[k], device=device).float() for k in keys]
                        + [correct.float(), torch.tensor(float(seen), device=device)])
    total = distributed.all_reduce_sum(local.double()).float()
    return {k: total[i] for i, k in enumerate(keys)}, total[-2], int(round(float(total[-1])))


CHECKPOINT_NAME = re.compile(r"phase_(0|[1-9][0-9]*)\.pt")   # not phase_01.pt: one name per phase
# What a run writes in its folder besides config.json (and run.lock): a fresh run removes these of
# an earlier run, and nothing else (a file a user or another tool put there stays).
RUN_FILES = ("results.json", "metrics.jsonl", "log.txt")
FIGURE_NAME = re.compile(r"exemplars_phase_\d+\.png")


def saved_checkpoints(out: Path) -> dict[int, Path]:
    """The phase checkpoints a run folder holds: {phase index: path of checkpoints/phase_<k>.pt}.
    Only names of exactly that form count (``phase_1 copy.pt`` or ``phase_0_backup.pt`` do not)."""
    found = {}
    for path in Path(out).glob("checkpoints/phase_*.pt"):
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return found


def earlier_run_files(out: Path) -> list[Path]:
    """The files an earlier run wrote in ``out`` (its checkpoints, results, metrics, log and
    exemplar figures), by name; what a fresh run removes."""
    out = Path(out)
    figures = [p for p in out.glob("exemplars_phase_*.png") if FIGURE_NAME.fullmatch(p.name)]
    checkpoints = saved_checkpoints(out)
    return ([p for p in map(out.joinpath, RUN_FILES) if p.is_file()] + sorted(figures)
            + [checkpoints[k] for k in sorted(checkpoints)])


def is_run_config(saved: dict) -> bool:
    """Whether a folder's config.json was written by this framework (today's schema or an older one)."""
    return isinstance(saved, dict) and {"model_name", "dataset"} <= set(saved)


class Trainer:
    def __init__(self, cfg: dict, output_dir: str | Path, config_name: str = "run",
                 stop_after_phase: int | None = None):
        """``stop_after_phase``: end the run after that phase (its checkpoint written), as an
        interrupted run would; ``run(resume=True)`` continues it. For tests of resumption."""
        self.cfg = cfg
        self.stop_after_phase = stop_after_phase
        self.out = Path(output_dir)
        self.config_name = config_name
        self.device = resolve_device(cfg["device"])
        self.on_cuda = self.device.type == "cuda"
        self.amp = cfg["amp"] and self.on_cuda
        self.channels_last = cfg["channels_last"] and self.on_cuda
        if self.on_cuda:
            # Fixed input shapes: let cuDNN time its algorithms once and keep the fastest.
            torch.backends.cudnn.benchmark = True
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.memory_digests: list[str] = []   # this process's memory digest after each phase it ran
        self.log = RunLog(self.out, enabled=self.is_main)   # rank 0 alone prints and writes
        self.hash = config_hash(cfg)
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        seed_everything(cfg["seed"])

        info = DATASETS[cfg["dataset"]]
        self.image_size = cfg["image_size"] or info.image_size
        self.input_size = cfg["input_size"] or info.input_size
        self.same_on_every_rank(self._config_fingerprint())   # before the data: nothing waits on a stray rank
        self.data = self._load_data()
        self.num_classes = len(self.data.class_names)
        self.plan = phase_plan(cfg, self.num_classes)
        self.order = class_order(self.num_classes, cfg["seed"], cfg["shuffle"])
        remap = torch.empty(self.num_classes, dtype=torch.long)
        remap[torch.tensor(self.order)] = torch.arange(self.num_classes)
        self.train_labels = remap[self.data.train.labels]
        self.test_labels = remap[self.data.test.labels]
        self.train_images = self._source(self.data.train)
        self.test_images = self._source(self.data.test)
        # stored form "whole": the original (height, width) of every training image, which follows
        # the images into every stage's data (exemplars through their training-set index)
        self.train_orig_hw = self.data.train.orig_hw

        self.augment = TrainAugment(
            self.input_size, self.data.mean, self.data.std, mode=cfg["augment"] or info.augment,
            padding=cfg["crop_padding"], scale=tuple(cfg["rrc_scale"]), flip=cfg["flip"],
            color_jitter=cfg["color_jitter"], autoaugment=cfg["autoaugment"], cutout=cfg["cutout"])
        self.memory = ExemplarMemory(cfg["memory_size"], cfg["memory_per_class"], cfg["fixed_memory"],
                                     cfg["compress_ratio"], cfg["herding"])
        self.ctx = RunContext(
            cfg=cfg, device=self.device, amp=self.amp, channels_last=self.channels_last,
            image_size=self.image_size, input_size=self.input_size, mean=self.data.mean, std=self.data.std,
            augment=self.augment, log=self.log, out=self.out, train_images=self.train_images,
            train_labels=self.train_labels, memory=self.memory, class_counts=self.class_counts,
            added_counts=self.added_counts,
            class_names=[self.data.class_names[c] for c in self.order], plan=self.plan,
            rank=self.rank, world_size=self.world, train_orig_hw=self.train_orig_hw)
        self.learner: Learner = get_learner_class(cfg["model_name"])(cfg, self.ctx)
        self.ctx.learner = self.learner
        self.same_on_every_rank({"the classes (names, order)": json.dumps(self.data.class_names),
                                 "the training labels": distributed.tensor_digest([self.train_labels]),
                                 "the test labels": distributed.tensor_digest([self.test_labels])})
        self.plugins = [cls(cfg, self.ctx) for cls in PLUGINS.values() if cls.enabled(cfg)]
        self.environment = provenance.environment(self.device)   # the code and versions this process runs
        self.results = {"config": cfg, "config_hash": self.hash, "world_size": self.world,
                        "environment": self.environment, "class_order": self.order,
                        "class_names": [self.data.class_names[c] for c in self.order],
                        **{k: v for p in self.plugins for k, v in p.run_info().items()}, "phases": [], "summary": {}}

    # Keys that may differ between processes of one run: where each machine keeps its data, caches
    # and pipelines, and how many CPU workers and threads it gives the process (whether a cache is
    # kept is compared: it decides whether the processes wait for each machine's first one).
    PER_PROCESS_KEYS = ("data_root", "class_list", "cache_dir", "num_workers", "threads", "device")
    PER_PROCESS_BLOCK_KEYS = {"synthetic_replay": ("path", "model_path", "cache_dir", "class_names")}

    def _config_fingerprint(self) -> dict[str, str]:
        """What every process of a run must have resolved alike before it loads data: the config (but
        the per-machine keys), whether it keeps a data cache, its device type and its code commit
        (``+dirty`` and ``unknown`` are not compared: a slow ``git status`` may not say)."""
        shared = {k: v for k, v in self.cfg.items() if k not in self.PER_PROCESS_KEYS}
        for block, keys in self.PER_PROCESS_BLOCK_KEYS.items():
            if isinstance(shared.get(block), dict):
                shared[block] = {k: v for k, v in shared[block].items() if k not in keys}
        code = provenance.code_version().split("+")[0]
        return {"the config": json.dumps({**shared, "cache": self.cfg["cache_dir"] is not None,
                                          "device type": self.device.type}, sort_keys=True, default=str),
                "the code version": "" if code == "unknown" else code}

    def same_on_every_rank(self, mine: dict[str, str]) -> None:
        """ConfigError on every rank unless every rank has the same ``mine`` (part name -> its value;
        a part some rank leaves empty is not compared): a process started with another --set, config
        file, checkout or copy of the data otherwise hangs in a collective, or trains a different run
        unnoticed. Every rank must call it alike (an all-gather)."""
        if self.world == 1:
            return
        every = distributed.all_gather_object(mine)
        differ = [part for part in mine if len({f[part] for f in every if f[part]}) > 1]
        if not differ:
            return
        ranks = [r for r, f in enumerate(every) if any(f[p] != every[0][p] for p in differ)]
        keys = []
        if "the config" in differ:
            configs = [json.loads(f["the config"]) for f in every]
            keys = sorted({k for c in configs for k in set(c) | set(configs[0]) if c.get(k) != configs[0].get(k)})
        raise ConfigError(f"The {self.world} processes did not start the same run: {', '.join(differ)} of "
                          f"rank(s) {', '.join(map(str, ranks))} differ from rank 0's"
                          + (f" (config keys: {', '.join(keys)})" if keys else "")
                          + ". Start every process with the same config file, --set flags, code and data.")

    # ---- data ---------------------------------------------------------------------------------
    def _load_data(self):
        """The dataset, decoded (or read from ``cache_dir``). Under torchrun each machine's first
        process decodes and writes the cache while the others wait, then they read it, instead of
        every process decoding the whole set and writing the same file; without a cache every
        process decodes, with its share of the machine's cores (num_workers 0)."""
        cfg = self.cfg
        workers = image_cache.process_workers(cfg["num_workers"])

        def load(workers=workers):
            return load_dataset(cfg["dataset"], cfg["data_root"], image_size=self.image_size,
                                class_list=cfg["class_list"], cache_dir=cfg["cache_dir"],
                                skip_unreadable=cfg["skip_unreadable"], in_memory=cfg["in_memory"],
                                shapes=cfg["shapes"], num_workers=workers, stored_form=cfg["stored_form"])
        if self.world == 1 or cfg["cache_dir"] is None:
            return load()
        first = distributed.first_on_node_leaders(lambda: load(cfg["num_workers"] or None))
        return first if first is not None else load()

    def _source(self, split) -> batching.Images:
        from utils.datasets import FileImages

        if split.images is not None:
            return split.images
        # streamed: decoded by the loader workers, or (stream_decode "device") batch by batch on
        # this run's device from the bytes the workers read (utils.stream_decode)
        decode_on = self.device if self.cfg["stream_decode"] == "device" else None
        return FileImages(split.paths, self.image_size, decode_on)

    def stage_sources(self, phase: Phase, kind: str) -> list[SourceData]:
        """The sources of a stage's data, in order: for ``kind`` "phase" the new classes' training
        images, then the exemplar memory (for "memory" the memory alone), then what the plugins add
        (e.g. synthetic replay)."""
        parts = []
        if kind == "phase":
            new = ((self.train_labels >= phase.first) & (self.train_labels < phase.last)).nonzero().flatten()
            parts.append(SourceData("new", batching.select(self.train_images, new), self.train_labels[new], NEW, new,
                                    orig_hw=self.ctx.orig_hw(new)))
        mem_images, mem_labels = self.memory.tensors()
        parts.append(SourceData("exemplars", mem_images, mem_labels, EXEMPLAR,
                                orig_hw=self.ctx.orig_hw(self.memory.source_indices())))
        for plugin in self.plugins:
            parts += plugin.sources(phase, kind)
        return parts

    def stage_data(self, phase: Phase, kind: str) -> StageData:
        return StageData.assemble(self.stage_sources(phase, kind))

    def class_counts(self, phase: Phase) -> torch.Tensor:
        """float [classes seen]: real per-class sample counts of the phase data — training images for
        new classes, stored exemplars for old ones (a count, never a sum of indices)."""
        new = self.train_labels[(self.train_labels >= phase.first) & (self.train_labels < phase.last)]
        counts = torch.bincount(new, minlength=phase.last)
        counts[:phase.first] = torch.tensor(self.memory.counts(phase.first), dtype=counts.dtype)
        return counts.float()

    def added_counts(self, phase: Phase) -> dict[str, torch.Tensor]:
        """{"ce": float [classes seen], "kd": ...}: the samples of each class that the plugins' sources
        (synthetic replay) add to an epoch of the phase data and that count in the classification
        loss / in distillation; a per-batch ``ratio`` source its expected draws
        (``epoch_class_counts``). Call it after the plugins' ``before_phase``."""
        added = [p for plugin in self.plugins for p in plugin.sources(phase, "phase")]
        epoch_size = int(self.class_counts(phase).sum()) + sum(len(p) for p in added if p.ratio is None)
        out = {"ce": torch.zeros(phase.last), "kd": torch.zeros(phase.last)}
        for p in added:
            drawn = epoch_class_counts(p, epoch_size, self.cfg["batch_size"], phase.last, self.world)
            for loss, counted in (("ce", p.in_ce), ("kd", p.in_kd)):
                if counted:
                    out[loss] += drawn
        return out

    # ---- the training loop --------------------------------------------------------------------
    def _optimizer(self, stage: Stage):
        params = list(stage.params)
        # Parameters a plugin optimises itself (the CIM model's PAU coefficients) are never θ's.
        owned = {id(p) for plugin in self.plugins for p in plugin.owned_parameters()}
        if params and not isinstance(params[0], dict):   # plain parameters, not param groups
            params = [p for p in params if p.requires_grad and id(p) not in owned]
        opt = torch.optim.SGD(params, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
        if stage.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(stage.epochs, 1))
        elif stage.scheduler == "multistep":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(stage.milestones), gamma=stage.gamma)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
        return opt, sched

    def resident(self, data: StageData) -> StageData:
        """``data`` on the GPU when its images are an in-memory tensor small enough (2³¹ elements)
        to keep there for the whole stage (no per-batch host copies); else ``data`` as it is."""
        if isinstance(data.images, torch.Tensor) and self.on_cuda and data.images.numel() < 2 ** 31:
            return data.to(self.device)
        return data

    def run_stage(self, phase: Phase, stage: Stage, generator: torch.Generator) -> None:
        if stage.epochs == 0:
            self.log.info(f"  stage {stage.name}: 0 epochs, not trained")
            return
        data = self.stage_data(phase, stage.data)
        if len(data) < 2:
            self.log.info(f"  stage {stage.name}: skipped, only {len(data)} training samples")
            return
        data = self.resident(data)
        for plugin in self.plugins:
            plugin.before_stage(phase, stage, data)
        stage.params = list(stage.params)   # read twice below (a generator could be read once)
        forward, ddp, by_hand = self._distributed_forward(stage)
        if self.cfg["compile"]:
            # The stage's forward (through the DDP wrapper when there is one), compiled afresh for
            # each stage: the network may have grown or been frozen since the last one. Compiling
            # the function rather than the module (nn.Module.compile) keeps deep copies such as
            # the old network of distillation free of a compiled call bound to the original.
            # Dynamo's caches are dropped first: they are keyed by code object, so the stages of
            # later phases would otherwise pile up recompilations past its limit and fall back to
            # eager without a word.
            torch._dynamo.reset()
            forward = torch.compile(forward, mode=self.cfg["compile_mode"])
        opt, sched = self._optimizer(stage)
        batch_size = stage.batch_size or self.cfg["batch_size"]
        mix_generator = self.ctx.stream(f"mix/{stage.name}", phase.index)   # draws of the ratio sources
        shard = (self.rank, self.world)
        if self.world > 1:
            self.log.info(f"  stage {stage.name}: global batch {batch_size} split across {self.world} processes "
                          f"(~{batch_size // self.world} each)")
        counts = data.counts()
        if set(counts) - {"new", "exemplar"}:   # a plugin's source joined: say what the stage trains on
            mixed = "".join(f"; each batch of {batch_size} gets {round(p.ratio * batch_size)} more from {p.name}"
                            for p in data.mixed)
            self.log.info(f"  stage {stage.name}: samples by origin {counts}{mixed}")
        bar = tqdm(range(stage.epochs), desc=f"phase {phase.index} {stage.name}", disable=None if self.is_main else True,
                   leave=False)
        for epoch in bar:
            start = time.monotonic()
            stage.train_mode()
            sums: dict[str, torch.Tensor] = {}
            correct = torch.zeros((), device=self.device)
            seen = 0
            for raw in data.batches(batch_size, generator, mix_generator, self.device, self.cfg["num_workers"], shard):
                raise_if_terminated()   # a SIGTERM whose exception a finalizer swallowed (utils.errors)
                imgs, y = raw.images, raw.labels
                for plugin in self.plugins:
                    imgs = plugin.before_augment(imgs, raw, stage, epoch)
                # Several processes: each draws the augmentation of the whole global batch and keeps
                # its shard's rows, so every sample is augmented as in one process and the
                # generator (which also draws the next epoch's order) stays in step on every rank.
                x = self.augment(imgs, generator if self.world == 1 else
                                 BatchShard(generator, raw.positions, raw.global_size), raw.orig_hw)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                ce_mask, kd_mask = data.loss_masks(raw.origin)
                batch = Batch(x, y, y < phase.first, raw.origin, ce_mask, kd_mask,
                              None if self.world == 1 else global_mask_count(y.shape[0] / raw.global_size))
                with self.ctx.autocast():
                    out = forward(x)
                    loss, parts = stage.loss(out, batch)
                opt.zero_grad(set_to_none=True)
                if self.world == 1:
                    loss.backward()
                else:
                    # DDP averages the ranks' gradients; weighting each rank's mean loss by its share
                    # of the global batch makes that average the gradient of the global batch's mean
                    # (shards differ by one sample when the batch does not split evenly).
                    (loss * (y.shape[0] * self.world / raw.global_size)).backward()
                    average_gradients(by_hand)
                opt.step()
                n = y.shape[0]
                seen += n
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() * n
                if "logits" in out:
                    correct += (out["logits"].argmax(1) == y).sum()
            # The last step's autograd graph goes before the plugins' end-of-epoch work: kept alive,
            # its nodes (the parameters' gradient accumulators, made on the training stream) would
            # meet that work's gradients, and CIM's bilevel step could not be recorded as a CUDA graph.
            out = loss = parts = batch = x = v = None
            lr = opt.param_groups[0]["lr"]   # the rate this epoch used (before the scheduler's step)
            sched.step()
            if self.world > 1:   # the epoch's numbers over every rank's samples (the same on every rank)
                sums, correct, seen = reduce_epoch_sums(sums, correct, seen)
            losses = {k: (v / max(seen, 1)).item() for k, v in sums.items()}
            if not all(math.isfinite(v) for v in losses.values()):
                raise TrainingDiverged(
                    f"Training diverged in phase {phase.index}, stage '{stage.name}', epoch {epoch + 1}: "
                    f"losses {losses}. Results of the earlier phases are kept in {self.out}. "
                    f"{lower_lr_hint([stage], self.cfg['amp'] and self.device.type == 'cuda')}")
            for plugin in self.plugins:
                plugin.after_epoch(phase, stage, epoch, lr)
            record = {"phase": phase.index, "stage": stage.name, "epoch": epoch + 1, "lr": lr,
                      "losses": {k: round(v, 6) for k, v in losses.items()},
                      "train_acc": round(100.0 * correct.item() / max(seen, 1), 4),
                      "seconds": round(time.monotonic() - start, 3)}
            self.log.metric(record)
            bar.set_postfix(loss=f"{losses.get('loss', float('nan')):.3f}", acc=f"{record['train_acc']:.1f}")
        del ddp, forward   # the next stage wraps its own network
        # DDP keeps the wrapped network's buffers equal, not those of modules outside it that the
        # stage ran in train mode (FOSTER's teacher after boosting): the next stage, and on_end,
        # must start from the same modules on every rank
        self.sync_modules()
        if stage.on_end is not None:
            stage.on_end()
        for plugin in self.plugins:
            plugin.after_stage(phase, stage)

    def _distributed_forward(self, stage: Stage):
        """(forward, DDP wrapper or None, parameters whose gradients are averaged by hand).

        One process: the stage's own forward. Several: ``stage.model`` is wrapped in
        DistributedDataParallel for this stage only (after the learner grew and froze its parts;
        frozen parameters are not registered, and parameters the stage does not train — LUCIR's
        old classifier rows, the plugins' own, such as CIM's φ — are ignored), and the forward goes
        through the wrapper. A stage without a model gets its trained parameters' gradients
        averaged by hand. ``sync_bn`` converts the model's BatchNorm layers first."""
        if self.world == 1:
            return stage.forward, None, []
        owned = {id(p) for plugin in self.plugins for p in plugin.owned_parameters()}
        trained = [p for p in stage_parameters(stage) if p.requires_grad and id(p) not in owned]
        model = stage.model
        in_model = {id(p) for p in model.parameters()} if model is not None else set()
        by_hand = [p for p in trained if id(p) not in in_model]
        if model is None or len(by_hand) == len(trained):
            return stage.forward, None, by_hand
        if self.cfg["sync_bn"]:
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)   # replaces the BatchNorm children in place
        keep = {id(p) for p in trained}
        model._ddp_params_and_buffers_to_ignore = [name for name, p in model.named_parameters() if id(p) not in keep]
        ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.on_cuda else None,
                                      find_unused_parameters=stage.find_unused_parameters)
        return (lambda x: stage.forward(x, net=ddp)), ddp, by_hand

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, phase: Phase) -> dict:
        test = (self.test_labels < phase.last).nonzero().flatten()
        images = batching.select(self.test_images, test)
        targets = self.test_labels[test]
        bounds = list(phase.task_bounds)
        k = self.cfg["topk"]
        models = {"cnn": self.learner.inference, **self.learner.extra_evaluations()}
        logits = {name: [] for name in models}
        feats = []
        self.learner.eval_mode()
        for (imgs,) in batching.in_order(images, batch_size=self.cfg["eval_batch_size"], num_workers=self.cfg["num_workers"]):
            x = self.ctx.to_input(imgs)
            with self.ctx.inference_autocast():
                for name, fn in models.items():
                    out = fn(x)
                    logits[name].append(out["logits"][:, :phase.last].float().cpu())
                    if name == "cnn":
                        feats.append(out["features"].float().cpu())
        # A task without test images gets None accuracies (metrics skip it), never an error.
        report = {name: accuracy_report(torch.cat(v) if v else torch.empty(0, phase.last), targets, bounds, k)
                  for name, v in logits.items()}
        report["nme"] = None
        if self.learner.uses_memory and self.cfg["nme"] and len(self.memory) > 0:
            mem_images, mem_labels = self.memory.tensors()
            mem_feats = self.ctx.embed(mem_images, lambda x: self.learner.inference(x)["features"],
                                       flip=self.cfg["nme_flip"],
                                       orig_hw=self.ctx.orig_hw(self.memory.source_indices()))
            means = class_means(mem_feats, mem_labels, phase.last, normalized=self.cfg["nme_flip"])
            test_feats = torch.cat(feats) if feats else torch.empty(0, mem_feats.shape[1])
            report["nme"] = accuracy_report(nme_logits(test_feats, means), targets, bounds, k)
        return report

    # ---- phases -------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        return [Phase(k, lo, hi, tuple(self.plan[:k + 1])) for k, (lo, hi) in enumerate(self.plan)]

    def learner_to_device(self) -> None:
        for m in self.learner.modules().values():
            if m is not None:
                m.to(self.device)
                if self.channels_last:
                    m.to(memory_format=torch.channels_last)

    def run_phase(self, phase: Phase) -> dict:
        start = time.monotonic()
        generator = seed_everything(phase_seed(self.cfg["seed"], phase.index))
        learner = self.learner
        self.log.info(f"== phase {phase.index}: classes [{phase.first}, {phase.last}) "
                      f"({phase.num_new} new, {phase.num_old} old), {len(self.memory)} exemplars")
        learner.before_grow(phase)
        learner.grow_network(phase)
        for plugin in self.plugins:
            plugin.after_grow(phase)
        self.learner_to_device()
        learner.begin_phase(phase)
        for plugin in self.plugins:
            plugin.before_phase(phase)
        stages = learner.stages(phase)
        for stage in stages:
            if not stage.after_memory:
                self.run_stage(phase, stage, generator)
        learner.end_training(phase)
        self.sync_modules()
        self.check_outputs_finite(phase, [s for s in stages if not s.after_memory])
        if learner.uses_memory:
            self.update_memory(phase)
        memory_hash = self.check_memory()
        stages_after = [stage for stage in stages if stage.after_memory]
        for stage in stages_after:
            self.run_stage(phase, stage, generator)
        if stages_after:
            self.sync_modules()
            self.check_outputs_finite(phase, stages_after)
        for plugin in self.plugins:
            plugin.after_phase(phase)
        if not self.is_main:   # rank 0 evaluates and reports (on the same weights as every rank)
            return None
        report = self.evaluate(phase)
        record = {"phase": phase.index, "classes": [phase.first, phase.last], **report,
                  "memory": {**self.memory.stats(phase.last, 3 * self.image_size ** 2), "hash": memory_hash},
                  **learner.phase_report(phase),
                  **{k: v for p in self.plugins for k, v in p.phase_report(phase).items()},
                  "seconds": round(time.monotonic() - start, 3), "code": self.environment["code"]}
        return record

    def check_outputs_finite(self, phase: Phase, stages: list[Stage], probe: int = 16) -> None:
        """TrainingDiverged unless the network's outputs on ``probe`` of the phase's training images
        are finite. The loss check sees each step's loss before the step, so a last step that breaks
        the weights (or leaves them so large that activations overflow) would otherwise be evaluated,
        herded and saved as a finished phase. Every rank holds the same weights and probes the same
        images, so every rank decides alike. An eval-mode forward: no weight, statistic or random
        number changes."""
        new = ((self.train_labels >= phase.first) & (self.train_labels < phase.last)).nonzero().flatten()[:probe]
        self.learner.eval_mode()
        finite = True
        with torch.no_grad():
            for (imgs,) in batching.in_order(batching.select(self.train_images, new), batch_size=probe, num_workers=0):
                with self.ctx.inference_autocast():
                    out = self.learner.inference(self.ctx.to_input(imgs, self.ctx.orig_hw(new)))
                finite = finite and bool(torch.isfinite(out["logits"]).all() and torch.isfinite(out["features"]).all())
        if not finite:
            raise TrainingDiverged(
                f"Training diverged in phase {phase.index}: after stage(s) {', '.join(repr(s.name) for s in stages)} the "
                f"network's outputs are not finite (the last steps broke the weights; the losses seen before them "
                f"were finite). Results of the earlier phases are kept in {self.out}. "
                f"{lower_lr_hint(stages, self.cfg['amp'] and self.device.type == 'cuda')}")

    def update_memory(self, phase: Phase) -> None:
        """End-of-phase memory update (herding, compression). With several processes every rank
        decodes its share of each new class's images and computes their boxes
        (``Plugin.compressor``) and features; the shares are gathered, so all ranks hold the same
        candidates; rank 0 alone herds, fetches the images it keeps and stores them
        (``distributed.on_main``: an error there is raised on every rank), and its memory is then
        broadcast and loaded by every other rank, so all hold bit-identical exemplars
        (``check_memory``). An error in one rank's share (an unreadable image, an out-of-memory)
        is raised on that rank alone: it exits with the message and torchrun's agent stops the
        others; without an agent they fail in their next collective after ``dist_timeout``."""
        ctx, learner = self.ctx, self.learner
        compressor = next((c for c in (p.compressor(phase) for p in self.plugins) if c is not None), None)

        def features(images: batching.Images, index: torch.Tensor) -> torch.Tensor:
            return ctx.embed(images, lambda x: learner.inference(x)["features"], orig_hw=ctx.orig_hw(index))

        def candidates_of(label: int) -> Candidates:
            index = ctx.class_index(label)

            def share(rows: slice):
                mine = index[rows]   # only this rank's share is decoded
                # Herding needs only the share's features, read as they are decoded; boxes need the pixels too.
                images = ctx.training_source(mine) if compressor is None else ctx.training_images(mine)
                return candidate_share(images, mine, label, rows, index.numel(), features,
                                       compressor, self.memory.compress_ratio)
            return Candidates(index, *distributed.map_shards(share, index.numel()), self.image_size)

        self.memory.update(range(phase.first, phase.last), candidates_of, ctx.training_images, phase.last,
                           decide=distributed.on_main)
        if self.world > 1:
            state = distributed.broadcast_object(self.memory.state_dict() if self.is_main else None)
            if not self.is_main:
                self.memory.load_state_dict(state)

    def check_memory(self) -> str:
        """sha1 of the memory (``ExemplarMemory.digest``), logged each phase; with several processes
        the ranks' digests are compared and a difference stops the run."""
        digest = self.memory.digest()
        self.memory_digests.append(digest)
        if self.world > 1:
            digests = distributed.all_gather_object(digest)
            if len(set(digests)) > 1:
                raise RuntimeError(f"The exemplar memory differs between processes: {digests}")
        where = f", identical on {self.world} processes" if self.world > 1 else ""
        self.log.info(f"  memory: {len(self.memory)} exemplars, sha1 {digest}{where}")
        return digest

    def sync_modules(self) -> None:
        """Every rank takes rank 0's weights and buffers (BatchNorm statistics differ per shard), so
        that what rank 0 evaluates and saves is what every rank continues from."""
        if self.world > 1:
            distributed.broadcast_module_states(list(self.learner.modules().values()))

    def _summary(self) -> dict:
        phases = self.results["phases"]
        summary = {**summarize(phases, "cnn"), **summarize(phases, "nme")}
        for name in self.learner.extra_evaluations():
            s = summarize(phases, name)
            summary.update({k: s[k] for k in (f"{name}_avg_top1", f"{name}_last_top1", f"{name}_forgetting",
                                              f"{name}_forgetting_pycil")})
        if phases and "deployed" in phases[-1]:
            summary["cnn_model"] = phases[-1]["deployed"]   # which model the cnn_* figures are
        return summary

    def _checkpoint_path(self, k: int) -> Path:
        return self.out / "checkpoints" / f"phase_{k}.pt"

    def save_checkpoint(self, phase: Phase) -> None:
        policy = self.cfg["checkpoints"]
        if policy == "none":
            return
        state = {"phase": phase.index, "config_hash": self.hash, "class_order": self.order,
                 "learner": self.learner.state_dict(), "memory": self.memory.state_dict(),
                 "plugins": [p.state_dict() for p in self.plugins], "results": self.results,
                 "rng": rng_states()}
        save_torch(self._checkpoint_path(phase.index), state)
        if policy == "last":   # every older one: a resume may have switched from "all" to "last"
            for index, path in saved_checkpoints(self.out).items():
                if index < phase.index:
                    path.unlink(missing_ok=True)

    def restore(self) -> int:
        """Load the newest intact checkpoint; return the index of the first phase still to run (0 if none)."""
        return self.apply_checkpoint(self.read_checkpoint())

    def read_checkpoint(self) -> tuple[dict, Path] | None:
        """(state, path) of the newest intact checkpoint, checked against this config; None if there
        is none. Drops what an unfinished attempt left after it (metrics lines, results.json).
        Rank 0's part of a resumption (it reads and edits the run folder).

        A checkpoint that cannot be read (truncated, empty) is skipped with a notice and the previous
        one is used; if none can be read, UserError names them."""
        found = saved_checkpoints(self.out)
        ckpts = [found[k] for k in sorted(found)]
        if not ckpts:
            finished = self._finished_results()
            if finished is not None:   # checkpoints "none", or deleted after the run: keep the result
                self.log.info(f"resume: {self.out / 'results.json'} holds every phase of this run and no "
                              f"checkpoint is left; nothing to run")
                return {"finished": finished}, self.out / "results.json"
            self.log.info("resume: no checkpoint found, starting from phase 0")
            self._drop_metrics_after(-1)        # epochs of an unfinished earlier attempt are run again
            (self.out / "results.json").unlink(missing_ok=True)
            return None
        state, bad = None, []
        for path in reversed(ckpts):
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
                if not isinstance(state, dict):
                    raise ValueError("not a checkpoint of this framework")
                lacking = [k for k in CHECKPOINT_KEYS if k not in state]
                if lacking or not isinstance(state["results"], dict) or "config" not in state["results"]:
                    raise ValueError(f"not a whole checkpoint of this framework (lacks "
                                     f"{', '.join(lacking) or 'results.config'})")
                used = path
                break
            except Exception as err:  # noqa: BLE001 - any unreadable file: fall back to an older one
                state = None
                bad.append(path)
                self.log.info(f"resume: checkpoint {path} is unreadable ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'empty or truncated'}); "
                              f"trying the previous one")
        if state is None:
            raise UserError(f"Cannot resume in {self.out}: no checkpoint can be read "
                            f"({', '.join(map(str, bad))} unreadable, e.g. truncated by a full disk or a kill). "
                            f"Delete them and rerun with --resume to start over, or drop --resume.")
        saved = state["results"]["config"]
        if state["config_hash"] != self.hash or saved.get("seed") != self.cfg["seed"]:
            # written by an older schema, or by another config (the seed is not in the hash)
            self.same_run_config(saved, f"Cannot resume from {used}")
        self.same_classes(state["class_order"], state["results"].get("class_names"), f"Cannot resume from {used}")
        self._drop_metrics_after(state["phase"])
        return state, used

    def same_classes(self, order: list[int], names: list[str] | None, refusal: str) -> None:
        """Refuse (UserError starting with ``refusal``) a saved class order and class names other than
        this run's: the classes on disk changed (a class folder added or removed, another class_list
        file), which the config does not show, and the phases would mix two class orders."""
        now = [self.data.class_names[c] for c in self.order]
        if list(order) == self.order and (names is None or list(names) == now):
            return
        then = f"{len(order)} classes" + (f" ({', '.join(names[:3])}, …)" if names else "")
        raise UserError(f"{refusal}: the dataset's classes differ from the saved run's ({then} then, "
                        f"{len(now)} now: {', '.join(now[:3])}, …), so its class order no longer holds. "
                        f"Restore the data as it was, or use another --output folder.")

    def _finished_results(self) -> dict | None:
        """The folder's results.json when it is this run's and finished (the same identifying keys and
        seed, every phase of the plan); else None. Its classes must be today's (UserError otherwise,
        as for a checkpoint)."""
        results, _ = load_results(self.out / "results.json")   # None if absent or unusable
        try:
            old, _ = resolve_saved_config(results["config"])
            order = list(results["class_order"])
        except (KeyError, TypeError, UserError):   # no (usable) results.json, or of another schema
            return None
        if result_key_differences(old, self.cfg) or [p["classes"] for p in results["phases"]] != [list(r) for r in self.plan]:
            return None
        self.same_classes(order, results.get("class_names"), f"Cannot resume in {self.out}")
        return {**results, "config": old}   # the settings it ran with (today's schema), not this call's

    def apply_checkpoint(self, found: tuple[dict, Path] | None) -> int:
        """Load a checkpoint read by ``read_checkpoint`` (every rank); the first phase to run."""
        if found is None:
            return 0
        state, path = found
        names = [self.data.class_names[c] for c in self.order]
        if "finished" in state:   # no checkpoint, a finished results.json (read_checkpoint)
            self.results = {**state["finished"], "config_hash": self.hash, "class_order": self.order,
                            "class_names": names}
            return len(self.plan)
        try:
            last = self.load_state(state)
        except RuntimeError as err:   # load_state_dict: the saved weights are another network's
            if "Error(s) in loading state_dict" not in str(err):
                raise
            ran = sorted({p["code"] for p in state["results"].get("phases", []) if isinstance(p.get("code"), str)})
            raise UserError(f"Cannot resume from {path}: its weights do not fit this code's network (the "
                            f"architecture changed since it was saved, by code {', '.join(ran) or 'of unknown version'}; "
                            f"this is {self.environment['code']}): {' '.join(str(err).split())[:300]}. Finish it with the code it started on, or start "
                            f"again in another --output folder.") from None
        self.results = {**state["results"], "config": self.cfg, "config_hash": self.hash,   # today's schema
                        "class_order": self.order, "class_names": names}
        before = self.results.get("world_size", 1)
        if before != self.world:
            self.log.info(f"resume: the checkpoint was written by a {before}-process run, this one has "
                          f"{self.world} (the global batch is the same; BatchNorm sees other shards)")
        self.results["world_size"] = self.world
        ran = sorted({p["code"] for p in self.results.get("phases", []) if isinstance(p.get("code"), str)})
        if ran and ran != [self.environment["code"]]:
            self.log.info(f"note: resume: the finished phases ran on code {', '.join(ran)}, this process runs "
                          f"{self.environment['code']} (each phase's \"code\" in results.json says which)")
        self.results["environment"] = self.environment
        set_rng_states(state["rng"])
        self.log.info(f"resume: restored phase {last} from {path}")
        return last + 1

    def load_state(self, state: dict) -> int:
        """Rebuild the network of a checkpoint's phase and load its weights, memory and plugin state;
        returns that phase's index. The old model of distillation is snapshotted again when the
        next phase starts, as in an uninterrupted run."""
        last = state["phase"]
        for phase in self.phases()[:last + 1]:
            self.learner.grow_network(phase)
            for plugin in self.plugins:
                plugin.after_grow(phase)
        self.learner_to_device()
        self.learner.load_state_dict(state["learner"])
        self.memory.load_state_dict(state["memory"])
        for plugin, s in zip(self.plugins, state["plugins"]):
            plugin.load_state_dict(s)
        return last

    def _drop_metrics_after(self, last: int) -> None:
        """Keep metrics.jsonl's epochs of phases ≤ ``last``: an interrupted phase is run again on resume,
        and its epochs must not appear twice (a line cut short by a crash is dropped too)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():   # bad bytes: a bad line
            try:
                if json.loads(line)["phase"] <= last:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        path.write_text("".join(kept))

    def same_run_config(self, saved: dict, refusal: str) -> list[str]:
        """Refuse (UserError starting with ``refusal``) unless ``saved``, an earlier run's config
        resolved with today's schema, has this run's identifying keys and seed
        (:func:`utils.config.result_key_differences`); returns the keys it lacked, which then are
        at their defaults (a key added since, whose default keeps the old behaviour)."""
        try:
            old, added = resolve_saved_config(saved)
            changed = result_key_differences(old, self.cfg)
        except UserError:   # it holds a key that no longer exists (or a value no longer allowed)
            old, added = dict(saved), []
            keys = hashed_keys(self.cfg) | (set(old) - set(self.cfg)) | {"seed"}
            changed = sorted(k for k in keys if old.get(k) != self.cfg.get(k)) or ["a value no longer valid"]
        if changed:
            # The keys that decide the others' meaning first: another learner brings its own keys.
            changed = sorted(changed, key=lambda k: (k not in ("model_name", "dataset"), k))
            raise UserError(f"{refusal}: its config differs from this one in {', '.join(changed)}. "
                            f"Use another --output folder or drop --resume.")
        return added

    def read_saved_config(self) -> dict | None:
        """The config.json of the output folder: None if absent, ``{"__unreadable__": why}`` if it
        cannot be parsed (refused on --resume, overwritten with a notice by a fresh run)."""
        cfg_path = self.out / "config.json"
        if not cfg_path.exists():
            return None
        try:
            old = json.loads(cfg_path.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
            return old
        except (ValueError, UnicodeDecodeError, OSError) as err:
            return {"__unreadable__": f"{type(err).__name__}: {err}"}

    def prepare_output(self, resume: bool) -> int:
        """Set up the output folder (its run lock held); return the first phase to run. Rank 0 alone
        touches the folder and reads the checkpoint, then hands it to every rank (a refusal is
        raised on every rank)."""
        found = distributed.on_main(lambda: self._prepare_folder(resume))
        try:
            return self.apply_checkpoint(found)
        except BaseException:
            self.log.close()
            raise

    def _prepare_folder(self, resume: bool) -> tuple[dict, Path] | None:
        cfg_path = self.out / "config.json"
        check_entry_kinds(self.out, files=("config.json", *RUN_FILES), folders=("checkpoints",))
        stale = remove_stale_tmp(self.out)
        notes = [f"note: removed {len(stale)} temporary file(s) of an interrupted write: "
                 f"{', '.join(str(p) for p in stale)}"] if stale else []
        added: list[str] = []
        old = self.read_saved_config()
        if old is not None and "__unreadable__" in old:
            if resume:
                raise UserError(f"Cannot resume in {self.out}: its {cfg_path.name} is unreadable "
                                f"({old['__unreadable__']}), so the run it belongs to is unknown: {cfg_path}. "
                                f"Drop --resume to start this folder over, or use another --output folder.")
            notes.append(f"note: {cfg_path} was unreadable ({old['__unreadable__']}); it is overwritten "
                         f"by this fresh run")
        elif old is not None and resume:
            added = self.same_run_config(old, f"Cannot resume in {self.out}")
            other = sorted(k for k in set(self.cfg) - hashed_keys(self.cfg) - {"seed"}
                           if k in old and old[k] != self.cfg[k])
            if other:
                notes.append(f"note: resuming with other settings than the saved run's (not part of its identity): "
                             f"{'; '.join(f'{k} {json.dumps(old[k])} → {json.dumps(self.cfg[k])}' for k in other)}. "
                             f"Another thread count or device can make the numbers differ slightly from an "
                             f"uninterrupted run.")
        elif old is not None and not is_run_config(old):
            raise UserError(f"Output folder {self.out} holds a config.json that is not a config of this framework "
                            f"(no model_name and dataset), so it is not a run folder of ours: a run there would "
                            f"remove or mix with that folder's files. Use another --output folder, or delete "
                            f"{cfg_path}.")
        if not resume:
            # A fresh run never reuses an earlier run's checkpoints, results or figures: it removes them by
            # name, and leaves anything else in the folder alone. Only where a config.json says they are
            # a run's: files of these names without one may be someone's own.
            removed = earlier_run_files(self.out)
            if removed and old is None:
                raise UserError(f"Output folder {self.out} holds {', '.join(str(p.relative_to(self.out)) for p in removed[:4])}"
                                f"{' …' if len(removed) > 4 else ''} but no config.json, so whose they are is unknown; "
                                f"a fresh run would remove them. Use another --output folder, or delete them (or "
                                f"continue that run with --resume).")
            for path in removed:
                path.unlink(missing_ok=True)
            if removed:
                notes.append(f"note: a fresh run (no --resume): removed {len(removed)} file(s) of an earlier run "
                             f"in this folder: {', '.join(str(p.relative_to(self.out)) for p in removed)}")
        self.out.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json(cfg_path, self.cfg)   # at once: the files written next are this config's
        self.log.open()   # before reading the checkpoint, so that log.txt records the resumption
        for note in notes:
            self.log.info(note)
        if added:
            self.log.info(f"resume: the saved config has no key {', '.join(added)} (added since); "
                          f"resuming with its default {', '.join(json.dumps(self.cfg[k]) for k in added)}")
        try:
            found = self.read_checkpoint() if resume else None
        except BaseException:
            self.log.close()
            raise
        if resume:
            write_json(cfg_path, self.cfg)   # after the checks: a refused resume leaves the folder as it was
        return found

    def saved_phase(self) -> int | None:
        """The newest phase with a checkpoint on disk (what --resume would continue after)."""
        if self.cfg["checkpoints"] == "none":
            return None
        found = saved_checkpoints(self.out)
        return max(found) if found else None

    def run(self, resume: bool = False) -> dict:
        """Run (or with ``resume`` continue) every phase, holding the folder's run lock throughout.
        Ctrl-C ends the run with RunInterrupted (the phases finished so far stay saved). With several
        processes rank 0 alone takes the lock (it alone writes the folder); a lock held by another
        run is refused on every rank."""
        lock = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(self.out, notice=self.log.info)
        distributed.on_main(lambda: lock.acquire())
        try:
            return self._run_locked(resume)
        except (KeyboardInterrupt, Exception) as err:
            how = interruption_of(err)   # after SIGTERM, any error is taken for it (utils.errors.TERMINATION)
            if how is None:
                raise
            self.log.info(f"interrupted ({how})")
            raise RunInterrupted(self.out, self.saved_phase(), self.cfg["checkpoints"], how) from None
        finally:
            self.log.close()
            if lock is not None:
                lock.release()

    def _run_locked(self, resume: bool) -> dict:
        first = self.prepare_output(resume)
        d = self.data
        self.log.info(f"run {self.config_name} (config hash {self.hash}), seed {self.cfg['seed']}, device {self.device}, "
                      f"threads {torch.get_num_threads()}, learner {self.cfg['model_name']}, "
                      f"backbone {self.cfg['convnet_type']}")
        env = self.environment
        self.log.info(f"code {env['code']}, python {env['python']}, torch {env['torch']}, device {env['device']}")
        self.log.info(f"dataset {d.name}: {self.num_classes} classes, {len(d.train)} train / {len(d.test)} test images, "
                      f"stored {self.image_size}px, input {self.input_size}px; output {self.out}")
        self.log.info(f"class order: {self.order}")
        self.log.info(f"phases: {[list(r) for r in self.plan]}")
        for note in run_notes(self.cfg, self.plan, self.num_classes, self.learner.uses_memory, self.world):
            self.log.info(note)
        untested = sorted(set(range(self.plan[-1][1])) - set(self.test_labels.tolist()))
        if untested:
            self.log.info(f"note: classes {untested} (order positions) have no test images: accuracies over "
                          f"them only are reported as null, and forgetting skips such tasks")
        if self.world > 1:
            self.log.info(f"distributed: {self.world} processes ({distributed.backend()}); rank 0 decides the "
                          f"memory, evaluates and writes {self.out}")
        for phase in self.phases()[first:]:
            raise_if_terminated()
            record = self.run_phase(phase)
            if self.is_main:
                self.results["phases"].append(record)
                self.results["summary"] = self._summary()
                self.save_checkpoint(phase)
                write_json(self.out / "results.json", self.results)
                self.log.phase_block(record)
            if self.stop_after_phase is not None and phase.index >= self.stop_after_phase:
                self.log.info(f"stopping after phase {phase.index} as asked (stop_after_phase)")
                break
        if self.is_main:
            # Also when no phase was left to run: a resume after a stop between the last phase's
            # checkpoint and its results.json (or of a folder whose results.json was lost) rewrites it.
            write_json(self.out / "results.json", self.results)
        self.log.summary(self.results["summary"])
        distributed.barrier()   # every rank ends once rank 0 has written everything
        return self.results
