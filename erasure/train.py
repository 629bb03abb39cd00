"""Train an erased model: ``python -m erasure.train method=ours lambda=5`` (Hydra; ``-m`` for sweeps)."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .cli import precheck_train_args, record_failed_job
from .errors import UserError, fail
from .trainer import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    try:
        train(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task))
    except UserError as exc:
        if hc.mode != RunMode.MULTIRUN:
            fail(str(exc))
        record_failed_job(hc, str(exc))  # a sweep goes on with its other jobs; FailedJobs reports them at the end
    except Exception as exc:  # noqa: BLE001 -- a bug or a crash in one job of a sweep: logged with its trace, reported
        if hc.mode != RunMode.MULTIRUN:
            raise
        logging.getLogger("erasure.train").exception("job %s failed", hc.job.num)
        record_failed_job(hc, f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    try:
        precheck_train_args(sys.argv[1:])
        main()
    except UserError as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # Ctrl-C: one line; the last checkpoint (trainer.checkpoint_every) is complete
        print("interrupted (Ctrl-C): resume=<run folder> continues from the last checkpoint", file=sys.stderr,
              flush=True)
        raise SystemExit(130) from None
