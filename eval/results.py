"""The evidence (issue 9): ``python -m eval.results [model=toyworld] [concept=circle] [seeds=[0,1,2]] [out=...]``.

The experiment ``conf/experiment/results.yaml`` (Table 1's, over seeds, with a λ sweep), on the same orchestration
as Table 1 (:func:`eval.experiment.run`); ``make results`` drives it, ``make results-smoke`` runs it at tiny sizes.
Each step is resumable (a finished run folder of the current base model is reused, evaluations come from the cache):

1. training, ``jobs`` subprocesses at a time, longest first: every method at its default config for every seed
   (``<out>/table1/seed<s>/runs/<method>``, with its erasure curve: ``trainer.probe_points``), and the λ sweep of
   ``lambda_method`` for every seed (``<out>/lambda/lambda<λ>_seed<s>``);
2. each seed's Table 1 with the evaluation suite (same prompts and seeds for every method and seed), ``jobs`` seeds
   at a time in worker processes;
3. the summaries in ``<out>``: ``table1.{md,csv,tex,json}`` (mean ± std over seeds), ``lambda/sweep.*``,
   ``frontier.{png,csv,json}`` (each method's concept rate against SSIM to the base model at its erasure curve's
   iterations, seeds as error bars) and ``results.md`` (all of it, with date and machine).
"""
from __future__ import annotations

import sys

from erasure.cli import check_group_overrides, setup_logging
from erasure.errors import exit_on_user_error

from .config import compose
from .experiment import run


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    check_group_overrides(argv)  # model=, concept=, logger=: one sentence for a typo
    result = run(compose("experiment/results", argv), command=" ".join(["python -m eval.results", *argv]))
    print(result["markdown"], end="")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
