"""Train an erased model: ``python -m erasure.train method=ours lambda=5`` (Hydra; ``-m`` for sweeps)."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .cli import precheck_train_args
from .errors import UserError, fail
from .trainer import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg, HydraConfig.get().runtime.output_dir)
    except UserError as exc:
        fail(str(exc))


if __name__ == "__main__":
    try:
        precheck_train_args(sys.argv[1:])
    except UserError as exc:
        fail(str(exc))
    main()
