"""Networks made of several backbones side by side (DER; FOSTER's teacher in ``convs/foster_net.py``).

Each new backbone is built by the registry and then copies the previous one's weights
(:func:`clone_backbone`), so anything attached to a backbone's activation sites (the CIM model's
Padé units) is copied with it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from convs.activation import SwitchableActivations, activation_sites
from convs.registry import create_backbone


def clone_backbone(src: nn.Module, convnet_type: str) -> nn.Module:
    """A new ``convnet_type`` backbone holding a copy of ``src``'s weights and buffers.

    Activation sites that carry a unit in ``src`` (e.g. a PAU) get a copy of that unit first, so
    that ``src``'s state dict fits the new backbone exactly.
    """
    new = create_backbone(convnet_type)
    for s, d in zip(activation_sites(src), activation_sites(new)):
        if s.pau is not None:
            d.pau = copy.deepcopy(s.pau).requires_grad_(True)   # trainable even if src is frozen
    new.load_state_dict(src.state_dict())
    return new.to(next(src.parameters()).device)


def parameter_count(module: nn.Module | None, trainable: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` if ``trainable``)."""
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def freeze(module: nn.Module) -> None:
    """No gradients for ``module``'s parameters (the trainer's optimiser then skips them)."""
    for p in module.parameters():
        p.requires_grad_(False)


class DERNet(SwitchableActivations, nn.Module):
    """DER's network: one backbone per phase, every backbone but the newest frozen.

    forward(x) -> {
        "fmap":       [B, n·C, h, w]  the backbones' last-stage maps concatenated along channels,
        "features":   [B, n·C]        their pooled features concatenated,
        "logits":     [B, classes]    ``fc`` over the concatenated features,
        "aux_logits": [B, new + 1]    ``aux_fc`` over the newest backbone's features (once it exists),
    }
    ``train()`` keeps the old backbones in eval mode (their BatchNorm statistics stay fixed).
    """

    def __init__(self, convnet_type: str):
        super().__init__()
        self.convnet_type = convnet_type
        self.backbones = nn.ModuleList()
        self.fc: nn.Module | None = None
        self.aux_fc: nn.Module | None = None

    @property
    def backbone_dim(self) -> int:
        return self.backbones[0].out_dim

    @property
    def feature_dim(self) -> int:
        return sum(b.out_dim for b in self.backbones)

    @property
    def classifier(self) -> nn.Module:
        """``fc``, over the concatenated features (the CAM reads all backbones' maps)."""
        return self.fc

    def add_backbone(self) -> None:
        """Append a backbone: a fresh one first, later a copy of the newest; the others are frozen."""
        if len(self.backbones) == 0:
            self.backbones.append(create_backbone(self.convnet_type))
            return
        self.backbones.append(clone_backbone(self.backbones[-1], self.convnet_type))
        for b in self.backbones[:-1]:
            freeze(b)
            b.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for b in self.backbones[:-1]:
            b.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict:
        outs = [b(x) for b in self.backbones]
        features = torch.cat([o["features"] for o in outs], dim=1)
        out = {"fmap": torch.cat([o["fmap"] for o in outs], dim=1), "features": features, **self.fc(features)}
        if self.aux_fc is not None:
            out["aux_logits"] = self.aux_fc(outs[-1]["features"])["logits"]
        return out
