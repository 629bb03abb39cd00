"""The paper's figures from finished runs: ``python -m eval.figures [runs=outputs/table1/runs] [sweep=<folder>] [out=outputs/figures]``.

``timelines.png`` (Fig. 2, 5, 11-14), ``erasure_curve.png`` (Fig. 4, from each run's probe.jsonl) and ``lambda.png``
(Fig. 6, 9, from a sweep folder); a figure whose inputs are missing is skipped, saying why (:mod:`eval.plots`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from erasure.cli import setup_logging
from erasure.errors import UserError, exit_on_user_error

from .plots import figures


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    if set(opts) - {"runs", "sweep", "out"} or any("=" not in a for a in argv):
        raise UserError("usage: python -m eval.figures [runs=<folder of method runs>] [sweep=<multirun folder>] [out=<folder>]")
    return figures(Path(opts.get("runs", "outputs/table1/runs")), Path(opts["sweep"]) if "sweep" in opts else None,
                   Path(opts.get("out", "outputs/figures")))


if __name__ == "__main__":
    main(sys.argv[1:])
