"""Table 1 end to end: ``python -m eval.table1 [model=toyworld] [concept=circle] [out=outputs/table1] [key=value ...]``.

The experiment ``conf/experiment/table1.yaml`` (:func:`eval.experiment.run`): every registered method (or
``methods=[...]``) trained, or its finished run in ``<out>/runs/<method>`` reused; base model, runs and reference row
evaluated; ``table1.{md,csv,tex}`` written. ``make table1`` / ``make table1-smoke`` drive it.
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
    result = run(compose("experiment/table1", argv), command=" ".join(["python -m eval.table1", *argv]))
    print(result["markdown"], end="")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
