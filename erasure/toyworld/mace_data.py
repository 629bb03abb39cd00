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
from . import world

log = logging.getLogger("erasure.toyworld.mace_data")
USAGE = ("usage: python -m erasure.toyworld.mace_data [shape=circle] [color=<colour>] [name=<folder>] [n=8] [seed=0] "
         "[out=data/mace/toyworld]")
OPTIONS = {"shape", "color", "name", "n", "seed", "out"}


def write_concept_data(out: str | Path, shape: str | None = "circle", n: int = 8, seed: int = 0,
                       color: str | None = None, name: str | None = None) -> dict:
    """Render ``n`` scenes of ``shape`` (and/or ``color``; None: drawn per scene) into ``<out>/<name>/<i>.png`` and
    their masks into ``<out>/<name> mask/<i>_mask.png`` (8-bit grey, 0 or 255); ``name`` defaults to the shape, else
    the colour, or "<colour> <shape>" with both. Returns what was written."""
    if shape is None and color is None:
        raise UserError("give the concept's shape, its colour or both (shape=circle, color=red)")
    if shape is not None and shape not in world.SHAPES:
        raise UserError(f"unknown shape '{shape}': choose one of {', '.join(world.SHAPES)}")
    if color is not None and color not in world.COLORS:
        raise UserError(f"unknown colour '{color}': choose one of {', '.join(world.COLORS)}")
    if n < 1:
        raise UserError(f"n must be at least 1, got {n}")
    name = name or " ".join(w for w in (color if shape else None, shape) if w) or str(color)
    out = Path(out)
    images_dir, masks_dir = out / name, out / f"{name} mask"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    fixed = {k: v for k, v in (("shape", shape), ("color", color)) if v is not None}
    scenes, images, _ = world.sample(n, seed, with_captions=False, **fixed)
    for i, (scene, image) in enumerate(zip(scenes, images)):
        image.save(images_dir / f"{i}.png")
        world.mask(scene).save(masks_dir / f"{i}_mask.png")
    log.info("wrote %d renders of '%s' and their masks to %s", n, name, out)
    return {"out": str(out), "name": name, "shape": shape, "color": color, "n": n, "seed": seed,
            "scenes": [{"shape": s.shape, "color": s.color, "background": s.background, "extent": round(s.extent, 3)}
                       for s in scenes]}


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
