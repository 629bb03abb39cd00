"""Generate images with an erased model: ``python -m erasure.generate run=<run folder> prompt="..." seed=0``.

Loads the run's base model, applies its delta (refused if the base fingerprint differs; an adapter method's delta,
e.g. SPM's, first attaches its adapters to the UNet, and a gated set, SPM's membrane, is scaled per prompt by the
facilitated transport saved with it), wraps the parts in a standard diffusers ``StableDiffusionPipeline`` and writes
PNGs to ``<run>/generated/`` (or ``out=``).
Options: ``n=`` images (seeds seed, seed+1, ...), ``steps=``, ``guidance=``, ``base=true`` for the base model.
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image

from .cli import setup_logging
from .delta import load_run
from .errors import UserError, exit_on_user_error
from .generation import default_sampler, generate
from .images import save_png

log = logging.getLogger("erasure.generate")
USAGE = 'usage: python -m erasure.generate run=<run folder> prompt="..." [seed=0] [n=1] [steps=] [guidance=] [out=] [base=false]'


@exit_on_user_error
def main(argv: list[str]) -> list[Path]:
    setup_logging()
    args = OmegaConf.from_dotlist(argv) if argv else OmegaConf.create()
    unknown = set(args) - {"run", "prompt", "seed", "n", "steps", "guidance", "out", "base", "device"}
    if unknown or "run" not in args or "prompt" not in args:
        raise UserError(f"{'unknown option ' + ', '.join(sorted(unknown)) + '; ' if unknown else ''}{USAGE}")
    for key, low in (("n", 1), ("steps", 1)):
        value = args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise UserError(f"{key}= must be a whole number of at least {low}, got {value!r}; {USAGE}")
    if not isinstance(args.get("seed", 0), int) or isinstance(args.get("seed", 0), bool) or args.get("seed", 0) < 0:
        raise UserError(f"seed= must be a whole number of at least 0, got {args.get('seed')!r}; {USAGE}")
    cfg, models = load_run(args.run, args.get("device", "auto"), bool(args.get("base", False)))
    sampler = default_sampler(models, cfg.model, steps=args.get("steps"), guidance=args.get("guidance"), batch_size=1)
    out = Path(args.get("out") or Path(args.run) / "generated")
    prompt = str(args.prompt)
    seed0 = int(args.get("seed", 0))
    written = []
    seeds = [seed0 + k for k in range(int(args.get("n", 1)))]
    images = generate(models, [prompt] * len(seeds), sampler, seeds=seeds, desc="generating")
    for seed, image in zip(seeds, images):
        name = f"{file_stem(prompt)}_seed{seed}{'_base' if args.get('base') else ''}.png"
        written.append(save_png(Image.fromarray(image), out / name, text={"prompt": prompt, "seed": str(seed)}))
        log.info("wrote %s", written[-1])
    return written


def file_stem(prompt: str) -> str:
    """A readable slug of the prompt (ASCII, at most 60 characters) and 8 hex digits of its sha1: two different
    prompts never share a file name (an emoji prompt and an empty one, prompts that differ in punctuation or after
    character 60). The exact prompt is also kept inside the PNG (its ``prompt`` text chunk)."""
    import hashlib

    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60].rstrip("_") or "prompt"
    return f"{slug}_{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"


if __name__ == "__main__":
    main(sys.argv[1:])
