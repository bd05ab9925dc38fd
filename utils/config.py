"""Configuration schema: every key, its type, default, allowed values and meaning.

A run's configuration is a flat JSON object. Keys come from three places, each declared once:
``COMMON_OPTIONS`` here (data, protocol, memory, device, augmentation), each learner's
``options`` (``models/<learner>.py``) and each plugin's ``options`` (e.g. the compression plugin).
:func:`resolve_config` fills in defaults and refuses, before any training, an unknown key (with a
"did you mean" suggestion), a wrong type or an out-of-range value, naming the key and what is allowed.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from utils.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# The largest magnitude a float key may have: the networks compute in float32, where a larger
# value (a learning rate of 1e300, say) cannot even be stored.
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Option:
    """One configuration key.

    ``kind`` is one of: "int", "float", "bool", "str", "int_list", "float_list", "dict",
    "int_or_int_list". ``nullable`` allows JSON null (meaning "the dataset's/learner's default").
    ``fields``: for a "dict" key that is a block of keys of its own (e.g. ``synthetic_replay``),
    their Options; the block is checked key by key (``block.key`` in messages) and its defaults
    filled in. ``only_with`` and ``milestones_of`` feed the notes of :func:`settings_notes` (a key
    set but ignored; an lr milestone its stage never reaches).
    """

    default: Any
    kind: str
    doc: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    nullable: bool = False
    length: int | None = None  # exact list length, when fixed
    fields: dict | None = None  # dict blocks: the Options of their keys
    increasing: bool = False    # lists: strictly increasing (e.g. lr milestones)
    only_with: tuple | None = None      # (key, value): read only while that key has that value
    milestones_of: str | None = None    # epoch lists: the key of the stage's epochs they fall within

    def switched_off(self, cfg: Mapping[str, Any]) -> bool:
        """Whether a resolved ``cfg`` leaves this key unread: it is read only with a value of a
        switch (``only_with``) that ``cfg`` does not have (memory_per_class under fixed_memory false)."""
        return bool(self.only_with) and cfg[self.only_with[0]] != self.only_with[1]


def _dataset_names() -> tuple:
    from utils.datasets import DATASETS

    return tuple(sorted(DATASETS))


COMMON_OPTIONS: dict[str, Option] = {
    # run identity
    "prefix": Option("", "str", "Name of the run folder (defaults to the config file's name)."),
    "seed": Option(1993, "int_or_int_list", "Random seed; a list runs once per seed. Also seeds the class order.",
                   min=0, max=2 ** 32 - 1),
    "device": Option("auto", "str", "'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'."),
    "threads": Option(None, "int", "CPU threads of torch (torch.set_num_threads); null = torch's default. On a "
                                   "shared machine 1 is often much faster (README: Measured); at most the machine's "
                                   "cores.", min=1, max=4096, nullable=True),
    # data
    "dataset": Option("shapes", "str", "Dataset format (see README: Datasets).", choices=None),
    "data_root": Option(None, "str", "Folder holding the dataset (unused for shapes).", nullable=True),
    "class_list": Option(None, "str", "imagenet100: file with one wnid per line (the 100 classes).", nullable=True),
    "shapes": Option({}, "dict", "shapes dataset (procedural): {num_classes, train_per_class, test_per_class, seed}."),
    "image_size": Option(None, "int", "Side of the stored (decoded) square images; null = dataset default.", min=8,
                         max=4096, nullable=True),
    "input_size": Option(None, "int", "Side of the network input; null = dataset default.", min=8, max=4096, nullable=True),
    "cache_dir": Option(".cache/data", "str", "Folder for the decoded-image cache; null disables it.", nullable=True),
    "skip_unreadable": Option(False, "bool", "Skip (and report) unreadable images instead of stopping."),
    "in_memory": Option(None, "bool", "Hold decoded images in memory (null: yes except imagenet1000, which streams).", nullable=True),
    "stored_form": Option(None, "str", "How training images are stored: crop (short side resized to image_size, centre "
                                       "square: the sides of non-square images are lost) or whole (the whole image "
                                       "resized to image_size x image_size plus its original size; RandomResizedCrop is "
                                       "drawn in the original's pixels, as torchvision's on the whole image). null = "
                                       "whole for in-memory folder/imagenet100/food101 with augment resized_crop, else "
                                       "crop (resolved when the config is read). Test images are always crop.",
                          choices=("crop", "whole"), nullable=True),
    "num_workers": Option(0, "int", "Loader processes for streamed datasets and image decoding (0 = main process).", min=0),
    # Identifies a run when set to "device" (_HASHED_WHEN_SET): the network sees slightly different
    # pixels (another JPEG decoder and resampler), so its results are not the "workers" run's.
    "stream_decode": Option("workers", "str", "Where a streamed dataset's JPEGs are decoded: workers (Pillow in the "
                                              "num_workers loader processes) or device (the workers only read the "
                                              "files; each batch is decoded on the run's device by "
                                              "torchvision.io.decode_jpeg, nvjpeg on a GPU, and resized there as "
                                              "Pillow would; pixels differ by under a level on average, so it "
                                              "identifies the run; non-JPEG or rejected files fall back to Pillow). "
                                              "Streamed sets only (in_memory false, or imagenet1000).",
                            choices=("workers", "device")),
    # protocol
    "shuffle": Option(True, "bool", "Shuffle the class order with `seed` (labels are remapped to order position)."),
    "init_cls": Option(10, "int", "Classes in phase 0.", min=1),
    "increment": Option(10, "int", "Classes added by each later phase.", min=1),
    "num_phases": Option(None, "int", "Number of phases; null = as many as the dataset's classes allow.", min=1, nullable=True),
    # memory
    "memory_size": Option(2000, "int", "Total exemplar budget in full-image units (fixed_memory=false).", min=0,
                          only_with=("fixed_memory", False)),
    "memory_per_class": Option(20, "int", "Per-class budget in full-image units when fixed_memory=true.", min=0,
                               only_with=("fixed_memory", True)),
    "fixed_memory": Option(False, "bool", "true: every class keeps memory_per_class; false: memory_size // classes seen."),
    "herding": Option("distinct", "str", "How herding orders a new class's samples (the exemplars are a prefix): "
                                         "distinct (each pick the unpicked sample that brings the picked mean closest "
                                         "to the class mean; PyCIL, SPEC §2) or welling (Welling's iteration as the "
                                         "original iCaRL and LUCIR code run it: w ← w + μ − f, pick argmax ⟨w, f⟩, a "
                                         "sample picked again keeps its first place; at most 1000 iterations, so a "
                                         "class can get fewer exemplars than its budget).",
                      choices=("distinct", "welling")),
    # network and optimisation common to all learners
    "model_name": Option("icarl", "str", "Learner (see README: Learners)."),
    "convnet_type": Option("resnet32", "str", "Backbone (see README: Backbones)."),
    "batch_size": Option(128, "int", "Training batch size (at least 2: a batch of one is dropped, as BatchNorm "
                                     "cannot train on it).", min=2),
    "eval_batch_size": Option(256, "int", "Batch size for evaluation and feature extraction.", min=1),
    "amp": Option(True, "bool", "Mixed precision (bfloat16 autocast) on CUDA; ignored on CPU."),
    "amp_inference": Option(False, "bool", "Run the inference passes too (evaluation, herding and NME features, "
                                           "LUCIR's imprinting, CIM's CAMs and boxes, the divergence probe) under "
                                           "`amp`'s bfloat16 autocast. false: they run in float32, as the published "
                                           "code (float32 throughout) ran them; `amp` then speeds up training "
                                           "alone. Only with `amp` on CUDA."),
    "channels_last": Option(True, "bool", "channels_last memory format on CUDA; ignored on CPU."),
    "compile": Option(False, "bool", "torch.compile each training stage's forward (compiled once per stage, so it "
                                     "pays on long stages: ImageNet-scale epochs)."),
    "compile_mode": Option("default", "str", "torch.compile mode when `compile` is on.",
                           choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")),
    # augmentation (applied in batches on the training device)
    "augment": Option(None, "str", "Train augmentation: crop_flip, resized_crop or none; null = dataset default.",
                      choices=("crop_flip", "resized_crop", "none"), nullable=True),
    "crop_padding": Option(4, "int", "crop_flip: zero padding before the random crop (less than input_size, so that "
                                     "no crop is padding alone).", min=0),
    "rrc_scale": Option([0.08, 1.0], "float_list", "resized_crop: range of the crop's area fraction.", length=2, min=0.0, max=1.0),
    "flip": Option(True, "bool", "Random horizontal flip."),
    "color_jitter": Option(0.0, "float", "Brightness jitter amount, as ColorJitter(brightness=...) (CIM: 0.247 = 63/255); 0 = off.", min=0.0, max=1.0),
    "autoaugment": Option(None, "str", "AutoAugment policy applied per sample: cifar10 or imagenet; null = off.",
                          choices=("cifar10", "imagenet"), nullable=True),
    "cutout": Option(0, "int", "Side of the Cutout square (0 = off; less than input_size, which would erase a whole "
                               "image).", min=0),
    # evaluation and outputs
    "nme": Option(True, "bool", "Also report nearest-mean-of-exemplars accuracy (needs a memory)."),
    "nme_flip": Option(True, "bool", "NME class means from each exemplar and its mirror image (iCaRL's original "
                                     "code); false = from the exemplar alone (PyCIL), for NME figures comparable "
                                     "with PyCIL's. Herding never flips."),
    "topk": Option(5, "int", "The k of top-k accuracy.", min=1),
    "sync_bn": Option(False, "bool", "Distributed runs (torchrun) on CUDA: SyncBatchNorm, BatchNorm statistics over the "
                                     "global batch instead of each process's shard; no effect in one process."),
    "dist_timeout": Option(30, "int", "Distributed runs: minutes a process waits in a collective for the others (rank 0 "
                                      "alone decides the memory, evaluates and saves meanwhile) before the run stops.", min=1,
                         max=525600),
    "checkpoints": Option("all", "str", "Which phase checkpoints to keep.", choices=("all", "last", "none")),
}


def _type_ok(value: Any, opt: Option) -> bool:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

    kind = opt.kind
    if kind == "int":
        return is_int(value)
    if kind == "float":
        return is_num(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "int_list":
        return isinstance(value, list) and all(is_int(v) for v in value)
    if kind == "float_list":
        return isinstance(value, list) and all(is_num(v) for v in value)
    if kind == "int_or_int_list":
        return is_int(value) or (isinstance(value, list) and len(value) > 0 and all(is_int(v) for v in value))
    raise ValueError(f"unknown option kind {kind}")


_KIND_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
    "dict": "a JSON object", "int_list": "a list of integers", "float_list": "a list of numbers",
    "int_or_int_list": "an integer or a non-empty list of integers",
}


def check_value(key: str, value: Any, opt: Option) -> Any:
    """Return ``value`` (ints widened to float for float keys) or raise ConfigError naming ``key``."""
    if value is None:
        if opt.nullable:
            return None
        raise ConfigError(f"Config key '{key}' must not be null: it must be {_KIND_WORDS[opt.kind]}. {opt.doc}")
    if not _type_ok(value, opt):
        raise ConfigError(
            f"Config key '{key}' must be {_KIND_WORDS[opt.kind]}"
            f"{' or null' if opt.nullable else ''}, got {json.dumps(value)}. {opt.doc}")
    if opt.kind == "float":
        value = float(value)
    if opt.kind == "float_list":
        value = [float(v) for v in value]
    if opt.kind in ("float", "float_list") and any(abs(v) > FLOAT32_MAX for v in (value if isinstance(value, list) else [value])):
        raise ConfigError(f"Config key '{key}' is {json.dumps(value)}; it must be within ±3.4e38 (training "
                          f"computes in float32, which cannot hold it). {opt.doc}")
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"Config key '{key}' is {json.dumps(value)}; allowed: {', '.join(map(str, opt.choices))}.")
    items = value if isinstance(value, list) else [value]
    if opt.kind in ("int", "float", "int_list", "float_list", "int_or_int_list"):
        for v in items:
            if opt.min is not None and v < opt.min:
                raise ConfigError(f"Config key '{key}' is {json.dumps(value)}; it must be ≥ {opt.min}. {opt.doc}")
            if opt.max is not None and v > opt.max:
                raise ConfigError(f"Config key '{key}' is {json.dumps(value)}; it must be ≤ {opt.max}. {opt.doc}")
    if opt.length is not None and len(value) != opt.length:
        raise ConfigError(f"Config key '{key}' must have exactly {opt.length} entries, got {json.dumps(value)}.")
    if opt.increasing and any(a >= b for a, b in zip(value, value[1:])):
        raise ConfigError(f"Config key '{key}' is {json.dumps(value)}; it must be strictly increasing (each entry "
                          f"is an epoch where the lr is multiplied by lr_decay: a repeated one multiplies it twice). "
                          f"{opt.doc}")
    if opt.fields is not None:
        value = check_block(key, value, opt.fields)
    return value


def check_block(key: str, value: dict, fields: dict[str, Option]) -> dict:
    """A block of keys (a "dict" Option with ``fields``) checked key by key, defaults filled in."""
    for sub in value:
        if sub not in fields:
            close = difflib.get_close_matches(str(sub), list(fields), n=1, cutoff=0.6)
            hint = f" Did you mean {key}.{close[0]}?" if close else ""
            raise ConfigError(f"Unknown config key '{key}.{sub}'.{hint} Allowed in '{key}': {', '.join(fields)}.")
    return {sub: check_value(f"{key}.{sub}", value.get(sub, opt.default), opt) for sub, opt in fields.items()}


def _all_option_tables() -> dict[str, dict[str, Option]]:
    """Every option table by owner: 'common', each learner, each plugin."""
    from models.registry import LEARNERS
    from models.plugins import PLUGINS

    # By name, never by registration order: that follows which module was imported first (a test
    # that imports models.foster directly moved FOSTER's table ahead of the others).
    tables = {"common": COMMON_OPTIONS}
    names_of: dict[type, list[str]] = {}
    for name, cls in sorted(LEARNERS.items()):   # one table per learner class, aliases named together
        names_of.setdefault(cls, []).append(name)
    for cls, names in sorted(names_of.items(), key=lambda item: item[1][0]):
        tables[f"learner {' / '.join(names)}"] = cls.options
    for name, cls in sorted(PLUGINS.items()):
        tables[f"plugin {name}"] = cls.options
    return tables


def options_for(model_name: str) -> dict[str, Option]:
    """All keys valid for a run of ``model_name``: common + the learner's + every plugin's."""
    from models.registry import get_learner_class
    from models.plugins import PLUGINS

    merged = dict(COMMON_OPTIONS)
    for cls in PLUGINS.values():
        merged.update(cls.options)
    merged.update(get_learner_class(model_name).options)
    return merged


# Names that PyCIL or the official CIM configs use for keys that are named uniformly here (every
# learner shares the schedule names, so `--set model_name=...` works on any config). Only used to
# point the user to the right key: they are not accepted silently.
KNOWN_ALIASES = {
    "incre_epochs": "epochs", "boosting_epochs": "epochs", "init_epoch": "init_epochs",
    "lrate": "lr", "init_lr_decay": "lr_decay", "lrate_decay": "lr_decay", "init_milestone": "init_milestones",
    "memory_per_cls": "memory_per_class", "net_type": "convnet_type", "model": "model_name",
}


def _unknown_key_error(key: str, valid: Iterable[str], model_name: str) -> ConfigError:
    valid = sorted(valid)
    if KNOWN_ALIASES.get(key) in valid:
        return ConfigError(f"Unknown config key '{key}': did you mean {KNOWN_ALIASES[key]}? "
                           f"(this framework's name for it; every learner shares the schedule key names)")
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    owners = [owner for owner, table in _all_option_tables().items() if key in table]
    msg = f"Unknown config key '{key}'"
    if close:
        msg += f": did you mean {close[0]}?"
    elif owners:
        msg += f": it belongs to {owners[0]}, not to model_name '{model_name}'."
    else:
        msg += ". Run `python main.py --keys` (or see README: Configuration) for the valid keys."
    return ConfigError(msg)


def renamed_keys(raw: Mapping[str, Any], notice=None) -> dict[str, Any]:
    """``raw`` with names that were renamed mapped to the new ones (one notice line each, on stderr).

    The procedural dataset was called ``synthetic`` (dataset and options key) before synthetic
    replay existed; it is ``shapes`` now.
    """
    import sys

    notice = notice or (lambda msg: print(f"notice: {msg}", file=sys.stderr))
    out = dict(raw)
    if out.get("dataset") == "synthetic":
        out["dataset"] = "shapes"
        notice("dataset 'synthetic' is now called 'shapes' (the procedural shapes set); using 'shapes'.")
    if "synthetic" in out and "shapes" not in out:
        out["shapes"] = out.pop("synthetic")
        notice("config key 'synthetic' is now called 'shapes'; using it as 'shapes'.")
    return out


def resolve_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``raw`` and return the resolved config (every key present, defaults filled in).

    Raises ConfigError for an unknown key, a wrong type, a bad choice or an out-of-range value.
    Dataset-dependent checks (class counts) happen in :func:`check_protocol`.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("A config must be a JSON object of key: value pairs.")
    from models.registry import LEARNERS

    raw = renamed_keys(raw)
    model_name = raw.get("model_name", COMMON_OPTIONS["model_name"].default)
    if not isinstance(model_name, str) or model_name not in LEARNERS:
        close = difflib.get_close_matches(str(model_name), list(LEARNERS), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(f"Config key 'model_name' is {json.dumps(model_name)}; "
                          f"allowed: {', '.join(sorted(LEARNERS))}.{hint}")
    table = options_for(model_name)
    for key in raw:
        if key not in table:
            raise _unknown_key_error(key, table, model_name)
    resolved = {}
    for key, opt in table.items():
        value = raw[key] if key in raw else opt.default
        resolved[key] = check_value(key, value, opt)
    dataset_names = _dataset_names()
    if resolved["dataset"] not in dataset_names:
        raise ConfigError(f"Config key 'dataset' is {json.dumps(resolved['dataset'])}; "
                          f"allowed: {', '.join(dataset_names)}.")
    from convs.registry import backbone_names

    if resolved["convnet_type"] not in backbone_names():
        close = difflib.get_close_matches(resolved["convnet_type"], backbone_names(), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(f"Config key 'convnet_type' is {json.dumps(resolved['convnet_type'])}; "
                          f"allowed: {', '.join(backbone_names())}.{hint}")
    dev = resolved["device"]
    if not (dev in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:(0|[1-9][0-9]{0,3})", dev)):
        raise ConfigError(f"Config key 'device' is {json.dumps(dev)}; allowed: auto, cpu, cuda, cuda:N (N a GPU index "
                          f"such as 0 or 1).")
    _check_sizes(resolved)
    _check_paths_and_ranges(resolved)
    from utils.datasets import check_stream_decode, stored_form

    resolved["stored_form"] = stored_form(resolved["dataset"], resolved["augment"], resolved["in_memory"],
                                          resolved["stored_form"])
    check_stream_decode(resolved["dataset"], resolved["in_memory"], resolved["stream_decode"])
    LEARNERS[model_name].check_config(resolved)
    from models.plugins import PLUGINS

    for plugin in PLUGINS.values():
        plugin.check_config(resolved, LEARNERS[model_name])
    return resolved


def stored_image_size(cfg: Mapping[str, Any]) -> int:
    """The side of the stored images: ``image_size``, or the dataset's default when it is null."""
    from utils.datasets import DATASETS

    return cfg["image_size"] or DATASETS[cfg["dataset"]].image_size


