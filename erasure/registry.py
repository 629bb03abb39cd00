"""Registries by name: erasure methods and model probes. The core finds them here and never imports one by name.

A module registers its classes with a decorator (:func:`register` for a method, :func:`register_probe` for a
probe). The modules that do so are listed as Python entry points (pyproject.toml: groups ``erasure.methods`` and
``erasure.probes``) and imported on the first lookup, so a third-party package can add a method or a probe without
touching this code. Registering a name twice is an error; asking for an unknown name says which ones exist.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import tomllib
from pathlib import Path

from .errors import UserError


class Registry:
    """Name -> class, filled by the modules of one entry-point group on first use."""

    def __init__(self, kind: str, group: str):
        self.kind, self.group = kind, group
        self._items: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str):
        """Class decorator: register ``cls`` under ``name`` (sets ``cls.name``)."""

        def deco(cls):
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} '{name}' is already registered by {self._items[name].__module__}")
            cls.name = name
            self._items[name] = cls
            return cls

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        eps = list(importlib.metadata.entry_points(group=self.group))
        modules = [ep.value.split(":")[0] for ep in eps] or _pyproject_entry_points(self.group)
        for module in modules:  # a source checkout never pip-installed (e.g. on a GPU box): the pyproject table
            importlib.import_module(module)

    def available(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> type:
        self._load()
        if name not in self._items:
            raise UserError(f"unknown {self.kind} '{name}': choose one of {', '.join(sorted(self._items))}")
        return self._items[name]


def _pyproject_entry_points(group: str) -> list[str]:
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not path.is_file():
        return []
    table = tomllib.loads(path.read_text()).get("project", {}).get("entry-points", {})
    return [str(v).split(":")[0] for v in table.get(group, {}).values()]


METHODS = Registry("method", "erasure.methods")
PROBES = Registry("probe", "erasure.probes")

register = METHODS.register
get_method = METHODS.get
available = METHODS.available
register_probe = PROBES.register
get_probe = PROBES.get
