"""Plugins: behaviour attached to the one training loop at named points (Avalanche-style).

A plugin declares its config ``options`` and is enabled by its config (``enabled(cfg)``); only an
enabled plugin's keys identify a run. It is built with the run's config and a
:class:`models.context.RunContext` (``self.ctx``), never the trainer. Hooks, all optional, are called
by the trainer in this order within a phase:
``after_grow`` (after the learner changed its network; also replayed on resume) → ``before_phase`` →
per stage: ``sources`` (samples this plugin adds to the stage's data) → ``before_stage`` → per
epoch: ``before_augment`` (per batch, may change the uint8 images) → ``after_epoch`` →
``after_stage``; then ``compressor`` (used by the memory update) → ``after_phase`` →
``phase_report`` (extra fields of results.json ``phases[k]``). ``run_info`` adds top-level fields
to results.json once. Before all of that, ``check_config`` (a resolved config) and ``check_inputs``
(the files the plugin will read) run from ``--check`` and at the start of a run, before any image is
decoded.

Under torchrun every hook runs on every process, in step (``ctx.rank``, ``ctx.world_size``,
``ctx.is_main``): a plugin writes files on rank 0 only, and whatever must be the same on every rank
is computed on rank 0 and broadcast (CIM's φ), or computed in shares and gathered
(``utils/distributed.map_shards``: CIM's CAM boxes), so every rank holds the same numbers.
``compressor`` is called on every rank (the memory update is a collective: each rank decodes and
embeds its share of each new class's images, and its compressor gives that share's boxes; see
``utils.memory.Compressor``), ``phase_report`` on rank 0 only.
"""
from __future__ import annotations

from typing import Any, ClassVar

from utils.config import Option

PLUGINS: dict[str, type] = {}


def register_plugin(name: str):
    def wrap(cls):
        PLUGINS[name] = cls
        return cls
    return wrap


def check_plugin_inputs(cfg: dict, class_ids: list[str], plan: list[tuple[int, int]]) -> None:
    """``check_inputs`` of every plugin ``cfg`` enables."""
    for cls in PLUGINS.values():
        if cls.enabled(cfg):
            cls.check_inputs(cfg, class_ids, plan)


class Plugin:
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, cfg: dict, ctx: Any):
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return False

    @classmethod
    def check_config(cls, cfg: dict, learner_cls: type) -> None:
        """Cross-key checks of a resolved config (raise ConfigError)."""

    @classmethod
    def check_inputs(cls, cfg: dict, class_ids: list[str], plan: list[tuple[int, int]]) -> None:
        """Checks of the files this plugin reads, from file listings alone (raise DataError naming
        the key or path): ``class_ids`` are the dataset's class ids in class-order position, ``plan``
        the phases' [first, last) class ranges. Run by ``--check``, and by a run before its dataset is
        loaded, so a bad path stops it in seconds rather than after the images are decoded."""

    def after_grow(self, phase) -> None: ...
    def before_phase(self, phase) -> None: ...
    def sources(self, phase, kind: str) -> list:
        """``utils.stage_data.SourceData`` this plugin adds to a stage whose data is ``kind``
        ("phase": new classes + memory; "memory": the memory alone)."""
        return []
    def before_stage(self, phase, stage, data) -> None:
        """The stage's ``utils.stage_data.StageData``: the epoch part's uint8 images [N, 3, S, S]
        (or a streamed source), labels, origin and training-set index [N], and the mixed sources."""
    def before_augment(self, images, batch, stage, epoch: int):
        """uint8 images [B, 3, S, S] of a training batch (on the device) and its
        ``utils.stage_data.RawBatch`` (labels, origin, training-set index) -> the images to augment."""
        return images
    def after_epoch(self, phase, stage, epoch: int, lr: float) -> None:
        """After an epoch's pass; ``lr`` is the learning rate that epoch used."""
    def after_stage(self, phase, stage) -> None: ...
    def owned_parameters(self) -> list:
        """Parameters this plugin optimises itself; the stages' optimisers leave them out."""
        return []
    def compressor(self, phase):
        """A ``utils.memory.Compressor`` for this phase's new classes, or None."""
        return None
    def after_phase(self, phase) -> None: ...
    def phase_report(self, phase) -> dict:
        return {}
    def run_info(self) -> dict:
        """Top-level fields of results.json (e.g. that an external generator was used)."""
        return {}
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...
