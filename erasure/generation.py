"""The one image-generation function of the project: (model, optional weights, prompts, seeds, sampler) -> images.

Every caller that turns prompts into images goes through :func:`generate`: the trainer's previews, the toy
world's probe and quality check, the evaluation's image cache, ``python -m erasure.generate``, purification's
regeneration and the baselines' anchor/reference images. So one (model, weights, prompt, seed, sampler) gives one
image, whichever path asks. (Sampling z_t inside a training step is not image generation: see
:mod:`erasure.sampling`.)

The denoising itself is a standard diffusers ``StableDiffusionPipeline`` call (``Models.pipeline``) with
embeddings from :meth:`Models.encode_text` (float32; the pipeline gets no text encoder, so it never casts them to
a half-precision encoder's dtype) and initial latents drawn here:

- ``seeds``: each row's latent from its own ``torch.Generator("cpu").manual_seed(seed)``, so an image does not
  depend on the batch it falls in (the same numbers diffusers draws for a list of per-row generators);
- ``generator``: one generator for all rows, drawn batch by batch (what ``pipeline(generator=g)`` draws);
- ``latents``: given initial latents (e.g. DDIM-inverted ones, for purification).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import gated
from .teacher import swapped_weights


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How images are sampled: scheduler (a diffusers scheduler), steps, default guidance, side, batch size."""

    scheduler: object
    steps: int
    guidance: float
    resolution: int
    batch_size: int = 8

    @property
    def key(self) -> str:
        """A short name of what changes the pixels (not the guidance: that is per image, in its file name)."""
        desc = self.describe()
        digest = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return f"{desc['scheduler']}-{self.steps}st-{self.resolution}px-{digest}"

    def describe(self) -> dict:
        config = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
        return dict(scheduler=type(self.scheduler).__name__, scheduler_config=config, steps=self.steps,
                    resolution=self.resolution)


def default_sampler(models, model_cfg, steps=None, guidance=None, resolution=None, batch_size: int = 8) -> Sampler:
    """The model's own sampler (its shipped scheduler, ``model.sample_steps``, ``model.guidance``), with any of
    steps/guidance/resolution given here taking precedence."""
    guidance = guidance if guidance is not None else model_cfg.get("guidance", 7.5)
    return Sampler(scheduler=models.generation_scheduler,
                   steps=int(steps or model_cfg.get("sample_steps")), guidance=float(guidance),
                   resolution=int(resolution or models.resolution), batch_size=int(batch_size))


def seeded_latents(models, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    """Initial latents, row i from ``torch.Generator("cpu").manual_seed(seeds[i])`` (float32, on the CPU)."""
    side = resolution // models.vae_scale_factor
    shape = (models.unet.config.in_channels, side, side)
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


def _precision(models):
    """Half-precision frozen parts on a GPU (model.dtype) run under autocast beside the float32 UNet."""
    if models.device.type == "cuda" and models.dtype != torch.float32:
        return torch.autocast("cuda", dtype=models.dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(models, prompts: Sequence[str], sampler: Sampler, *, seeds: Sequence[int] | None = None,
             generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             guidance: float | None = None, params: dict[str, torch.Tensor] | None = None, output: str = "uint8",
             desc: str | None = None) -> np.ndarray | torch.Tensor:
    """Images of ``prompts`` (one per prompt), in order.

    Exactly one of ``seeds`` (one per prompt), ``generator`` or ``latents`` (N x C x h x w) gives the initial noise.
    ``guidance`` overrides the sampler's; ``params`` are UNet weights (and ``text_encoder.<name>`` text-encoder weights) swapped in for the
    call (an erased model's delta, a student mid-training; adapter weights included, their sets attached beforehand: ``erasure.delta.load_delta``).
    An attached adapter set with a gate runs, for each prompt, at the multiplier its method computes from that prompt
    (:func:`erasure.adapters.gated`; the negative prompt's rows of classifier-free guidance get the same value); ``output="uint8"`` returns N x H x W x 3 uint8 RGB, ``"latent"`` the final
    latents (float32, on the model's device, already multiplied by the VAE's scaling factor). ``desc`` shows a
    progress bar over the images.
    """
    if sum(x is not None for x in (seeds, generator, latents)) != 1:
        raise ValueError("give exactly one of seeds, generator or latents")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    if latents is not None and len(latents) != len(prompts):
        raise ValueError(f"one latent per prompt: got {len(prompts)} prompts and {len(latents)} latents")
    if output not in ("uint8", "latent"):
        raise ValueError(f"output must be 'uint8' or 'latent', got {output!r}")
    prompts = [str(p) for p in prompts]
    side = sampler.resolution
    if not prompts:
        return np.zeros((0, side, side, 3), np.uint8) if output == "uint8" else torch.zeros(0)
    guidance = float(sampler.guidance if guidance is None else guidance)
    pipe = models.pipeline(scheduler=sampler.scheduler, text_encoder=False)
    pipe.set_progress_bar_config(disable=True)
    shape = (models.unet.config.in_channels, side // models.vae_scale_factor, side // models.vae_scale_factor)
    out = []
    with swapped_weights(models, params or {}), _precision(models), \
            tqdm(total=len(prompts), desc=desc, unit="img", dynamic_ncols=True, disable=None if desc else True) as bar:
        uncond = models.encode_text([""])  # inside the swap: a delta may hold text-encoder weights (AdvUnlearn)
        for start in range(0, len(prompts), max(1, int(sampler.batch_size))):
            batch = prompts[start:start + sampler.batch_size]
            if seeds is not None:
                noise = seeded_latents(models, seeds[start:start + len(batch)], side)
            elif generator is not None:
                noise = torch.randn((len(batch), *shape), generator=generator)
            else:
                noise = latents[start:start + len(batch)]
            embeds = models.encode_text(batch)
            with gated(models, batch, embeds):  # gated adapter sets: per-prompt multipliers (SPM's facilitated transport)
                result = pipe(prompt_embeds=embeds, negative_prompt_embeds=uncond.expand(len(batch), -1, -1),
                              num_inference_steps=int(sampler.steps), guidance_scale=guidance,
                              latents=noise.to(models.device, torch.float32), height=side, width=side,
                              output_type="latent" if output == "latent" else "np").images
            if output == "latent":
                out.append(result.float())
            else:  # as diffusers' numpy_to_pil rounds: (x * 255).round()
                out.append((np.asarray(result) * 255).round().clip(0, 255).astype(np.uint8))
            bar.update(len(batch))
    return torch.cat(out) if output == "latent" else np.concatenate(out)
