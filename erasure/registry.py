"""Method registry: name -> method class. The core finds methods here and never imports one by name.

Methods register themselves with :func:`register`; modules that define methods are listed as Python
entry points in the group ``erasure.methods`` (pyproject.toml) and imported on first lookup, so a
third-party package can add a method without touching this code.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import tomllib
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)
_METHODS: dict[str, type] = {}
_loaded = False
ENTRY_POINT_GROUP = "erasure.methods"


def register(name: str):
    """Class decorator: register an erasure method under ``name`` (twice is an error)."""

    def deco(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method '{name}' is already registered by {_METHODS[name].__module__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    for ep in eps:
        ep.load()
    if not eps:  # a source checkout that was never pip-installed (e.g. on a GPU box): the same table, from pyproject
        for module in _pyproject_entry_points():
            importlib.import_module(module)


def _pyproject_entry_points() -> list[str]:
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not path.is_file():
        return []
    table = tomllib.loads(path.read_text()).get("project", {}).get("entry-points", {})
    return [str(v).split(":")[0] for v in table.get(ENTRY_POINT_GROUP, {}).values()]


def available() -> list[str]:
    _load_entry_points()
    return sorted(_METHODS)


def get_method(name: str) -> type:
    _load_entry_points()
    if name not in _METHODS:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
