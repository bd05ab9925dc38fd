"""A backbone and a classifier head that grows with the classes seen."""
from __future__ import annotations

import torch
from torch import nn

from convs.activation import SwitchableActivations
from convs.registry import create_backbone


class IncrementalNet(SwitchableActivations, nn.Module):
    """``forward(x)`` -> {"fmap" [B, C, h, w], "features" [B, C], "logits" [B, classes], ...head extras}."""

    def __init__(self, convnet_type: str):
        super().__init__()
        self.backbone = create_backbone(convnet_type)
        self.head: nn.Module | None = None

    @property
    def feature_dim(self) -> int:
        return self.backbone.out_dim

    @property
    def classifier(self) -> nn.Module:
        """The head over ``features`` (its ``weight_rows()`` give the CAM's class weights)."""
        return self.head

    def forward(self, x: torch.Tensor) -> dict:
        out = self.backbone(x)
        return {**out, **self.head(out["features"])}
