"""Trainable-parameter subsets, selected by name (``params=<subset>``; definitions in ``conf/params/``).

A subset is a list of regular expressions matched (``re.search``) against the UNet's parameter names
(diffusers naming), minus an exclusion list. Self-attention is ``attn1``, cross-attention ``attn2``.
"""
from __future__ import annotations

import re

import torch

from .errors import UserError


def select_params(unet: torch.nn.Module, subset) -> dict[str, torch.nn.Parameter]:
    """Parameters of ``unet`` in the subset ``subset`` (a ``conf/params/*.yaml`` node), by name, in module order."""
    include = [re.compile(p) for p in subset.include]
    exclude = [re.compile(p) for p in subset.get("exclude", [])]
    chosen = {
        name: p for name, p in unet.named_parameters()
        if any(r.search(name) for r in include) and not any(r.search(name) for r in exclude)
    }
    if not chosen:
        raise UserError(f"parameter subset '{subset.name}' matches no parameter of this UNet: check its include patterns in conf/params/{subset.name}.yaml")
    return chosen


def count(params: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())


def _report(argv: list[str]) -> None:
    """``python -m erasure.params [model=sd14_random]``: parameters per subset and what the teacher costs."""
    import logging

    from omegaconf import OmegaConf

    from .cli import CONF_DIR, setup_logging
    from .models import load_models

    setup_logging()
    args = OmegaConf.from_dotlist(argv)
    model_cfg = OmegaConf.load(CONF_DIR / "model" / f"{args.get('model', 'sd14_random')}.yaml")
    models = load_models(model_cfg, "cpu")
    total = sum(p.numel() for p in models.unet.parameters())
    lines = [f"UNet of '{models.name}': {total / 1e6:.1f}M parameters ({total * 4 / 2**30:.2f} GiB in fp32)",
             f"{'subset':<10} {'params':>9} {'share':>7}   teacher copy (fp32) vs a full UNet copy"]
    for path in sorted((CONF_DIR / "params").glob("*.yaml")):
        n = count(select_params(models.unet, OmegaConf.load(path)))
        lines.append(f"{path.stem:<10} {n / 1e6:>8.1f}M {100 * n / total:>6.1f}%   {n * 4 / 2**20:>8.1f} MiB vs "
                     f"{total * 4 / 2**20:.1f} MiB (saves {(total - n) * 4 / 2**20:.1f} MiB)")
    logging.getLogger("erasure.params").info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    import sys

    _report(sys.argv[1:])
