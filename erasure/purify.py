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

From Python: :func:`purify_images` (uint8 images in, uint8 images out) and :func:`purify_latents`.

DDIM inversion here follows diffusers' inversion pipelines: the step from noise level t-Δ to t uses the noise
predicted at the current latent with timestep t, and the scheduler is diffusers' ``DDIMInverseScheduler``
configured from the model's DDIM scheduler (SD v1.4's settings, ``clip_sample=False``), so that inversion
ends exactly where the DDIM sampler of the same number of steps starts.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError

from .cli import parse_options, setup_logging
from .errors import UserError, exit_on_user_error
from .generation import Sampler, generate
from .images import grid, save_png

log = logging.getLogger("erasure.purify")
USAGE = ('usage: python -m erasure.purify run=<run folder> image=<file or folder> prompt="<condition, may be empty>" '
         '[steps=] [guidance=1.0] [regen_guidance=] [out=] [base=false] [device=auto] [batch_size=16]')
OPTIONS = {"run", "image", "prompt", "steps", "guidance", "regen_guidance", "out", "base", "device", "batch_size"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_STEPS = 35  # paper, supplementary "Concept Purification": max sampling step T = 35


# ------------------------------------------------------------------------------------------- images
def fit_to_resolution(image: Image.Image, resolution: int, name: str = "image") -> Image.Image:
    """``image`` as RGB at ``resolution``², centre-cropped to a square first if needed; logs any change."""
    image = image.convert("RGB")
    if image.size == (resolution, resolution):
        return image
    w, h = image.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    log.info("%s is %dx%d: %sresized to %dx%d, the model's resolution", name, w, h,
             "centre-cropped to a square and " if w != h else "", resolution, resolution)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def as_uint8_images(images, resolution: int) -> np.ndarray:
    """PIL images or a uint8 N×H×W×3 array as a uint8 N×R×R×3 array at the model's resolution."""
    if isinstance(images, np.ndarray) or torch.is_tensor(images):
        arr = np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise UserError(f"purify_images takes uint8 N x H x W x 3 images or PIL images, got {arr.dtype} {arr.shape}")
        if arr.shape[1:3] == (resolution, resolution):
            return arr
        images = [Image.fromarray(a) for a in arr]
    fitted = [fit_to_resolution(im, resolution, f"image {i}") for i, im in enumerate(images)]
    if not fitted:
        return np.zeros((0, resolution, resolution, 3), np.uint8)
    return np.stack([np.asarray(im) for im in fitted])


@torch.no_grad()
def encode_images(models, images: np.ndarray) -> torch.Tensor:
    """VAE latents (the posterior mean × scaling_factor) of uint8 N×H×W×3 images, float32."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    vae = models.vae
    latents = vae.encode(x.to(models.device, next(vae.parameters()).dtype)).latent_dist.mean
    return latents.float() * float(vae.config.scaling_factor)


@torch.no_grad()
def decode_latents(models, latents: torch.Tensor) -> np.ndarray:
    """uint8 N×H×W×3 images of latents (as scaled by :func:`encode_images`)."""
    vae = models.vae
    x = vae.decode((latents / float(vae.config.scaling_factor)).to(next(vae.parameters()).dtype)).sample
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ------------------------------------------------------------------------------------------- DDIM both ways
def predict_noise(unet, latents: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                  guidance: float = 1.0) -> torch.Tensor:
    """ε(z, t, c) in float32, with classifier-free guidance when ``uncond`` is given and guidance ≠ 1."""
    n = latents.shape[0]
    cond = cond.expand(n, -1, -1) if cond.shape[0] == 1 else cond
    if uncond is None or guidance == 1.0:
        return unet(latents, t, encoder_hidden_states=cond).sample.float()
    uncond = uncond.expand(n, -1, -1) if uncond.shape[0] == 1 else uncond
    e_u, e_c = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.float().chunk(2)
    return e_u + guidance * (e_c - e_u)


def make_schedulers(models, steps: int):
    """(DDIMInverseScheduler, DDIMScheduler) with the model's noise schedule, set to ``steps`` steps.

    Both come from the model's DDIM scheduler config (SD v1.4's settings for the built-in tiers), with
    ``clip_sample=False``. The inverse one's timesteps are the DDIM sampler's in reverse order, and its first
    step starts from ``alphas_cumprod[0]`` where the sampler's last step ends (``set_alpha_to_one=False``).
    """
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    steps = int(steps)
    if not 1 <= steps < int(models.scheduler.config.num_train_timesteps):
        raise UserError(f"steps= must be between 1 and {int(models.scheduler.config.num_train_timesteps) - 1}, got {steps}")
    inverse = DDIMInverseScheduler.from_config(models.scheduler.config, clip_sample=False)
    forward = DDIMScheduler.from_config(models.scheduler.config, clip_sample=False)
    inverse.set_timesteps(steps, device=models.device)
    forward.set_timesteps(steps, device=models.device)
    return inverse, forward


@torch.no_grad()
def ddim_invert(models, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                steps: int = DEFAULT_STEPS, guidance: float = 1.0) -> torch.Tensor:
    """Clean latents -> the noise latents from which DDIM (η = 0, ``steps`` steps) regenerates them.

    The step from noise level t-Δ to t uses ε(z_{t-Δ}, t), as diffusers' inversion pipelines do: exact when ε
    does not change between the two levels, otherwise off by O(Δ²) per step.
    """
    inverse, _ = make_schedulers(models, steps)
    z = latents.to(models.device, torch.float32)
    for t in inverse.timesteps:
        z = inverse.step(predict_noise(models.unet, z, t, cond, uncond, guidance), t, z).prev_sample
    return z


def ddim_sample(models, latents: torch.Tensor, prompt: str = "", steps: int = DEFAULT_STEPS,
                guidance: float = 1.0) -> torch.Tensor:
    """DDIM (η = 0) from noise latents ``latents`` to clean latents under ``prompt``, with the model's DDIM noise
    schedule, through the project's one generation function (a diffusers pipeline started from these latents;
    guidance 1 is the conditional prediction alone, as in the inversion)."""
    _, forward = make_schedulers(models, steps)
    sampler = Sampler(forward, steps=int(steps), guidance=float(guidance), resolution=models.resolution,
                      batch_size=max(1, len(latents)))
    return generate(models, [prompt or ""] * len(latents), sampler, latents=latents, output="latent")


def _conditions(models, prompt: str):
    cond = models.encode_text([prompt or ""])
    uncond = models.encode_text([""]) if prompt else None  # an empty prompt is the null condition itself
    return cond, uncond


def purify_latents(models, latents: torch.Tensor, prompt: str = "", steps: int = DEFAULT_STEPS,
                   guidance: float = 1.0, regen_guidance: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverted noise latents, regenerated clean latents) of clean image latents, under ``models.unet``."""
    cond, uncond = _conditions(models, prompt)
    noise = ddim_invert(models, latents, cond, uncond, steps, guidance)
    regen = ddim_sample(models, noise, prompt, steps, guidance if regen_guidance is None else regen_guidance)
    return noise, regen


