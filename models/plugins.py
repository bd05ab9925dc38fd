"""Plugins: behaviour attached to the one training loop at named points (Avalanche-style).

A plugin declares its config ``options`` and is enabled by its config (``enabled(cfg)``). Hooks, all
optional, are called by the trainer in this order within a phase:
``before_phase`` → per epoch: ``before_augment`` (per batch, may change the uint8 images) →
``after_epoch`` → ``compressor`` (used by the memory update) → ``after_phase``.
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


class Plugin:
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, cfg: dict, trainer: Any):
        self.cfg = cfg
        self.trainer = trainer

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return False

    def before_phase(self, phase) -> None: ...
    def before_augment(self, images, labels, is_old, stage, epoch: int):
        """uint8 images [B, 3, S, S] of a training batch (on the device) -> images to augment."""
        return images
    def after_epoch(self, phase, stage, epoch: int) -> None: ...
    def compressor(self, phase):
        """A memory Compressor for this phase's new classes, or None."""
        return None
    def after_phase(self, phase) -> None: ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...
