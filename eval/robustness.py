"""Robustness (issue 16): ``python -m eval.robustness [model=toyworld] [concept=circle] [seeds=[0,1,2]] [key=value ...]``.

The experiment ``conf/experiment/robustness.yaml``: every method of the Table-1 experiment (trained or reused, per
seed) and the base model attacked with every registered attack under the threat model ``robustness``
(:func:`eval.attacking.experiment`). ``make robustness`` drives it, ``make robustness-smoke`` runs it at tiny sizes.
"""
from __future__ import annotations

import sys

from erasure.cli import check_group_overrides, setup_logging
from erasure.errors import exit_on_user_error

from .attacking import experiment
from .config import compose


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    check_group_overrides(argv)
    result = experiment(compose("experiment/robustness", argv), command=" ".join(["python -m eval.robustness", *argv]))
    print(result["markdown"], end="")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
