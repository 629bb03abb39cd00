"""Generate images with an erased model: ``python -m erasure.generate run=<run folder> prompt="..." seed=0``.

Loads the run's base model, applies its delta (refused if the base fingerprint differs), wraps the parts in a
standard diffusers ``StableDiffusionPipeline`` and writes PNGs to ``<run>/generated/`` (or ``out=``).
Options: ``n=`` images (seeds seed, seed+1, ...), ``steps=``, ``guidance=``, ``base=true`` for the base model.
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .cli import setup_logging
from .delta import apply_delta
from .errors import UserError, exit_on_user_error
from .images import save_png
from .models import load_models

log = logging.getLogger("erasure.generate")
USAGE = 'usage: python -m erasure.generate run=<run folder> prompt="..." [seed=0] [n=1] [steps=] [guidance=] [out=] [base=false]'


def load_run(run: str | Path, device: str = "auto", base: bool = False):
    """The models of a finished run with its delta applied (or the bare base model with base=True)."""
    run = Path(run)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"'{run}' is not a run folder (no config.yaml): pass the folder that erasure.train wrote")
    cfg = OmegaConf.load(cfg_path)
    models = load_models(cfg.model, device)
    if not base:
        apply_delta(models.unet, models.fingerprint, run / "delta.safetensors")
    return cfg, models


@exit_on_user_error
def main(argv: list[str]) -> list[Path]:
    setup_logging()
    args = OmegaConf.from_dotlist(argv) if argv else OmegaConf.create()
    unknown = set(args) - {"run", "prompt", "seed", "n", "steps", "guidance", "out", "base", "device"}
    if unknown or "run" not in args or "prompt" not in args:
        raise UserError(f"{'unknown option ' + ', '.join(sorted(unknown)) + '; ' if unknown else ''}{USAGE}")
    cfg, models = load_run(args.run, args.get("device", "auto"), bool(args.get("base", False)))
    pipe = models.pipeline()
    pipe.set_progress_bar_config(disable=True)
    steps = int(args.get("steps") or cfg.model.sample_steps)
    guidance = float(args.get("guidance") if args.get("guidance") is not None else cfg.model.guidance)
    out = Path(args.get("out") or Path(args.run) / "generated")
    slug = re.sub(r"[^a-z0-9]+", "_", str(args.prompt).lower()).strip("_")[:60] or "empty"
    seed0 = int(args.get("seed", 0))
    written = []
    emb, uncond = models.encode_text([str(args.prompt)]), models.encode_text([""])
    for k in range(int(args.get("n", 1))):
        g = torch.Generator("cpu").manual_seed(seed0 + k)
        image = pipe(prompt_embeds=emb, negative_prompt_embeds=uncond, num_inference_steps=steps,
                     guidance_scale=guidance, generator=g, height=models.resolution, width=models.resolution).images[0]
        written.append(save_png(image, out / f"{slug}_seed{seed0 + k}{'_base' if args.get('base') else ''}.png"))
        log.info("wrote %s", written[-1])
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
