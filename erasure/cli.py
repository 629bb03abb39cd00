"""Shared command-line plumbing: config-group checks before Hydra starts, so that a typo in
``method=``, ``params=``, ``model=``, ``concept=`` or ``logger=`` ends in one sentence, not a Hydra trace."""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "concept", "params", "logger", "trainer")
GROUP_WORD = {"params": "parameter subset"}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_overrides(argv: list[str]) -> None:
    """Refuse unknown options of the config groups named on the command line (sweeps included)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS:
            continue
        choices = value.strip()
        if choices.startswith(("choice(", "glob(")):
            continue
        options = group_options(key)
        for choice in choices.split(","):
            if choice.strip() and choice.strip() not in options:
                what = GROUP_WORD.get(key, key)
                raise UserError(f"unknown {what} '{choice.strip()}' ({key}=): choose one of {', '.join(options)}")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