def _check_sizes(cfg: dict) -> None:
    """``input_size`` (network input, a centre/random crop) cannot exceed the stored ``image_size``
    (both resolved with the dataset's defaults)."""
    from utils.datasets import DATASETS

    info = DATASETS[cfg["dataset"]]
    image_size = stored_image_size(cfg)
    input_size = cfg["input_size"] or info.input_size
    if input_size > image_size:
        which = "input_size" if cfg["input_size"] is not None else "image_size"
        raise ConfigError(
            f"Config key '{which}': input_size {input_size} is larger than the stored image_size {image_size} "
            f"(dataset '{cfg['dataset']}' defaults: image_size {info.image_size}, input_size {info.input_size}); "
            f"the network input is cropped from the stored image, so input_size must be ≤ image_size.")
    for key, what in (("crop_padding", "a random crop could then be padding alone"),
                      ("cutout", "a Cutout square of that side erases a whole image")):
        if cfg[key] >= input_size:
            raise ConfigError(f"Config key '{key}' is {cfg[key]}; it must be less than the network input's side "
                              f"input_size {input_size}: {what}.")


def _check_paths_and_ranges(cfg: dict) -> None:
    """Cross-value checks that used to pass validation and then fail (or misplace outputs) later."""
    lo, hi = cfg["rrc_scale"]
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"Config key 'rrc_scale' is {json.dumps(cfg['rrc_scale'])}; it must be [min, max] "
                          f"with 0 < min ≤ max ≤ 1 (area fractions of the random resized crop).")
    prefix = cfg["prefix"]
    if prefix in (".", "..") or "/" in prefix or "\\" in prefix:
        raise ConfigError(f"Config key 'prefix' is {json.dumps(prefix)}; it names one folder, so it cannot "
                          f"contain '/' or '\\' or be '.' or '..' (use --output for another location).")
    try:
        encoded = os.fsencode(prefix)
    except UnicodeEncodeError:
        encoded = None
    if encoded is None or b"\0" in encoded or len(encoded) > 240:
        shown = json.dumps(prefix)
        raise ConfigError(f"Config key 'prefix' is {shown[:60] + ('…' if len(shown) > 60 else '')}; it names a folder (with '-' and the "
                          f"config's 8-character hash), so it must be at most 240 bytes, without NUL or "
                          f"characters the file system cannot encode.")
    for key in ("cache_dir", "data_root", "class_list"):
        if cfg[key] is not None and not cfg[key].strip():
            raise ConfigError(f"Config key '{key}' is an empty string; give a path, or null"
                              f"{' to disable the cache' if key == 'cache_dir' else ''}.")
        if cfg[key] is not None and "\0" in cfg[key]:
            raise ConfigError(f"Config key '{key}' is {json.dumps(cfg[key])}: a path cannot contain a NUL character.")
    seeds = cfg["seed"] if isinstance(cfg["seed"], list) else [cfg["seed"]]
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"Config key 'seed' is {json.dumps(cfg['seed'])}; a list of seeds must not repeat one "
                          f"(each seed is one run, in its own folder seed<seed>).")
    from utils.datasets import check_in_memory

    check_in_memory(cfg["dataset"], cfg["in_memory"])


