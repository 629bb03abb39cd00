"""Table 1 from finished evaluations: ``python -m eval.report <folders or eval.json files…> [--out DIR]``.

Writes ``table1.{md,csv,tex}`` (and ``nudenet_classes.{md,csv}`` when a row has NudeNet's per-class counts): base model
first, the methods in the given order, the reference row last; only the methods are ranked (``--rank-oracles`` ranks
every row). The library: :func:`eval.experiment.report`.
"""
from __future__ import annotations

import argparse
import sys

from erasure.cli import setup_logging
from erasure.errors import exit_on_user_error

from .experiment import report


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    ap = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="folders holding eval.json (or eval.json files)")
    ap.add_argument("--out", default="outputs/table1", help="report folder (default: outputs/table1)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--rank-oracles", action="store_true", help="rank base model and reference rows too")
    ap.add_argument("--logger", choices=["none", "wandb"], default="none")
    ap.add_argument("--wandb-project", default="concept-erasure")
    args = ap.parse_args(argv)
    result = report(args.folders, args.out, args.title, args.rank_oracles, args.logger, args.wandb_project)
    print(result["markdown"], end="")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