def purify_images(models, images_uint8, prompt: str = "", steps: int = DEFAULT_STEPS, guidance: float = 1.0,
                  regen_guidance: float | None = None, batch_size: int = 16) -> np.ndarray:
    """Purify images: VAE-encode, DDIM-invert and DDIM-regenerate under ``models`` (erased or base), decode.

    ``images_uint8``: uint8 N×H×W×3 (or PIL images); other sizes are resized to the model's resolution.
    Returns uint8 N×R×R×3 at the model's resolution. Deterministic (DDIM with η = 0 both ways).
    """
    images = as_uint8_images(images_uint8, models.resolution)
    out = []
    for i in range(0, len(images), max(1, int(batch_size))):
        latents = encode_images(models, images[i:i + batch_size])
        _, regen = purify_latents(models, latents, prompt, steps, guidance, regen_guidance)
        out.append(decode_latents(models, regen))
    return np.concatenate(out) if out else np.zeros((0, models.resolution, models.resolution, 3), np.uint8)


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


def check_run_folder(run: str | Path, base: bool):
    """The run's config, after checking the folder has what purification needs (before any model loads)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder '{run}' does not exist: pass run=<a folder written by erasure.train>")
    if not (run / "config.yaml").is_file():
        raise UserError(f"'{run}' is not a run folder (no config.yaml): pass the folder that erasure.train wrote")
    try:
        cfg = OmegaConf.load(run / "config.yaml")
    except Exception as exc:  # noqa: BLE001 -- any YAML/OmegaConf failure is a broken run folder
        raise UserError(f"'{run / 'config.yaml'}' is not a readable config ({type(exc).__name__}): re-run training") from None
    if not OmegaConf.is_dict(cfg) or "model" not in cfg:
        raise UserError(f"'{run / 'config.yaml'}' has no `model` section: pass a folder written by erasure.train")
    if not base and not (run / "delta.safetensors").is_file():
        raise UserError(f"run folder '{run}' has no delta.safetensors: training did not finish there (base=true purifies with the base model)")
    return cfg


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


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    args = parse_options(argv, OPTIONS, USAGE, lambda a: "run" in a and "image" in a)
    base = _flag(args.get("base", False))
    prompt = "" if args.get("prompt") is None else str(args.get("prompt"))
    paths = find_images(args.image)
    cfg = check_run_folder(args.run, base)
    steps = _number(args, "steps", int, int(cfg.model.get("sample_steps") or DEFAULT_STEPS))
    guidance = _number(args, "guidance", float, 1.0)
    regen_guidance = _number(args, "regen_guidance", float, guidance)
    batch_size = _number(args, "batch_size", int, 16)
    pictures = [read_image(p) for p in paths]

    from .delta import load_run

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