def phase_plan(cfg: Mapping[str, Any], num_classes: int) -> list[tuple[int, int]]:
    """Class ranges ``[(first, last_exclusive), ...]`` of the phases, or ConfigError if they do not fit.

    With ``num_phases`` null every class is used: when (classes − init_cls) is not a multiple of
    ``increment`` the leftover classes form a smaller last phase (as PyCIL). A given ``num_phases``
    is honoured when the classes suffice (the last phase may then be the smaller one); the classes
    it leaves out are named by :func:`plan_note`.
    """
    init, inc = cfg["init_cls"], cfg["increment"]
    if init > num_classes:
        raise ConfigError(f"Config key 'init_cls' is {init} but dataset '{cfg['dataset']}' has only "
                          f"{num_classes} classes.")
    full = 1 + (num_classes - init) // inc            # phases of the full size
    leftover = (num_classes - init) % inc
    max_phases = full + (1 if leftover else 0)
    n = cfg["num_phases"] if cfg["num_phases"] is not None else max_phases
    if n > max_phases:
        raise ConfigError(
            f"Config keys init_cls={init}, increment={inc}, num_phases={n} need {init + inc * (n - 1)} classes, "
            f"but dataset '{cfg['dataset']}' has {num_classes}; at most num_phases={max_phases}"
            f"{f' (the last one with {leftover} classes)' if leftover else ''}.")
    return [(0, init)] + [(init + inc * (k - 1), min(init + inc * k, num_classes)) for k in range(1, n)]


