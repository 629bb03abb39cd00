"""Experiment loggers: ``logger=none`` (metrics.jsonl only) and ``logger=wandb`` (Weights & Biases)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NoLogger:
    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NoLogger):
    """Logs losses, lr and preview grids. Without an API key it runs offline and says so once."""

    def __init__(self, cfg, config: dict, run_dir: Path):
        import wandb

        mode = cfg.get("mode") or "auto"
        if mode == "auto":
            has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
            mode = "online" if has_key and os.environ.get("WANDB_MODE") != "offline" else "offline"
            if mode == "offline":
                log.info("W&B: no API key found, logging offline to %s/wandb (sync later with `wandb sync`)", run_dir)
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.get("entity"), group=cfg.get("group"),
                              name=cfg.get("run_name"), tags=list(cfg.get("tags") or []), mode=mode,
                              dir=str(run_dir), config=config, reinit="finish_previous")

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_image(self, key, path, step, caption=""):
        self.run.log({key: self._wandb.Image(str(path), caption=caption)}, step=step)

    def summary(self, values):
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self):
        self.run.finish()


def make_logger(cfg, config: dict, run_dir: Path):
    name = str(cfg.name)
    if name == "none":
        return NoLogger()
    if name == "wandb":
        return WandbLogger(cfg, config, run_dir)
    from .errors import UserError

    raise UserError(f"unknown logger '{name}': choose none or wandb")
