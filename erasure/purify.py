"""Concept purification (paper Fig. 1b, Fig. 10): DDIM-invert a real image under the erased model, then
regenerate it with DDIM from the inverted latent under the same model and condition.

    python -m erasure.purify run=<run folder> image=<file or folder> prompt="<condition, may be empty>"
                             [steps=] [guidance=1.0] [regen_guidance=] [out=<run>/purify] [base=false]
                             [device=auto] [batch_size=16]

- ``run=``: a folder written by ``erasure.train`` (``config.yaml`` + ``delta.safetensors``); the base model is
  loaded from its ``model`` config and the delta applied (refused if the base fingerprint differs).
  ``base=true`` uses the bare base model instead: the control (plain DDIM reconstruction, no erasure).
- ``image=``: one image, or a folder of them (png, jpg, jpeg, webp, bmp). Images whose size is not the model's
  resolution are centre-cropped to a square and resized to it (a log line says so).
- ``prompt=``: the condition of both the inversion and the regeneration. Empty (the default) means the null
  text, the paper's "null token" inversion; the erased concept's text (e.g. "nudity", "a circle") is the
  paper's "concept-related token" inversion.
- ``steps=``: DDIM steps of each direction; default the model config's ``sample_steps``, else 35 (paper: T = 35).
- ``guidance=``: classifier-free guidance of the inversion. Default 1.0, i.e. no CFG: only the conditional noise
  prediction is used, which keeps DDIM inversion close to invertible (CFG > 1 makes the inverted latent drift
  away from the image). ``regen_guidance=`` sets the regeneration's guidance (default: the same as ``guidance``).
  With an empty prompt the condition equals the null text and guidance has no effect.

Writes into ``out=`` (default ``<run>/purify/``), atomically: ``<name>_before.png`` (the input at the model's
resolution), ``<name>_after_<prompt>[_base].png`` (the purified image) and ``grid_<prompt>[_base].png``
(one row per image: before | after). Prints one JSON line with the written paths.

The work is done by :mod:`erasure.allbutone.purify` (from Python: ``purify_images``, ``purify_latents``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .allbutone.purify import DEFAULT_STEPS, fit_to_resolution, purify_images
from .cli import parse_options, setup_logging
from .delta import check_run_folder, load_run
from . import schema
from .errors import UserError, exit_on_user_error
from .images import grid, save_png

log = logging.getLogger("erasure.purify")
USAGE = ('usage: python -m erasure.purify run=<run folder> image=<file or folder> prompt="<condition, may be empty>" '
         '[steps=] [guidance=1.0] [regen_guidance=] [out=] [base=false] [device=auto] [batch_size=16]')
OPTIONS = {"run", "image", "prompt", "steps", "guidance", "regen_guidance", "out", "base", "device", "batch_size"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------- command line
def find_images(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserError(f"folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}): pass an image or a folder of images")
        return found
    raise UserError(f"image '{path}' does not exist: pass image=<an image file or a folder of images>")


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image '{path}' ({type(exc).__name__}): pass a PNG/JPEG/WebP/BMP file") from None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "null"


def _names(paths: list[Path]) -> list[str]:
    names, seen = [], set()
    for p in paths:
        name = p.stem if p.stem not in seen else f"{p.stem}_{p.suffix.lstrip('.').lower()}"
        seen.add(name)
        names.append(name)
    return names


def _flag(value) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise UserError(f"base= takes true or false, got '{value}'")


def _number(args, key: str, kind, default):
    value = args.get(key)
    if value is None or value == "":
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}= takes a number, got '{value}'") from None
    if key in ("steps", "batch_size") and number < 1:
        raise UserError(f"{key}= must be at least 1, got {number}")
    return number


@dataclasses.dataclass
class PurifyOptions:
    """The numbers ``erasure.purify`` takes; each key's range comes from :mod:`erasure.schema` (checked before the
    run folder's model loads)."""

    steps: int = dataclasses.field(default=DEFAULT_STEPS, metadata={"rule": schema.at_least(1)})  # DDIM steps each way
    guidance: float = 1.0  # classifier-free guidance of the inversion
    regen_guidance: float = 1.0  # and of the regeneration
    batch_size: int = 16
    device: str = "auto"


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    args = parse_options(argv, OPTIONS, USAGE, lambda a: "run" in a and "image" in a)
    base = _flag(args.get("base", False))
    prompt = "" if args.get("prompt") is None else str(args.get("prompt"))
    steps = _number(args, "steps", int, None)  # None: the run's model's sample_steps
    guidance = _number(args, "guidance", float, 1.0)
    regen_guidance = _number(args, "regen_guidance", float, guidance)
    batch_size = _number(args, "batch_size", int, 16)
    schema.check(PurifyOptions(DEFAULT_STEPS if steps is None else steps, guidance, regen_guidance, batch_size,
                               str(args.get("device", "auto"))), "purify")  # the numbers first, then the files
    paths = find_images(args.image)
    cfg = check_run_folder(args.run, base)
    if steps is None:
        steps = int(cfg.model.get("sample_steps") or DEFAULT_STEPS)
    pictures = [read_image(p) for p in paths]

    _, models = load_run(args.run, str(args.get("device", "auto")), base)
    before = np.stack([np.asarray(fit_to_resolution(im, models.resolution, str(p))) for im, p in zip(pictures, paths)])
    log.info("purifying %d image(s) with the %s model: condition %r, %d DDIM steps each way, guidance %.2f "
             "(inversion) / %.2f (regeneration)", len(before), "base" if base else "erased", prompt, steps, guidance,
             regen_guidance)
    after = purify_images(models, before, prompt, steps, guidance, regen_guidance, batch_size)

    out = Path(args.get("out") or Path(args.run) / "purify")
    tag = slug(prompt) + ("_base" if base else "")
    written: dict = {"before": [], "after": []}
    rows = []
    for name, b, a in zip(_names(paths), before, after):
        im_b, im_a = Image.fromarray(b), Image.fromarray(a)
        written["before"].append(str(save_png(im_b, out / f"{name}_before.png")))
        written["after"].append(str(save_png(im_a, out / f"{name}_after_{tag}.png")))
        rows.append([im_b, im_a])
    label = "base reconstruction" if base else "purified"
    written["grid"] = str(save_png(grid(rows, col_labels=["input", label]), out / f"grid_{tag}.png"))
    summary = dict(out=str(out), model="base" if base else "erased", prompt=prompt, steps=steps, guidance=guidance,
                   regen_guidance=regen_guidance, resolution=models.resolution, **written)
    log.info("wrote %d before/after pair(s) and %s", len(rows), written["grid"])
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