def run_notes(cfg: Mapping[str, Any], plan: list[tuple[int, int]], num_classes: int, uses_memory: bool,
              world: int = 1) -> list[str]:
    """The notes ``--check`` prints and a run logs about its plan (:func:`plan_note`), for a
    learner with a memory about its memory (:func:`memory_note`), and about settings that have no
    effect (:func:`settings_notes`; ``sync_bn`` in a run of ``world`` = 1 process)."""
    notes = [plan_note(plan, cfg["increment"], num_classes), memory_note(cfg, plan) if uses_memory else None]
    if world == 1 and cfg["sync_bn"]:
        notes.append("note: sync_bn is true but this run has one process, so it has no effect here (it is "
                     "part of the run's identity all the same: under torchrun it changes the BatchNorm statistics).")
    return [note for note in notes if note] + settings_notes(cfg)


def settings_notes(cfg: Mapping[str, Any]) -> list[str]:
    """Lines naming what a resolved config sets that this run will not use: keys of a plugin it
    leaves off (away from their defaults), keys read only with another value of a switch
    (``Option.only_with``, e.g. milestones under ``scheduler: cosine``), and lr milestones at or
    beyond their stage's epochs (``Option.milestones_of``), where the lr never decays."""
    from models.plugins import PLUGINS
    from models.registry import get_learner_class

    notes = []
    for name, cls in PLUGINS.items():
        if cls.enabled(cfg):
            continue
        unused = [key for key, opt in cls.options.items() for key in _set_keys(key, cfg[key], opt)]
        if unused:
            notes.append(f"note: plugin {name} is off in this run, so {', '.join(unused)} (set away from the "
                         f"default) {'has' if len(unused) == 1 else 'have'} no effect.")
    options = {**COMMON_OPTIONS, **{k: o for cls in PLUGINS.values() if cls.enabled(cfg) for k, o in cls.options.items()},
               **get_learner_class(cfg["model_name"]).options}
    for key, opt in options.items():
        if opt.switched_off(cfg):
            if cfg[key] != opt.default and cfg[key] not in ([], None):
                notes.append(f"note: {key} {json.dumps(cfg[key])} has no effect: it applies only with "
                             f"{opt.only_with[0]} {json.dumps(opt.only_with[1])}, and {opt.only_with[0]} is "
                             f"{json.dumps(cfg[opt.only_with[0]])}.")
            continue
        if opt.milestones_of and cfg[opt.milestones_of] > 0:
            late = [m for m in cfg[key] if m >= cfg[opt.milestones_of]]
            if late:
                notes.append(f"note: {key} {', '.join(map(str, late))} {'is' if len(late) == 1 else 'are'} not below "
                             f"{opt.milestones_of} {cfg[opt.milestones_of]}: the lr never decays there.")
    return notes


