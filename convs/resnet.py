"""ResNet backbones: CIFAR ResNet-32, ImageNet-style ResNet-18/34, their small-image and cosine variants.

Every backbone maps images [B, 3, H, W] (float) to a dict::

    fmap:     [B, C, h, w]  last-stage feature map (input of the CAM, SPEC §3 step 1)
    features: [B, C]        global average pool of ``fmap``

and has ``out_dim == C``. All nonlinearities are :class:`convs.activation.Activation` sites (one
instance per site) so the CIM model can swap each for its own PAU (SPEC §3.1).

Variants:
* ``resnet32`` — the CIFAR ResNet of He et al. as used by PyCIL: 3x3 stem, 3 stages of 5 BasicBlocks
  with 16/32/64 channels. Shortcuts that change shape are PyCIL's parameter-free "DownsampleA"
  (option A: stride-2 subsampling, new channels zero-padded), so it has no 1x1 shortcut convs.
* ``resnet18`` / ``resnet34`` — torchvision's architecture (7x7 stride-2 stem + max-pool, 1x1-conv
  "option B" shortcuts); parameter names match torchvision so its state dicts load (minus ``fc``).
  Nothing is downloaded.
* ``*_small`` — the same with a 3x3 stride-1 stem and no max-pool, for 32–64 px inputs.
* ``cosine_*`` — LUCIR's variant: the last BasicBlock has no activation after its residual add, so
  ``fmap`` (and ``features``) can be negative, which the cosine classifier needs. ``cosine_resnet32``
  (and ``cosine_resnet20``) also take LUCIR's 1x1-conv + BN "option B" shortcuts (its official
  CIFAR network and PyCIL's ``ucir_cifar_resnet``), where ``resnet32`` has option A.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from convs.activation import Activation, SwitchableActivations
from convs.registry import register_backbone


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Parameter-free shortcut (He et al. option A, PyCIL's ``DownsampleA``).

    [B, C, H, W] -> [B, C + extra, ceil(H/stride), ceil(W/stride)]: spatial subsampling, then the
    new channels are zeros appended after the old ones.
    """

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's last pair pads dim 1 (channels) at its end.
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """conv3x3-BN-act-conv3x3-BN, + shortcut, then act (omitted when ``last_relu`` is False).

    [B, in_planes, H, W] -> [B, planes, H/stride, W/stride].
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, shortcut: str = "B",
                 last_relu: bool = True) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = Activation()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # Identity instead of an Activation so that the removed ReLU is not counted as a site.
        self.act2 = Activation() if last_relu else nn.Identity()

        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = ShortcutA(stride, planes - in_planes)
            else:  # "B": torchvision's projection shortcut
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + identity)


class ResNet(SwitchableActivations, nn.Module):
    """A stem, then ``len(layers)`` stages of BasicBlocks (the first at stride 1, others stride 2).

    Args:
        layers: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        widths: channels per stage, e.g. (64, 128, 256, 512); the stem outputs ``widths[0]``.
        stem: ``"imagenet"`` (7x7 stride-2 conv + 3x3 stride-2 max-pool) or ``"small"`` (3x3
            stride-1 conv, no pooling).
        shortcut: ``"A"`` (parameter-free, zero-padded) or ``"B"`` (1x1 conv + BN).
        last_relu: False removes the activation after the residual add of the very last block
            (LUCIR's cosine backbones).

    Input [B, 3, H, W] float; output {"fmap": [B, widths[-1], h, w], "features": [B, widths[-1]]}.
    """

    def __init__(self, layers: Sequence[int], widths: Sequence[int], *, stem: str = "imagenet",
                 shortcut: str = "B", last_relu: bool = True) -> None:
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if len(layers) != len(widths):
            raise ValueError("layers and widths must have the same length")

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(3, widths[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = Activation()

        in_planes = widths[0]
        for stage, (num_blocks, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for i in range(num_blocks):
                is_last = stage == len(layers) - 1 and i == num_blocks - 1
                blocks.append(BasicBlock(
                    in_planes, planes, stride=2 if (stage > 0 and i == 0) else 1,
                    shortcut=shortcut, last_relu=last_relu or not is_last,
                ))
                in_planes = planes
            # torchvision's names (layer1..layer4), so its state dicts load into ours.
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.out_dim: int = widths[-1]
        self.last_relu = last_relu

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        # flatten, not view: the pooled tensor of a channels_last input is not view-compatible.
        features = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return {"fmap": x, "features": features}


# ---------------------------------------------------------------- registered constructors

_R18 = ((2, 2, 2, 2), (64, 128, 256, 512))
_R34 = ((3, 4, 6, 3), (64, 128, 256, 512))


@register_backbone("resnet32")
def resnet32(*, last_relu: bool = True) -> ResNet:
    return ResNet((5, 5, 5), (16, 32, 64), stem="small", shortcut="A", last_relu=last_relu)


@register_backbone("resnet20")
def resnet20(*, last_relu: bool = True) -> ResNet:
    """CIFAR ResNet-20 (3 blocks per stage): resnet32's design at ~60% of its cost, for CPU-scale runs."""
    return ResNet((3, 3, 3), (16, 32, 64), stem="small", shortcut="A", last_relu=last_relu)


@register_backbone("resnet18")
def resnet18(*, last_relu: bool = True) -> ResNet:
    return ResNet(*_R18, stem="imagenet", last_relu=last_relu)


@register_backbone("resnet34")
def resnet34(*, last_relu: bool = True) -> ResNet:
    return ResNet(*_R34, stem="imagenet", last_relu=last_relu)


@register_backbone("resnet18_small")
def resnet18_small(*, last_relu: bool = True) -> ResNet:
    return ResNet(*_R18, stem="small", last_relu=last_relu)


@register_backbone("resnet34_small")
def resnet34_small(*, last_relu: bool = True) -> ResNet:
    return ResNet(*_R34, stem="small", last_relu=last_relu)


@register_backbone("cosine_resnet32")
def cosine_resnet32() -> ResNet:
    """LUCIR's CIFAR network (official ``modified_resnet_cifar.py``, PyCIL's ``ucir_cifar_resnet``):
    resnet32 with 1x1-conv + BN ("option B") shortcuts, not resnet32's parameter-free ones."""
    return ResNet((5, 5, 5), (16, 32, 64), stem="small", shortcut="B", last_relu=False)


@register_backbone("cosine_resnet20")
def cosine_resnet20() -> ResNet:
    """cosine_resnet32's design with 3 blocks per stage (option-B shortcuts too)."""
    return ResNet((3, 3, 3), (16, 32, 64), stem="small", shortcut="B", last_relu=False)


@register_backbone("cosine_resnet18")
def cosine_resnet18() -> ResNet:
    return resnet18(last_relu=False)


@register_backbone("cosine_resnet34")
def cosine_resnet34() -> ResNet:
    return resnet34(last_relu=False)


@register_backbone("cosine_resnet18_small")
def cosine_resnet18_small() -> ResNet:
    return resnet18_small(last_relu=False)


@register_backbone("cosine_resnet34_small")
def cosine_resnet34_small() -> ResNet:
    return resnet34_small(last_relu=False)
