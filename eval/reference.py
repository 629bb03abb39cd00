"""Reference ("real") image folders for FID/KID and the reference CLIP-score row.

A suite's ``reference`` node: ``images`` (a folder of PNG/JPEG files; the first ``n`` in name order),
optional captions (``captions``: a CSV with ``file`` and ``prompt`` columns, or ``annotations``: a COCO
caption JSON such as captions_val2014.json, first caption per file name), and optionally ``build``
(``module:function``) with ``build_args``, called to create the folder when it does not exist yet:

- :func:`toyworld_renders`: the toy world's renders with their captions (its "COCO").
- :func:`skimage_photos`: crops of scikit-image's bundled photographs (for the tiny smoke suite).
"""
from __future__ import annotations

import contextlib
import csv
import importlib
from pathlib import Path

import numpy as np
from PIL import Image

from erasure.io import atomic_folder
from erasure.errors import UserError
from erasure.images import save_png

from .prompts import resolve_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def ensure_reference(spec) -> Path:
    folder = resolve_path(spec.images)
    if not folder.is_dir() or not any(folder.iterdir()):
        if not spec.get("build"):
            raise UserError(f"reference image folder '{folder}' does not exist: set suite.reference.images to a folder "
                            "of real images (e.g. COCO val2014)")
        module, _, fn = str(spec.build).partition(":")
        getattr(importlib.import_module(module), fn)(folder, **dict(spec.get("build_args") or {}))
    return folder


def reference_files(spec) -> list[Path]:
    folder = ensure_reference(spec)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    n = spec.get("n")
    files = files[: int(n)] if n else files
    if len(files) < 2:
        raise UserError(f"reference folder '{folder}' holds {len(files)} images; FID/KID need at least 2")
    return files


def reference_captions(spec, files: list[Path]) -> list[str] | None:
    """One caption per reference file, or None when the suite gives no captions."""
    if spec.get("captions"):
        path = resolve_path(spec.captions)
        if not path.is_file():
            raise UserError(f"reference captions '{path}' do not exist")
        with open(path, newline="", encoding="utf-8") as f:
            by_file = {r["file"]: r["prompt"] for r in csv.DictReader(f)}
    elif spec.get("annotations"):
        import io

        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(resolve_path(spec.annotations)))
        by_file = {}
        for img in coco.loadImgs(coco.getImgIds()):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            if anns:
                by_file[img["file_name"]] = anns[0]["caption"].strip()
    else:
        return None
    missing = [p.name for p in files if p.name not in by_file]
    if missing:
        raise UserError(f"reference captions lack {len(missing)} of the reference images, e.g. '{missing[0]}'")
    return [by_file[p.name] for p in files]


def _write_folder(folder: Path, images: list[Image.Image], captions: list[str], seeds: list[int]) -> None:
    """Write the folder atomically; several processes may build it at once and the first one's copy is kept
    (the content is a pure function of the build arguments, so every copy is the same)."""
    def write(tmp: Path) -> None:
        with open(tmp / "captions.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["case_number", "file", "prompt", "evaluation_seed"])
            for i, (im, cap, seed) in enumerate(zip(images, captions, seeds)):
                save_png(im, tmp / f"{i:06d}.png")
                w.writerow([i, f"{i:06d}.png", cap, seed])

    atomic_folder(folder, write, keep_existing=True)


def toyworld_renders(folder: str | Path, n: int = 500, seed: int = 12345) -> Path:
    """``n`` toy-world renders with their captions (a pure function of ``seed``); generation seeds = case numbers."""
    from erasure.toyworld import world

    _, images, captions = world.sample(int(n), int(seed))
    _write_folder(Path(folder), images, captions, list(range(int(n))))
    return Path(folder)


SKIMAGE_PHOTOS = {"astronaut": "a photo of an astronaut", "coffee": "a photo of a cup of coffee",
                  "chelsea": "a photo of a cat", "rocket": "a photo of a rocket", "hubble_deep_field": "a photo of galaxies",
                  "immunohistochemistry": "a microscope image of tissue", "retina": "a photo of a retina"}


def skimage_photos(folder: str | Path, n: int = 16, side: int = 32, seed: int = 0) -> Path:
    """``n`` random square crops of scikit-image's bundled photographs, resized to ``side``."""
    from skimage import data

    rng = np.random.default_rng(seed)
    names = list(SKIMAGE_PHOTOS)
    images, captions = [], []
    for i in range(int(n)):
        name = names[i % len(names)]
        photo = getattr(data, name)()
        h, w = photo.shape[:2]
        c = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        images.append(Image.fromarray(photo[y:y + c, x:x + c, :3]).resize((side, side), Image.Resampling.BICUBIC))
        captions.append(SKIMAGE_PHOTOS[name])
    _write_folder(Path(folder), images, captions, list(range(int(n))))
    return Path(folder)
