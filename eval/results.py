"""The evidence (issue 9): ``python -m eval.results [model=toyworld] [concept=circle] [seeds=[0,1,2]] [out=...]``.

The experiment ``conf/experiment/results.yaml``, Table 1's over seeds with a λ sweep, on the same orchestration
(:func:`eval.experiment.run`): ``<out>/results.md`` with Table 1 over seeds, ``lambda/sweep.*`` and ``frontier.*``.
``make results`` drives it, ``make results-smoke`` runs it at tiny sizes; resumable.
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
