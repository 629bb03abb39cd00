"""Summarise a sweep: ``python -m eval.sweep <multirun folder> [evaluate=true] [wandb=true] [x=lambda] [eval overrides]``.

After ``python -m erasure.train -m lambda=0,0.5,1,1.5,5 trainer.seed=0,1,2``: ``sweep.{md,csv,tex,json}`` (one row per
setting of the varied keys, mean ± std over seeds) and ``sweep.png`` in the folder; ``evaluate=true`` evaluates every
run first (the other key=value arguments are its overrides), ``wandb=true`` logs table and plot to the sweep's W&B
group. The experiment ``conf/experiment/sweep.yaml`` (:func:`eval.experiment.sweep`).
"""
from __future__ import annotations

import sys

from erasure.cli import setup_logging
from erasure.errors import UserError, exit_on_user_error

from .config import compose
from .experiment import sweep

OWN = ("evaluate", "wandb", "x")  # keys of conf/experiment/sweep.yaml; any other key=value is an evaluation override


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    folders = [a for a in argv if "=" not in a]
    if len(folders) != 1:
        raise UserError("usage: python -m eval.sweep <multirun folder> [evaluate=true] [wandb=true] [x=<key>] "
                        "[evaluation overrides, e.g. suite=toyworld]")
    own = [a for a in argv if a.split("=", 1)[0] in OWN]
    cfg = compose("experiment/sweep", own)
    cfg.folder = folders[0]
    cfg.evaluation = [a for a in argv if "=" in a and a not in own]
    result = sweep(cfg)
    print(result["markdown"], end="", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
