"""The evaluation's image cache: one cached, seeded, batched generator for every metric, and cached Inception features.

Images live in ``<cache>/<model key>/<sampler key>/<case>_s<seed>_<prompt hash>.png``:

- model key: the base UNet's fingerprint (``Models.fingerprint``), plus ``+<sha256 of the delta file>``
  for an erased model. Base-model images are therefore made once and shared by every method's SSIM.
- sampler key: scheduler class and config, steps and resolution (hashed; ``sampler.json`` beside the images).
- file name: case number and seed, plus a hash of the prompt and its guidance.

Every row gets its own seeded ``torch.Generator`` (its latent does not depend on the batch it falls in),
rows are batched, and each PNG is written atomically (:func:`erasure.images.save_png`): a killed run
leaves complete files only and the next run generates just the missing ones.

Sharded (``accelerate launch --multi_gpu --num_processes N -m eval.generate ...``, or torchrun): the work is split
by whole batches (batch k goes to process k mod N, each batch formed exactly as one process forms it), so N processes
write the same files, byte for byte, as one process; every process waits for the others before returning.
Ranks and the barrier come from ``accelerate.PartialState``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from erasure.io import write_text_atomic
from erasure.errors import UserError
from erasure.generation import Sampler, default_sampler
from erasure.generation import generate as generate_images
from erasure.images import save_png

from .prompts import PromptRow

log = logging.getLogger(__name__)


def sha256_file(path: str | Path, digits: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:digits]


def model_key(base_fingerprint: str, delta_path: str | Path | None = None) -> str:
    """Cache key of a model: base fingerprint, plus the delta file's sha256 for an erased model."""
    return base_fingerprint if delta_path is None else f"{base_fingerprint}+{sha256_file(delta_path)}"


def make_sampler(models, model_cfg, sampler_cfg) -> Sampler:
    """Sampler settings: the suite's values where set, else the model config's (sample_steps, guidance)."""
    return default_sampler(models, model_cfg, steps=sampler_cfg.get("steps"), guidance=sampler_cfg.get("guidance"),
                           resolution=sampler_cfg.get("resolution"), batch_size=int(sampler_cfg.get("batch_size", 8)))


def image_name(row: PromptRow, guidance: float) -> str:
    h = hashlib.sha1(f"{row.prompt}\x00{guidance:g}".encode()).hexdigest()[:10]
    return f"{row.case:06d}_s{row.seed}_{h}.png"


def image_paths(folder: Path, rows: list[PromptRow], sampler: Sampler) -> list[Path]:
    return [folder / image_name(r, r.guidance if r.guidance is not None else sampler.guidance) for r in rows]


def cache_folder(cache_dir: str | Path, key: str, sampler: Sampler) -> Path:
    folder = Path(cache_dir) / key / sampler.key
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "sampler.json"
    if not meta.exists():
        # atomic: the ranks of a sharded launch may all write it (the same content) at once
        write_text_atomic(meta, json.dumps(sampler.describe(), indent=2, sort_keys=True, default=str) + "\n")
    return folder


