"""Seeding of every random number generator a run uses (Python, NumPy, torch, loader workers)."""
from __future__ import annotations

import random
import zlib

import numpy as np
import torch


def phase_seed(seed: int, phase: int) -> int:
    """The seed of one phase: each phase's randomness depends only on (seed, phase) and the model
    state, so a run resumed after phase k draws the same numbers as an uninterrupted one."""
    return (seed * 1_000_003 + phase * 7_919) % (2 ** 63)


def stream_seed(seed: int, phase: int, stream: str) -> int:
    """The seed of a named random stream of one phase (e.g. a plugin's), decorrelated from
    ``phase_seed`` of every phase: (seed, phase, stream) go through a SplitMix64 finaliser."""
    z = (phase_seed(seed, phase) + 0x9E3779B97F4A7C15 * (1 + zlib.crc32(stream.encode()))) % (2 ** 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (2 ** 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (2 ** 64)
    return (z ^ (z >> 31)) % (2 ** 63)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
