"""Generate (or resume) one prompt set's images into the evaluation cache:
``python -m eval.generate run=<run folder> set=<prompt set> [base=true] [suite=...] [key=value ...]``.

Sharded: ``accelerate launch --multi_gpu --num_processes N -m eval.generate ...`` (or ``torchrun --nproc_per_node N``)
writes the same files, byte for byte, as one process (:mod:`eval.cache`).
"""
from __future__ import annotations

import sys

from erasure.cli import setup_logging
from erasure.errors import UserError, exit_on_user_error

from .config import compose
from .evaluation import Evaluation


@exit_on_user_error
def main(argv: list[str]) -> None:
    setup_logging()
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if "set" not in args or "run" not in args:
        raise UserError("usage: python -m eval.generate run=<run folder> set=<prompt set> [base=true] [key=value ...]")
    name = args.pop("set")
    if str(args.pop("base", "false")).lower() == "true":
        args["system"] = "base"
    Evaluation(compose("run", [f"{k}={v}" for k, v in args.items()])).images(name)


if __name__ == "__main__":
    main(sys.argv[1:])