def _set_keys(key: str, value: Any, opt: Option) -> list[str]:
    """``key`` (or, for a block, its ``key.field`` names) where ``value`` differs from the default."""
    if opt.fields:
        return [f"{key}.{sub}" for sub, field in opt.fields.items() if value.get(sub) != field.default]
    return [key] if value != opt.default else []


def memory_note(cfg: Mapping[str, Any], plan: list[tuple[int, int]]) -> str | None:
    """A line when a learner with a memory would keep no exemplar of a class: a per-class budget
    below one image (``memory_size`` smaller than the classes seen, or ``memory_per_class`` 0),
    from the first phase where that happens; None otherwise."""
    if cfg["fixed_memory"]:
        if cfg["memory_per_class"] == 0:
            return "note: memory_per_class is 0 (fixed_memory true): no exemplar is kept; NME needs exemplars."
        return None
    empty = [k for k, (_, last) in enumerate(plan) if cfg["memory_size"] // last == 0]
    if not empty:
        return None
    k, last = empty[0], plan[empty[0]][1]
    return (f"note: memory_size {cfg['memory_size']} is less than one image per class from phase {k} on "
            f"({last} classes seen): no exemplar is kept from then on; NME needs exemplars.")


def plan_note(plan: list[tuple[int, int]], increment: int, num_classes: int) -> str | None:
    """A line saying how the plan departs from equal phases over every class, or None."""
    notes = []
    if len(plan) > 1 and plan[-1][1] - plan[-1][0] < increment:
        notes.append(f"the last phase has {plan[-1][1] - plan[-1][0]} classes (the leftover of "
                     f"{num_classes} classes after phases of {increment})")
    if plan[-1][1] < num_classes:
        notes.append(f"{num_classes - plan[-1][1]} of the dataset's {num_classes} classes are not used "
                     f"(num_phases={len(plan)})")
    return "note: " + "; ".join(notes) + "." if notes else None


def load_config_file(name_or_path: str) -> tuple[dict, str]:
    """Read a config by path or by bare name in ``configs/``; returns (raw dict, config name)."""
    candidates = [Path(name_or_path)]
    if not name_or_path.endswith(".json"):
        candidates.append(Path(name_or_path + ".json"))
    candidates += [CONFIG_DIR / c.name for c in list(candidates)]
    for path in candidates:
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ConfigError(f"Config file {path} is not valid JSON: {err}.") from None
            except UnicodeDecodeError as err:
                raise ConfigError(f"Config file {path} is not UTF-8 text (JSON must be): {err}.") from None
            except RecursionError:
                raise ConfigError(f"Config file {path} nests its JSON too deeply to be read.") from None
            except OSError as err:
                raise ConfigError(f"Config file {path} cannot be read: {err.strerror or err}.") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"Config file {path} must hold a JSON object.")
            return raw, path.stem
    from utils.io import path_problem

    for path in candidates:   # a name taken by something else than a file: say what it is
        if os.path.lexists(path):
            raise ConfigError(f"Config file {path} {path_problem(str(path))}; give a JSON file or a name in "
                              f"{CONFIG_DIR}.")
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"No config file '{name_or_path}' (looked in the current folder and in {CONFIG_DIR}). "
                      f"Available: {', '.join(available)}.")


