"""Evaluate one system and write its ``eval.json``: ``python -m eval.run run=<run folder> [system=run|base|reference] [suite=<name>] [key=value ...]``.

The suite (``conf/eval/suite/<name>.yaml``) defaults to the one named like the run's model; any key can be overridden,
e.g. ``suite.prompt_sets.captions.n=50``; ``force=true`` recomputes an up-to-date eval.json (:mod:`eval.evaluation`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from erasure.cli import setup_logging
from erasure.errors import exit_on_user_error

from .config import compose
from .evaluation import evaluate


@exit_on_user_error
def main(argv: list[str]) -> Path:
    setup_logging()
    return evaluate(compose("run", argv))


if __name__ == "__main__":
    main(sys.argv[1:])
