"""Concept purification (paper Fig. 1b, Fig. 10): DDIM-invert a real image under the erased model, then
regenerate it with DDIM from the inverted latent under the same model and condition.

The command line is ``python -m erasure.purify`` (erasure/purify.py); from Python: :func:`purify_images`
(uint8 images in, uint8 images out) and :func:`purify_latents`.

The condition (``prompt``) is used by both the inversion and the regeneration. Empty means the null text, the
paper's "null token" inversion; the erased concept's text (e.g. "nudity", "a circle") is the paper's
"concept-related token" inversion. ``guidance`` 1.0 (the default) is no CFG: only the conditional noise
prediction is used, which keeps DDIM inversion close to invertible (CFG > 1 makes the inverted latent drift away
from the image).

DDIM inversion here follows diffusers' inversion pipelines: the step from noise level t-Δ to t uses the noise
predicted at the current latent with timestep t, and the scheduler is diffusers' ``DDIMInverseScheduler``
configured from the model's DDIM scheduler (SD v1.4's settings, ``clip_sample=False``), so that inversion
ends exactly where the DDIM sampler of the same number of steps starts. The regeneration is the project's one
generation function (:func:`erasure.generation.generate`) started from the inverted latents.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..generation import Sampler, generate

log = logging.getLogger(__name__)
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
