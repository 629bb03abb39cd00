"""Evidence across concepts (issue 19): ``python -m eval.concepts [concepts=[...]] [methods=[...]] [out=...]``.

The experiment ``conf/experiment/concepts.yaml`` (:func:`eval.experiment.run_concepts`): every registered method at its
default on every concept of the toy world, whose configs one rule writes (``conf/concept/toy/``,
:mod:`erasure.toyworld.concepts`; checked to be up to date before anything trains), one seed each; each run's own probe
(``summary.json``) gives the numbers that :mod:`eval.concept_tables` tabulates and plots into ``<out>/concepts.md``.
``make concepts`` drives it, ``make concepts-smoke`` runs it at tiny sizes. Exits 1 when a run is missing.
"""
from __future__ import annotations

import sys

from erasure.cli import setup_logging
from erasure.errors import exit_on_user_error

from .config import compose
from .experiment import run_concepts


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    result = run_concepts(compose("experiment/concepts", argv), command=" ".join(["python -m eval.concepts", *argv]))
    print(result["markdown"], end="")
    if result["meta"]["failed"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
