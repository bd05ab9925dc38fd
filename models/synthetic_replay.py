"""Synthetic replay (SDDR, Jodelet et al., ICCV-W 2023; SPEC.md §6) as a data source for every learner.

A frozen text-to-image model makes labelled images of the classes already seen ("a photo of a
{name}"); in every later phase they join the stage data of the learner's phase stages beside the
real new-class images and the real exemplar memory, and count in the classification loss
(``use_in_ce``) and in the learner's distillation terms (``use_in_kd``: iCaRL's KD, LUCIR's
less-forget and margin-ranking terms, FOSTER's KD in boosting and its compression KD; DER has none).
They never enter the exemplar memory and never count against its budget; stages on the memory
alone (LUCIR's class-balanced finetuning) do not see them.

Sources (config block ``synthetic_replay``; off while ``source`` is "none"):

* ``folder`` — pre-made images ``path/<class id>/*.png`` with a ``manifest.json``
  (``utils/replay_folder.py``), checked against the config; the first ``per_class`` files of a class
  in seed order are used.
* ``diffusers`` — images made here from a local pipeline folder (``model_path``; nothing is
  downloaded) into the same format under ``cache_dir/<key>/``, the key a digest of everything that
  decides the pixels (weights, scheduler, steps, guidance, resolution, every class's prompt, seed,
  chunking, dtype), so another run or learner with the same settings reuses them. ``when``:
  "per_phase" makes the classes a phase replays at its start, after the previous phase's checkpoint
  (a phase's new classes are made when the next phase begins), "upfront" makes every replayed class
  before phase 0. Generation resumes after a stop (``utils/diffusion.py``); the pipeline is loaded
  for a generation and released after it.

``ratio``: null — the synthetic images join the epoch's pass like exemplars (each once an epoch);
r > 0 — each batch of b real samples gets round(r·b) synthetic ones on top (the epoch's length stays
the real data's).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from models.plugins import Plugin, register_plugin
from utils import diffusion, distributed, image_cache, replay_folder
from utils.class_names import readable_names
from utils.config import Option
from utils.errors import ConfigError, DataError
from utils.io import path_problem
from utils.stage_data import SYNTHETIC, SourceData

FIELDS = {
    "source": Option("none", "str", "Where synthetic images come from: none (off), folder (pre-made, `path`), "
                                    "diffusers (made here from a local pipeline, `model_path`).",
                     choices=("none", "folder", "diffusers")),
    "path": Option(None, "str", "folder: the image folder (<class id>/*.png + manifest.json).", nullable=True),
    "model_path": Option(None, "str", "diffusers: a local pipeline folder (saved with save_pretrained); never a hub id.",
                         nullable=True),
    "cache_dir": Option(".cache/synthetic", "str", "diffusers: where generated images are kept, one folder per "
                                                   "generation key."),
    "per_class": Option(100, "int", "Synthetic images per old class (the first ones in seed order).", min=1),
    "prompt_template": Option("a photo of a {name}", "str", "Prompt of a class; {name} is its readable name."),
    "class_names": Option(None, "str", "File of readable class names ('<class id><TAB><name>' per line, or one name "
                                       "per line in class order); null = the dataset's (words.txt for WordNet ids).",
                          nullable=True),
    "guidance_scale": Option(2.0, "float", "Classifier-free guidance (low guidance suits classifier data).", min=0.0),
    "num_inference_steps": Option(50, "int", "Denoising steps.", min=1),
    "resolution": Option(None, "int", "Side of the generated images; null = the pipeline's native one (SD 1.x: 512). "
                                      "Images are resized to the stored size when loaded.", min=8, nullable=True),
    "seed": Option(0, "int", "Base seed of generation (image i of class c: a seed from (seed, c, i)).", min=0),
    "gen_batch_size": Option(8, "int", "Images generated at once (a chunk; part of the generation key).", min=1),
    "dtype": Option("auto", "str", "diffusers: weights' precision; auto = float16 on CUDA, float32 on CPU.",
                    choices=("auto", "float16", "bfloat16", "float32")),
    "attention_slicing": Option(False, "bool", "diffusers: sliced attention (less GPU memory, slower)."),
    "when": Option("per_phase", "str", "diffusers: make the classes a phase replays at its start, after the "
                                       "previous phase's checkpoint (per_phase), or every replayed class before "
                                       "phase 0 (upfront).", choices=("per_phase", "upfront")),
    "ratio": Option(None, "float", "null: synthetic images join each epoch like exemplars; r > 0: round(r × batch) "
                                   "synthetic images are added to every batch.", min=0.0, max=100.0, nullable=True),
    "use_in_ce": Option(True, "bool", "Synthetic images count in the classification loss."),
    "use_in_kd": Option(True, "bool", "Synthetic images count in the learner's distillation terms."),
}
# Settings that decide the pixels of a generated image (the generation key and the manifest).
PIXEL_SETTINGS = ("prompt_template", "guidance_scale", "num_inference_steps", "resolution", "seed",
                  "gen_batch_size", "dtype")


@dataclass
class ReplayInputs:
    """What a synthetic-replay run reads, checked: readable names and prompts by class id, the image
    folder (``path``, or the generation key's folder under ``cache_dir``), its manifest (for
    ``diffusers``: the one its images will have) and the pipeline folder (``diffusers`` only)."""

    names: dict[str, str]
    prompts: dict[str, str]
    root: str
    manifest: dict
    model_path: str | None


def open_inputs(cfg: dict, ids: list[str], replayed: int) -> ReplayInputs:
    """Check every file synthetic replay reads, from file listings alone (no image is decoded).

    ``ids``: the dataset's class ids in class-order position; ``replayed``: how many of them a later
    phase replays (all but the last phase's). Raises DataError naming the field or path. Run by
    ``--check`` and before a run loads its dataset (``Plugin.check_inputs``), and when the plugin is
    built."""
    s = cfg["synthetic_replay"]
    names = dict(zip(ids, readable_names(cfg["dataset"], cfg["data_root"], ids, s["class_names"])))
    prompts = {c: s["prompt_template"].format(name=n) for c, n in names.items()}
    if s["source"] == "folder":
        root = os.path.abspath(os.path.expanduser(s["path"]))
        if not os.path.isdir(root):
            raise DataError(f"synthetic_replay.path {root} {path_problem(root, 'folder')}.")
        manifest = replay_folder.read_manifest(root)
        replay_folder.check_manifest(manifest, s, root)
        made_by_prompt = manifest.get("generator", {}).get("kind") != "real-images"
        replay_folder.check_classes(manifest, ids[:replayed], prompts if made_by_prompt else None, root)
        for c in ids[:replayed]:   # every replayed class has its images
            folder_paths(root, c, names[c], s["per_class"])
        return ReplayInputs(names, prompts, root, manifest, None)
    model_path = diffusion.check_model_path(s["model_path"])
    multiple = diffusion.side_multiple(model_path) if s["resolution"] is not None else None
    if multiple is not None and s["resolution"] % multiple:
        raise ConfigError(f"Config key 'synthetic_replay.resolution' is {s['resolution']}; the pipeline in "
                          f"{model_path} makes sides that are multiples of {multiple}: use "
                          f"{s['resolution'] // multiple * multiple or multiple} or "
                          f"{(s['resolution'] // multiple + 1) * multiple}, or null (its native side).")
    steps = diffusion.max_inference_steps(model_path)
    if steps is not None and s["num_inference_steps"] > steps:
        raise ConfigError(f"Config key 'synthetic_replay.num_inference_steps' is {s['num_inference_steps']}; the "
                          f"scheduler of {model_path} can take at most {steps} (its training timesteps).")
    dtype = diffusion.resolved_dtype(s["dtype"], cfg["device"])
    cache = os.path.abspath(os.path.expanduser(s["cache_dir"]))
    manifest = {"format": replay_folder.FORMAT, **diffusion.pipeline_description(model_path, dtype, cache),
                **{k: s[k] for k in PIXEL_SETTINGS}, "dtype": dtype,
                "resolution": s["resolution"] or diffusion.native_resolution(model_path),
                "seed_rule": diffusion.SEED_RULE}
    key = generation_key(manifest, prompts)
    root = os.path.join(cache, key)
    return ReplayInputs(names, prompts, root, manifest, model_path)


def generation_key(manifest: dict, prompts: dict[str, str]) -> str:
    """The cache folder name of a generation: a digest of the manifest's settings and of every class's
    prompt (class id -> prompt, in any class order), so that another names file, or a dataset that
    shares class ids but names them otherwise, never reuses images made from other prompts."""
    payload = {"settings": manifest, "prompts": prompts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def folder_paths(root: str, class_id: str, name: str, per_class: int) -> list[str]:
    """The first ``per_class`` image files of a class of a ``folder`` source, in seed order."""
    paths = replay_folder.class_files(root, class_id)
    if len(paths) < per_class:
        raise DataError(f"Synthetic replay folder {root}: class {class_id} ({name}) has {len(paths)} image(s) in "
                        f"{os.path.join(root, class_id)}, synthetic_replay.per_class is {per_class}.")
    return paths[:per_class]


@register_plugin("synthetic_replay")
class SyntheticReplay(Plugin):
    options = {
        "synthetic_replay": Option({}, "dict", "Synthetic replay from a text-to-image model (SDDR; README: Synthetic "
                                               "replay). Off unless `source` is set.", fields=FIELDS),
    }

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["synthetic_replay"]["source"] != "none"

    @classmethod
    def check_config(cls, cfg: dict, learner_cls: type) -> None:
        s = cfg["synthetic_replay"]
        if s["source"] == "none":
            return
        needed = {"folder": "path", "diffusers": "model_path"}[s["source"]]
        if not s[needed]:
            raise ConfigError(f"Config key 'synthetic_replay.{needed}' must be set for source '{s['source']}'.")
        if "{name}" not in s["prompt_template"]:
            raise ConfigError(f"Config key 'synthetic_replay.prompt_template' must contain {{name}}, got "
                              f"{s['prompt_template']!r}.")
        try:
            s["prompt_template"].format(name="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"Config key 'synthetic_replay.prompt_template' is not a valid template ({exc}).") from None
        if s["ratio"] == 0:
            raise ConfigError("Config key 'synthetic_replay.ratio' is 0: use null (join the epoch) or a positive "
                              "ratio, or turn synthetic replay off with source 'none'.")
        if s["ratio"] is not None and round(s["ratio"] * cfg["batch_size"]) == 0:
            raise ConfigError(f"Config key 'synthetic_replay.ratio' is {s['ratio']}: round({s['ratio']} × batch_size "
                              f"{cfg['batch_size']}) = 0 synthetic images a batch, so nothing would be replayed; use "
                              f"a ratio above {0.5 / cfg['batch_size']:.4g}, or null.")

    @classmethod
    def check_inputs(cls, cfg: dict, class_ids: list[str], plan: list[tuple[int, int]]) -> None:
        open_inputs(cfg, class_ids, plan[-1][0])

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        self.settings = dict(cfg["synthetic_replay"])
        self.ids = list(ctx.class_names)                         # dataset class ids, in class-order position
        inputs = open_inputs(cfg, self.ids, ctx.plan[-1][0])
        self.names, self.prompts = inputs.names, inputs.prompts
        self.root, self.manifest, self.model_path = inputs.root, inputs.manifest, inputs.model_path
        self.images: dict[int, torch.Tensor] = {}                 # label -> uint8 [per_class, 3, S, S]
        self.generated = 0
        self.generation_seconds = 0.0

    # ---- generation (diffusers) ---------------------------------------------------------------
    def generate(self, labels: list[int]) -> None:
        """Make the missing images of these classes (a no-op for a folder source or a full cache).
        With several processes the chunks are shared out (chunk j, numbered across the classes, to
        rank j mod world size), rank 0 alone writes the manifest, and every rank waits until all
        images are on disk."""
        if self.settings["source"] != "diffusers":
            return
        s, n = self.settings, self.settings["per_class"]
        main = self.ctx.is_main
        todo = distributed.broadcast_object([c for c in labels if not diffusion.complete(self.root, self.ids[c], n)])
        if not todo:
            return
        start = time.time()
        os.makedirs(self.root, exist_ok=True)
        manifest_path = os.path.join(self.root, replay_folder.MANIFEST)
        manifest = replay_folder.read_manifest(self.root) if main and os.path.isfile(manifest_path) \
            else {**self.manifest, "classes": {}}
        # The phase's random streams are seeded before this runs: loading a pipeline may draw from
        # torch's global generator (random initialisation before the weights are read, in some library
        # versions), which would make a run that generates train otherwise than one that found the
        # images made. So generation runs on a forked generator state.
        cuda = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            # Loaded for this generation only, in the precision its key records.
            pipe = diffusion.load_pipeline(self.model_path, str(self.ctx.device), self.manifest["dtype"],
                                           s["attention_slicing"])
            bar = tqdm(total=len(todo) * n, desc="synthetic replay: generating", unit="img",
                       disable=None if main else True, leave=False)
            made = chunks = 0
            for c in todo:
                cid = self.ids[c]
                if main:
                    manifest["classes"][cid] = {"name": self.names[cid], "prompt": self.prompts[cid]}
                    replay_folder.write_manifest(self.root, manifest)
                made += diffusion.generate_class(
                    pipe, self.root, cid, self.prompts[cid], n, seed=s["seed"], steps=s["num_inference_steps"],
                    guidance=s["guidance_scale"], resolution=self.manifest["resolution"],
                    batch_size=s["gen_batch_size"], device=str(self.ctx.device),
                    shard=(self.ctx.rank, self.ctx.world_size), first_chunk=chunks, progress=bar.update)
                chunks += -(-n // s["gen_batch_size"])
            bar.close()
            del pipe   # the pipeline's memory (GBs on the GPU) goes back to training
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        distributed.barrier()   # every rank's chunks are on disk before any rank loads them
        self.generated += int(distributed.all_reduce_sum(torch.tensor(made)))
        took = time.time() - start
        self.generation_seconds += took
        self.ctx.log.info(f"  synthetic replay: made {len(todo)} class(es) × {n} images in {took:.1f} s "
                          f"({len(todo) * n / max(took, 1e-9):.2f} img/s) into {self.root}")

    # ---- hooks --------------------------------------------------------------------------------
    def before_phase(self, phase) -> None:
        self.generated = 0
        self.generation_seconds = 0.0
        replayed = self.ctx.plan[-1][0]   # classes some later phase replays: all but the last phase's
        if self.settings["when"] == "upfront" and phase.index == 0:
            self.generate(list(range(replayed)))
        # per_phase: the classes this phase replays that are not made yet (the previous phase's new
        # ones; all of them after a resume or a removed cache). Made here, after the previous phase's
        # checkpoint, so that a failed or stopped generation never costs a trained phase.
        self.generate(list(range(phase.first)))
        # A folder's images are all there from the start: decoded in the first phase (every one a
        # later phase replays, so the last phase holds no more than before), a corrupt file stops
        # the run before any training, not phases later (exit 2 naming it).
        wanted = range(replayed) if self.settings["source"] == "folder" else range(phase.first)
        missing = [c for c in wanted if c not in self.images]
        paths = {c: (folder_paths(self.root, self.ids[c], self.names[self.ids[c]], self.settings["per_class"])
                     if self.settings["source"] == "folder"
                     else [os.path.join(self.root, self.ids[c], replay_folder.image_name(i))
                           for i in range(self.settings["per_class"])]) for c in missing}
        if not missing:
            return
        # one decode for all of them, with the dataset's decoding processes (num_workers 0: the cores)
        images = replay_folder.load_images([p for c in missing for p in paths[c]], self.ctx.image_size,
                                           workers=image_cache.process_workers(self.ctx.cfg["num_workers"]))
        for c, part in zip(missing, torch.split(images, [len(paths[c]) for c in missing])):
            self.images[c] = part

    def sources(self, phase, kind: str) -> list[SourceData]:
        if kind != "phase" or phase.first == 0:
            return []
        labels = list(range(phase.first))
        images = torch.cat([self.images[c] for c in labels])
        y = torch.cat([torch.full((len(self.images[c]),), c, dtype=torch.long) for c in labels])
        s = self.settings
        return [SourceData("synthetic", images, y, SYNTHETIC, ratio=s["ratio"], in_ce=s["use_in_ce"],
                           in_kd=s["use_in_kd"])]

    def phase_report(self, phase) -> dict:
        counts = [len(self.images[c]) for c in range(phase.first)]
        return {"synthetic_replay": {
            "classes_replayed": phase.first, "images": sum(counts),
            "images_per_class": counts[0] if counts and len(set(counts)) == 1 else counts,
            "generated_this_phase": self.generated, "generation_seconds": round(self.generation_seconds, 3)}}

    def run_info(self) -> dict:
        generator = self.manifest.get("generator", {})
        return {"external_generator": True,
                "synthetic_replay": {**self.settings, "folder": self.root, "generator": generator,
                                     "resolution_generated": self.manifest.get("resolution")}}
