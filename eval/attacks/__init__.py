"""Attack registry (the robustness evaluation): one file per attack, registered by name like a metric.

An attack is a class with a ``Config`` dataclass (its schema; every default cites the official code) and a pure
core callable on tensors, decorated ``@register_attack("<name>")``. :func:`get_attack` finds it by name and refuses
an unknown one with the list of known names. The attack modules are imported at the bottom of this file (explicitly:
no entry points), so importing ``eval.attacks`` registers them all.
"""
from __future__ import annotations

from erasure.errors import UserError

_ATTACKS: dict[str, type] = {}


def register_attack(name: str):
    """Class decorator: register an attack under ``name`` (twice is an error)."""

    def deco(cls):
        if name in _ATTACKS:
            raise ValueError(f"attack '{name}' is already registered")
        cls.name = name
        _ATTACKS[name] = cls
        return cls

    return deco


def get_attack(name: str) -> type:
    """The attack class registered under ``name``."""
    if name not in _ATTACKS:
        raise UserError(f"unknown attack '{name}': choose one of {', '.join(available_attacks())}")
    return _ATTACKS[name]


def available_attacks() -> list[str]:
    """Registered attack names, sorted."""
    return sorted(_ATTACKS)


from . import unlearndiffatk  # noqa: E402,F401  (registers "unlearndiffatk")
