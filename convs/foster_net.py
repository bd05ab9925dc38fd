"""FOSTER's two-backbone teacher (the boosting model of a phase)."""
from __future__ import annotations

import torch
from torch import nn

from convs.activation import SwitchableActivations
from convs.der_net import clone_backbone, freeze
from convs.incremental_net import IncrementalNet
from convs.linears import SimpleLinear, expand_linear


class FosterNet(SwitchableActivations, nn.Module):
    """The old model's backbone (frozen) and a new backbone copied from it.

    Built from the one-backbone model of the previous phase ``old`` (an IncrementalNet with a
    SimpleLinear head): ``old_fc`` is ``old``'s head (frozen); ``fc`` spans both backbones' features,
    its block of old rows × old features copied from ``old_fc``; ``fe_fc`` is a fresh head over the new
    backbone alone.

    forward(x) -> {
        "fmap":       [B, 2C, h, w]   old and new backbone maps concatenated along channels,
        "features":   [B, 2C],
        "logits":     [B, classes]    ``fc`` over both,
        "fe_logits":  [B, classes]    ``fe_fc`` over the new backbone's features,
        "old_logits": [B, old]        the old model's own logits (``old_fc`` over the old features),
    }
    ``train()`` keeps the old backbone in eval mode.
    """

    def __init__(self, old: IncrementalNet, num_classes: int, convnet_type: str):
        super().__init__()
        d = old.feature_dim
        self.backbones = nn.ModuleList([old.backbone, clone_backbone(old.backbone, convnet_type)])
        self.old_fc = old.head
        self.fc = expand_linear(old.head, num_classes, in_dim=2 * d)
        self.fe_fc = SimpleLinear(d, num_classes).to(old.head.weight.device)
        freeze(self.backbones[0])
        freeze(self.old_fc)
        self.backbones[0].eval()

    @property
    def classifier(self) -> nn.Module:
        """``fc``, over both backbones' features (the CAM reads both maps)."""
        return self.fc

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbones[0].eval()
        return self

    def forward(self, x: torch.Tensor) -> dict:
        old, new = (b(x) for b in self.backbones)
        features = torch.cat([old["features"], new["features"]], dim=1)
        return {"fmap": torch.cat([old["fmap"], new["fmap"]], dim=1), "features": features,
                **self.fc(features),
                "fe_logits": self.fe_fc(new["features"])["logits"],
                "old_logits": self.old_fc(old["features"])["logits"]}
