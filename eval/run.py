"""Evaluate one system and write its ``eval.json``: ``python -m eval.run run=<run folder> [system=run|base|reference] [suite=<name>] [key=value ...]``.

Systems: ``system=run`` (an erased model: the run's base model with its delta), ``system=base`` (the run's base model
alone) and ``system=reference`` (the suite's real images: the paper's "COCO" row). The suite
(``conf/eval/suite/<name>.yaml``; by default the one named like the run's model) lists the prompt sets, the sampler and
the metrics with their settings; any key can be overridden, e.g. ``suite.prompt_sets.captions.n=50``. Images come from
the cache, so a second evaluation generates nothing; ``eval.json`` is rewritten only when its inputs changed
(``force=true`` recomputes). The library: :mod:`eval.evaluation`.
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