def launch_state():
    """accelerate's view of the launch (process index, number of processes, barrier); one process without a launcher.
    On a machine without CUDA the launched processes are CPU processes (accelerate treats them as such only when asked)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def batches(todo: list, sampler: "Sampler") -> list[tuple[float, list]]:
    """The batches one process would run, in order: rows grouped by guidance, then cut to the batch size."""
    by_guidance: dict[float, list] = {}
    for r, p in todo:
        by_guidance.setdefault(r.guidance if r.guidance is not None else sampler.guidance, []).append((r, p))
    return [(g, items[i:i + sampler.batch_size]) for g, items in by_guidance.items()
            for i in range(0, len(items), sampler.batch_size)]


def generate(models, rows: list[PromptRow], folder: str | Path, sampler: Sampler, desc: str = "generating",
             params: dict | None = None) -> dict:
    """Make the images of ``rows`` that ``folder`` lacks, with ``params`` (an erased model's weights) swapped into the
    UNet if given; returns {"generated": k, "cached": m, "paths": [...]}. Each batch is one call of
    :func:`erasure.generation.generate`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = image_paths(folder, rows, sampler)
    todo = [(r, p) for r, p in zip(rows, paths) if not p.is_file()]
    corrupt = [(r, p) for r, p in zip(rows, paths) if p.is_file() and not readable_png(p)]
    if corrupt:  # written outside the project's atomic writes (a copy cut short, a full disk): made again
        log.warning("%d cached image(s) in %s do not decode (e.g. %s): generating them again", len(corrupt), folder,
                    corrupt[0][1].name)
        todo += corrupt
    if todo:
        state = launch_state()
        rank, world = state.process_index, state.num_processes
        state.wait_for_everyone()  # every process has listed the missing files before any is written
        mine = batches(todo, sampler)[rank::world]  # whole batches, so each image sees the batch it would alone
        start = time.perf_counter()
        with tqdm(total=sum(len(c) for _, c in mine), desc=desc if world == 1 else f"{desc} [{rank + 1}/{world}]",
                  unit="img", dynamic_ncols=True, disable=None) as bar:
            for guidance, chunk in mine:
                images = generate_images(models, [r.prompt for r, _ in chunk], sampler, seeds=[r.seed for r, _ in chunk],
                                         guidance=guidance, params=params)
                for image, (_, p) in zip(images, chunk):
                    save_png(Image.fromarray(image), p)
                bar.update(len(chunk))
        state.wait_for_everyone()
        missing = [p for _, p in todo if not p.is_file()]
        if missing:
            raise UserError(f"{len(missing)} images are missing after generation (e.g. {missing[0]}): a process "
                            "of the launch failed; rerun the same command to make only the missing ones")
        share = "" if world == 1 else f" (process {rank + 1}/{world} made {sum(len(c) for _, c in mine)})"
        log.info("%s: %d images in %.1f s (%d were cached)%s -> %s", desc, len(todo), time.perf_counter() - start,
                 len(rows) - len(todo), share, folder)
    return dict(generated=len(todo), cached=len(rows) - len(todo), paths=paths)


def readable_png(path: Path) -> bool:
    """Whether the file is a complete PNG (PIL's verify: every chunk's CRC, the end marker)."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 -- PIL raises several kinds (OSError, SyntaxError, struct.error) for bad files
        return False


def load_images(paths: list[Path]) -> np.ndarray:
    """uint8 N×H×W×3 array of PNG files."""
    if not paths:
        raise UserError("no images to load")
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def open_rgb(path: Path):
    with Image.open(path) as im:
        return im.convert("RGB")


def group_by_size(paths: list[Path]) -> dict:
    """{(width, height): [indices of the files of that size]}."""
    groups: dict = {}
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            groups.setdefault(im.size, []).append(i)
    return groups


def inception_features(paths: list[Path], cache_dir: Path):
    """FID Inception features of image files, cached under ``<cache>/features/`` by the files' names, sizes and
    modification times (safetensors: loading never executes code)."""
    import torch
    from safetensors.torch import load_file, save_file

    from erasure.io import atomic_write
    from erasure.measures.fid import INCEPTION_SHA1, inception_features as features

    h = hashlib.sha256(INCEPTION_SHA1.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache = Path(cache_dir) / "features" / f"{h.hexdigest()[:20]}.safetensors"
    if cache.is_file():
        return load_file(str(cache))["features"]
    out = None
    for idx in group_by_size(paths).values():
        stack = torch.from_numpy(np.stack([np.asarray(open_rgb(paths[i])) for i in idx])).permute(0, 3, 1, 2)
        f = features(stack.contiguous())
        out = torch.zeros(len(paths), f.shape[1]) if out is None else out
        out[idx] = f
    atomic_write(cache, lambda tmp: save_file({"features": out.contiguous()}, str(tmp)))
    return out
