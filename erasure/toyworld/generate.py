"""Batched text-to-image sampling for the toy world (check, probe, tests).

Each image gets its own initial latent from its own seed, so an image does not depend on the batch
it was drawn in; the standard ``StableDiffusionPipeline`` does the denoising.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 35, guidance: float = 7.5,
             batch_size: int = 128, progress: bool = True) -> torch.Tensor:
    """uint8 N x 3 x H x W images for ``prompts[i]`` from ``seeds[i]`` (DDIM/eta=0 if the pipeline's scheduler is DDIM)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    pipe.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    out = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=f"sampling (g={guidance})", dynamic_ncols=True, disable=None if progress else True):
        p, s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        latents = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(x))) for x in s])
        images = pipe(p, num_inference_steps=steps, guidance_scale=guidance, latents=latents.to(pipe.device, pipe.unet.dtype),
                      height=side, width=side, output_type="np").images
        out.append(torch.from_numpy(np.round(np.asarray(images) * 255).clip(0, 255).astype(np.uint8)).permute(0, 3, 1, 2))
    return torch.cat(out) if out else torch.zeros(0, 3, side, side, dtype=torch.uint8)
