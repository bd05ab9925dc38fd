"""The one activation module used by every backbone.

Each activation *site* of a network is its own :class:`Activation` instance, so the CIM model
(SPEC §3.1) can give every site its own learnable Padé activation unit while sharing all conv/BN/FC
weights with the CIL model::

    for site in activation_sites(backbone):
        site.pau = PAU()       # from convs/pau.py
        site.mode = "pau"      # forward now calls site.pau(x); set back to "relu" for the CIL model

Backbones must never call ``F.relu`` inline: an inline ReLU would be a site the CIM model cannot
replace.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

MODES = ("relu", "pau")


class Activation(nn.Module):
    """ReLU by default; the site's Padé unit ``self.pau`` when ``self.mode == "pau"``.

    Attributes:
        mode: ``"relu"`` or ``"pau"``. A plain attribute (not saved in state dicts): whoever
            switches it owns restoring it.
        pau: an ``nn.Module`` mapping [*] -> [*] elementwise, or None. Registered as a submodule
            slot from the start, so assigning a module later puts its coefficients into
            ``parameters()`` / ``state_dict()`` under ``<site>.pau.*``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mode = "relu"
        self.register_module("pau", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pau":
            if self.pau is None:
                raise RuntimeError("Activation.mode is 'pau' but no PAU was assigned to this site")
            return self.pau(x)
        if self.mode != "relu":
            raise RuntimeError(f"Activation.mode must be one of {MODES}, got {self.mode!r}")
        return torch.relu(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def activation_sites(module: nn.Module) -> list[Activation]:
    """Every :class:`Activation` inside ``module``, in module (registration) order."""
    return [m for m in module.modules() if isinstance(m, Activation)]


@contextlib.contextmanager
def use_activations(module: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Switch every activation site of ``module`` to ``mode`` ("relu" or "pau") for a block, then
    restore each site's previous mode (also on errors)."""
    if mode not in MODES:
        raise ValueError(f"activation mode must be one of {MODES}, got {mode!r}")
    sites = activation_sites(module)
    previous = [s.mode for s in sites]
    for s in sites:
        s.mode = mode
    try:
        yield module
    finally:
        for s, m in zip(sites, previous):
            s.mode = m


class SwitchableActivations:
    """Mixin for networks: ``with net.activations("pau"): ...`` runs the CIM model (same weights,
    every activation its Padé unit); outside the block the network is the CIL model again."""

    def activations(self, mode: str):
        return use_activations(self, mode)
