"""Learners by name: ``@register_learner("lucir")`` next to each class, one lookup for all."""
from __future__ import annotations

import difflib

from utils.errors import ConfigError

LEARNERS: dict[str, type] = {}


def register_learner(*names: str):
    def wrap(cls):
        for name in names:
            LEARNERS[name] = cls
        return cls
    return wrap


def get_learner_class(name: str) -> type:
    _import_all()
    if name not in LEARNERS:
        close = difflib.get_close_matches(name, list(LEARNERS), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(f"Config key 'model_name' is '{name}'; allowed: {', '.join(sorted(LEARNERS))}.{hint}")
    return LEARNERS[name]


def _import_all() -> None:
    """Import every module of ``models/``: their ``@register_learner`` / ``@register_plugin``
    decorators fill the registries, so a new learner or plugin file needs no edit elsewhere."""
    import importlib
    import pkgutil

    import models

    for info in pkgutil.iter_modules(models.__path__):
        importlib.import_module(f"models.{info.name}")


_import_all()