def parse_set(assignments: Iterable[str]) -> dict[str, Any]:
    """``["memory_size=1000", "convnet_type=resnet18"]`` -> dict; values parsed as JSON, else strings."""
    out = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'.")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
        except RecursionError:
            raise ConfigError(f"--set {key}: the value nests its JSON too deeply to be read.") from None
    return out


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with ``overrides`` applied in order, as ``--set`` and sweep specs apply them: a plain key
    replaces the value; a block (a JSON object, e.g. ``synthetic_replay``) given for a block changes
    only the fields it names; ``block.field`` (the names ``--keys`` lists) sets one field. So
    ``--set 'shapes={"test_per_class": 4}'`` keeps the config's other ``shapes`` fields (it used to
    drop them, silently, for their defaults). ConfigError when ``block.field`` names a key whose
    value is not a block."""
    out = dict(raw)
    for key, value in overrides.items():
        top, dot, field = key.partition(".")
        if dot:
            block = out.get(top)
            if block is not None and not isinstance(block, dict):
                raise ConfigError(f"Config key '{key}': '{top}' is {json.dumps(block)}, not a block of fields, so "
                                  f"'{key}' names nothing; use --set {top}=VALUE.")
            out[top] = apply_overrides(block or {}, {field: value})
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


# Keys that change where or how fast a run happens but not its results.
_IDENTITY_NOTE = " Not part of a run's identity (its config hash): a run may resume with another value."
_NOT_HASHED = ("device", "num_workers", "cache_dir", "seed", "prefix", "checkpoints", "eval_batch_size", "threads",
               "dist_timeout", "compile", "compile_mode", "bilevel_cuda_graph", "pau_kernel")


def hashed_keys(cfg: Mapping[str, Any]) -> set[str]:
    """The keys that identify a run (resolved ``cfg``): the common keys, the learner's own keys and the
    keys of every plugin that ``cfg`` enables — never a disabled plugin's, so adding a plugin or
    changing one of its defaults leaves the runs that do not use it where they are."""
    from models.plugins import PLUGINS
    from models.registry import get_learner_class

    keys = set(COMMON_OPTIONS) | set(get_learner_class(cfg["model_name"]).options)
    for cls in PLUGINS.values():
        if cls.enabled(cfg):
            keys |= set(cls.options)
    return keys - set(_NOT_HASHED)


# Keys that identify a run only when they are not at their default (added after runs existed:
# their default must not move every run folder).
_HASHED_WHEN_SET = {"sync_bn": False, "stored_form": "crop", "stream_decode": "workers",
                    "bilevel_autocast": False, "nme_flip": True, "balance_counts": "real",
                    "amp_inference": False, "cbf_balance": "samples", "herding": "distinct"}


def identifying_value(cfg: Mapping[str, Any], key: str) -> Any:
    """``cfg[key]`` as it identifies a run: a data-location key that the dataset format ignores
    (``data_root`` of ``shapes``, ``class_list`` outside ``imagenet100``, ``shapes`` of a real
    dataset: ``DatasetInfo.reads``) counts as its default, whatever it holds."""
    from utils.datasets import DATASETS

    if key in ("data_root", "class_list", "shapes") and key not in DATASETS[cfg["dataset"]].reads:
        return COMMON_OPTIONS[key].default
    return cfg.get(key)


def config_hash(cfg: Mapping[str, Any]) -> str:
    """Short stable hash of the result-affecting part of a resolved config (:func:`hashed_keys`)."""
    keys = hashed_keys(cfg)
    payload = {k: identifying_value(cfg, k) for k, v in cfg.items() if k in keys
               and not (k in _HASHED_WHEN_SET and v == _HASHED_WHEN_SET[k])}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


def resolve_saved_config(saved: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A config saved by an earlier run (config.json, results.json), resolved with today's schema:
    (the resolved config, the identifying keys it lacked, now at their defaults). Comparing this
    with a new run's config, rather than the raw file, lets a run resume after a key was added
    whose default reproduces the old behaviour. Raises ConfigError if it holds a key no longer known."""
    renamed = renamed_keys(saved, notice=lambda msg: None)   # an old name is not a missing key
    # A run saved before stored_form existed stored its training images as centre crops, whatever
    # today's default for its dataset ("whole" for resized_crop folders): resuming it, or counting its
    # results as today's, must not pass for the same run.
    renamed.setdefault("stored_form", "crop")
    resolved = resolve_config(renamed)
    return resolved, sorted(k for k in hashed_keys(resolved) if k not in renamed)


