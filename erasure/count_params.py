"""Parameters per trainable subset and what the teacher costs: ``python -m erasure.count_params [model=sd14_random]``."""
from __future__ import annotations

import logging
import sys

from omegaconf import OmegaConf

from .cli import setup_logging
from .config import CONF_DIR
from .models import load_models
from .params import count, select_params


def main(argv: list[str]) -> None:
    setup_logging()
    args = OmegaConf.from_dotlist(argv)
    model_cfg = OmegaConf.load(CONF_DIR / "model" / f"{args.get('model', 'sd14_random')}.yaml")
    models = load_models(model_cfg, "cpu")
    total = sum(p.numel() for p in models.unet.parameters())
    lines = [f"UNet of '{models.name}': {total / 1e6:.1f}M parameters ({total * 4 / 2**30:.2f} GiB in fp32)",
             f"{'subset':<10} {'params':>9} {'share':>7}   teacher copy (fp32) vs a full UNet copy"]
    for path in sorted((CONF_DIR / "params").glob("*.yaml")):
        n = count(select_params(models.unet, OmegaConf.load(path), models.text_encoder))
        lines.append(f"{path.stem:<10} {n / 1e6:>8.1f}M {100 * n / total:>6.1f}%   {n * 4 / 2**20:>8.1f} MiB vs "
                     f"{total * 4 / 2**20:.1f} MiB (saves {(total - n) * 4 / 2**20:.1f} MiB)")
    logging.getLogger("erasure.count_params").info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
