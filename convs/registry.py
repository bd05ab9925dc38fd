"""Backbone registry: ``@register_backbone("name")`` next to each definition, one factory.

Backbones live in their own modules (``convs/resnet.py``, ...). The factory imports them lazily so
that ``from convs.registry import create_backbone`` alone is enough for callers and the registry
module itself has no import-time dependency on the models (no import cycle).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from torch import nn

from utils.errors import ConfigError

# name -> constructor returning an nn.Module with ``out_dim`` and forward -> {"fmap", "features"}.
BACKBONES: dict[str, Callable[..., nn.Module]] = {}

# Modules whose import registers backbones. Add a module here when it defines new backbones.
_BACKBONE_MODULES = ("convs.resnet",)


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a backbone constructor under ``name`` (duplicates are a bug)."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in BACKBONES and BACKBONES[name] is not fn:
            raise ValueError(f"backbone {name!r} registered twice")
        BACKBONES[name] = fn
        return fn

    return decorator


def _load_backbone_modules() -> None:
    for module in _BACKBONE_MODULES:
        importlib.import_module(module)


def backbone_names() -> list[str]:
    """All registered backbone names, sorted."""
    _load_backbone_modules()
    return sorted(BACKBONES)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name``; ``kwargs`` go to its constructor.

    Raises:
        ConfigError: ``name`` is not registered (the message lists the allowed names), or a
            keyword argument the constructor does not take (the message lists those it takes).
    """
    names = backbone_names()
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; allowed: {', '.join(names)}")
    constructor = BACKBONES[name]
    signature = inspect.signature(constructor)
    try:
        # Checked up front so that a TypeError raised inside the constructor stays a bug.
        signature.bind(**kwargs)
    except TypeError as err:
        accepted = ", ".join(signature.parameters) or "none"
        raise ConfigError(f"backbone {name!r}: {err}; accepted arguments: {accepted}") from None
    return constructor(**kwargs)
