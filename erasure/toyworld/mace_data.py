"""MACE's training data for the toy world: renders of a shape and their exact masks, in the folder layout MACE's
official data preparation writes (Shilin-LU/MACE@057e7a6, ``data_preparation.py``: images of a concept in
``<out>/<concept>/``, their masks in ``<out>/<concept> mask/``; ``src/dataset.py`` l.115-136 reads that layout).

    python -m erasure.toyworld.mace_data [shape=circle] [color=<colour>] [name=<folder>] [n=8] [seed=0]
                                         [out=data/mace/toyworld]

On Stable Diffusion the official code generates 8 images per concept with the base model (``inference.py`` l.18-32)
and segments them with Grounded-SAM (``data_preparation.py`` l.33-58). Here the world's renderer draws ``n`` scenes of
the shape (every colour, background, size and place drawn from ``seed``: :func:`erasure.toyworld.world.sample`) and
:func:`erasure.toyworld.world.mask` gives each one's exact mask, so no segmentation model is needed. A colour concept
(``color=red``, no ``shape=``): ``n`` scenes of that colour, every shape, the mask again the object's pixels. The
concept's folder is named ``name=``, else the shape, else the colour (``shape=`` and ``color=`` together: "red
square"). The shipped folder ``data/mace/toyworld`` was written by the commands in ``data/mace/README.md``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..cli import parse_options, setup_logging
from ..config import CONF_DIR
from ..errors import UserError, exit_on_user_error
from .world import write_concept_data

log = logging.getLogger("erasure.toyworld.mace_data")
USAGE = ("usage: python -m erasure.toyworld.mace_data [shape=circle] [color=<colour>] [name=<folder>] [n=8] [seed=0] "
         "[out=data/mace/toyworld]")
OPTIONS = {"shape", "color", "name", "n", "seed", "out"}


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    args = parse_options(argv, OPTIONS, USAGE, lambda a: True)
    try:
        n, seed = int(args.get("n", 8)), int(args.get("seed", 0))
    except (TypeError, ValueError):
        raise UserError(f"n= and seed= take integers; {USAGE}") from None
    out = Path(str(args.get("out", "data/mace/toyworld")))
    if not out.is_absolute():
        out = CONF_DIR.parent / out  # relative to the repository root, where the concept yaml looks
    color = args.get("color")
    shape = args.get("shape", None if color else "circle")  # a colour alone: every shape
    result = write_concept_data(out, str(shape) if shape else None, n, seed, str(color) if color else None,
                                str(args["name"]) if args.get("name") else None)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
