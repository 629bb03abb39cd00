"""MACE's training data for the toy world: renders of a shape and their exact masks, in the folder layout MACE's
official data preparation writes (Shilin-LU/MACE@057e7a6, ``data_preparation.py``: images of a concept in
``<out>/<concept>/``, their masks in ``<out>/<concept> mask/``; ``src/dataset.py`` l.115-136 reads that layout).

    python -m erasure.toyworld.mace_data [shape=circle] [n=8] [seed=0] [out=data/mace/toyworld]

On Stable Diffusion the official code generates 8 images per concept with the base model (``inference.py`` l.18-32)
and segments them with Grounded-SAM (``data_preparation.py`` l.33-58). Here the world's renderer draws ``n`` scenes of
the shape (every colour, background, size and place drawn from ``seed``: :func:`erasure.toyworld.world.sample`) and
:func:`erasure.toyworld.world.mask` gives each one's exact mask, so no segmentation model is needed. The shipped
folder ``data/mace/toyworld`` was written by the defaults above (``data/mace/README.md``).
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
USAGE = "usage: python -m erasure.toyworld.mace_data [shape=circle] [n=8] [seed=0] [out=data/mace/toyworld]"
OPTIONS = {"shape", "n", "seed", "out"}


def write_concept_data(out: str | Path, shape: str = "circle", n: int = 8, seed: int = 0) -> dict:
    """Render ``n`` scenes of ``shape`` into ``<out>/<shape>/<i>.png`` and their masks into
    ``<out>/<shape> mask/<i>_mask.png`` (8-bit grey, 0 or 255). Returns what was written."""
    if shape not in world.SHAPES:
        raise UserError(f"unknown shape '{shape}': choose one of {', '.join(world.SHAPES)}")
    if n < 1:
        raise UserError(f"n must be at least 1, got {n}")
    out = Path(out)
    images_dir, masks_dir = out / shape, out / f"{shape} mask"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    scenes, images, _ = world.sample(n, seed, with_captions=False, shape=shape)
    for i, (scene, image) in enumerate(zip(scenes, images)):
        image.save(images_dir / f"{i}.png")
        world.mask(scene).save(masks_dir / f"{i}_mask.png")
    log.info("wrote %d renders of '%s' and their masks to %s", n, shape, out)
    return {"out": str(out), "shape": shape, "n": n, "seed": seed,
            "scenes": [{"color": s.color, "background": s.background, "extent": round(s.extent, 3)} for s in scenes]}


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
    result = write_concept_data(out, str(args.get("shape", "circle")), n, seed)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
