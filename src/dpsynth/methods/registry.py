"""Method registry: name -> method class. Each module of this package registers its own
methods when imported; `discover` imports them all, so adding a method is adding one file."""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import BadInput
from .base import Method

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> None:
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is unnamed or already registered")
    METHODS[cls.name] = cls


def discover(path, prefix: str) -> None:
    """Import every module under `path` (the methods package; each module registers its methods)."""
    for info in pkgutil.walk_packages(path, prefix):
        if info.name.rsplit(".", 1)[-1] not in ("base", "registry"):
            importlib.import_module(info.name)


def get_method(name: str, arch: dict | None = None) -> Method:
    cls = METHODS.get(name)
    if cls is None:
        raise BadInput(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return cls(arch)
