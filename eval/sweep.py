"""Summarise a sweep: ``python -m eval.sweep <multirun folder> [evaluate=true] [wandb=true] [x=lambda] [eval overrides]``.

After ``python -m erasure.train -m lambda=0,0.5,1,1.5,5 trainer.seed=0,1,2`` this reads every finished run below
the folder (``config.yaml`` + ``summary.json`` [+ ``eval.json``]), finds the config keys the sweep varied,
averages the replicate axis (``trainer.seed``) and writes into the folder:

* ``sweep.md`` / ``sweep.csv`` / ``sweep.tex`` / ``sweep.json``: one row per setting, mean and std over seeds of the
  runs' numbers that the metric registry shows in a sweep: the toy world's probe (``concept_rate_after``,
  ``ssim_preserved``, ``preserved_accuracy_after``, ...), the evaluation suite's metrics when ``eval.json`` exists
  (``evaluate=true`` makes it first, cached; the other key=value arguments are its overrides), and the training time;
* ``sweep.png``: concept rate and SSIM to the base model against the swept key (the paper's Fig. 6/9 for λ),
  seeds as error bars, one line per other varied setting (e.g. per method).

``wandb=true`` also logs the table (a W&B Table) and the plot (an image and a line chart) to one W&B run in the
sweep's group (offline without an API key). The experiment: ``conf/experiment/sweep.yaml``, :func:`eval.experiment.sweep`.
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