def result_key_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The keys whose difference between two resolved configs changes results: the identifying
    keys of either (:func:`hashed_keys`) and ``seed`` (the folder is per seed, so the hash leaves it
    out, but it draws the class order and every random number). Resume refuses any of them."""
    keys = hashed_keys(old) | hashed_keys(new) | {"seed"}
    return sorted(k for k in keys if identifying_value(old, k) != identifying_value(new, k))


def describe_keys() -> str:
    """Markdown tables of every key, by owner (used for `main.py --keys` and the README). A ``|``
    in a description (``none | full | …``) is escaped, so it stays inside its cell."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = []
    for owner, table in _all_option_tables().items():
        lines += [f"### {owner}", "", "| key | default | meaning |", "|---|---|---|"]
        for key, opt in table.items():
            allowed = f" Allowed: {', '.join(map(str, opt.choices))}." if opt.choices else ""
            allowed += _IDENTITY_NOTE if key in _NOT_HASHED and key != "seed" else ""   # seed: a folder per seed
            lines.append(f"| `{key}` | `{cell(json.dumps(opt.default))}` | {cell(opt.doc + allowed)} |")
            for sub, field in (opt.fields or {}).items():
                allowed = f" Allowed: {', '.join(map(str, field.choices))}." if field.choices else ""
                lines.append(f"| `{key}.{sub}` | `{cell(json.dumps(field.default))}` | {cell(field.doc + allowed)} |")
        lines.append("")
    return "\n".join(lines)
