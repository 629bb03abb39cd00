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


WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")  # what wandb.init accepts (wandb_settings.mode)


def check_wandb_env() -> None:
    """A WANDB_MODE that wandb.init would refuse (with a pydantic trace) ends in one sentence instead."""
    env = os.environ.get("WANDB_MODE")
    if env is not None and env not in WANDB_MODES:
        from .errors import UserError

        raise UserError(f"WANDB_MODE={env} is not a W&B mode: use one of {', '.join(WANDB_MODES)} (or unset it)")


def wandb_mode(mode: str | None, folder: Path) -> str:
    """``auto`` -> online with an API key (WANDB_API_KEY or ~/.netrc), else offline (said once)."""
    mode = mode or "auto"
    check_wandb_env()
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
        mode = "online" if has_key and os.environ.get("WANDB_MODE") != "offline" else "offline"
        if mode == "offline":
            log.info("W&B: no API key found, logging offline to %s/wandb (sync later with `wandb sync`)", folder)
    return mode


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a Hydra multirun: its folder's last two parts (date and time), shared by
    every job of the sweep and by ``python -m eval.sweep``'s summary run."""
    return "sweep-" + "-".join(Path(sweep_dir).resolve().parts[-2:])


def current_sweep_dir() -> Path | None:
    """hydra.sweep.dir when running as a job of a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    except Exception:  # not under Hydra (tests, python API)
        return None


class WandbLogger(NoLogger):
    """Logs losses, lr, preview grids and the timeline. Without an API key it runs offline and says so once.
    Jobs of one Hydra multirun share the group ``sweep-<date>-<time>`` (unless ``logger.group`` is set)."""

    def __init__(self, cfg, config: dict, run_dir: Path):
        import wandb

        mode = wandb_mode(cfg.get("mode"), run_dir)
        group = cfg.get("group")
        sweep = current_sweep_dir()
        if group is None and sweep is not None:
            group = sweep_group(sweep)
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.get("entity"), group=group,
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
