"""The one shared trainer: the loop. A method supplies its loss, or its closed-form edit (``shape = "closed_form"``:
one step, no optimizer, :meth:`erasure.session.Session.edit`), or adapters and their loss (``shape = "adapter"``:
the session trains the adapters; the delta records their placement); the trainer never branches on a method's name.

``train`` validates the config (once: :func:`erasure.config.validate`), loads the model, builds the
:class:`erasure.session.Session` (trainable subset, frozen teacher, method, AdamW), runs the optimizer steps with a
progress bar, writes ``metrics.jsonl`` and the logger's records, and saves ``delta.safetensors`` and
``summary.json``. Previews, the erasure curve, checkpoints and the model's probe are callbacks
(:mod:`erasure.callbacks`).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from .adapters import described
from .callbacks import Run, create_callbacks, drop_after
from .checkpoint import config_digest, list_checkpoints, load_checkpoint, saved_digest
from . import registry
from .config import SHORTCUTS, validate
from .delta import save_delta
from .errors import UserError
from .io import folder_lock, to_json, write_text_atomic
from .loggers import make_logger
from .models import load_models
from .params import count
from .session import Session, seed_everything

log = logging.getLogger(__name__)


def resumed_config(run_dir: Path) -> tuple[DictConfig, list[Path]]:
    """``resume=<run folder>``: the folder's saved config and its checkpoints, newest first (a checkpoint that fails
    to load falls back to the one before)."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"cannot resume '{run_dir}': it holds no config.yaml; pass a run folder written by erasure.train")
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(f"cannot resume '{run_dir}': it has no checkpoint (train with trainer.checkpoint_every=<n>)")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    claimed = registry.get_method(str(cfg.method.name)).shortcuts
    for key in SHORTCUTS:  # folders written before 2026-12-02 carry lambda: 5.0 for every method (it was ignored)
        if cfg.get(key) is not None and key not in claimed:
            log.warning("the saved config of '%s' sets %s=%s, which method '%s' never read; resuming without it",
                        run_dir, key, cfg[key], cfg.method.name)
            cfg[key] = None
    return cfg, checkpoints[::-1]


def resume_conflicts(saved: DictConfig, given: DictConfig, overrides: list[str]) -> list[str]:
    """The command-line overrides whose value differs from the resumed run's saved config (``resume=`` continues a
    run with its own config: a different iteration count or learning rate would silently be ignored)."""
    conflicts = []
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        if key in ("resume", "resume_edited", "overwrite") or key.startswith("hydra."):
            continue
        mine, theirs = OmegaConf.select(given, key, default=None), OmegaConf.select(saved, key, default=None)
        if isinstance(mine, DictConfig) and "name" in mine:  # a group choice (method=esd): compare by name
            mine, theirs = mine.name, OmegaConf.select(saved, f"{key}.name", default=None)
        plain = lambda v: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v  # noqa: E731
        if plain(mine) != plain(theirs):
            conflicts.append(f"{key} ({plain(mine)!r} given, the run has {plain(theirs)!r})")
    return conflicts


RUN_MARKS = ("config.yaml", "delta.safetensors", "summary.json", "metrics.jsonl", "checkpoints")  # a run was here
FOLDER_KEEP = {".hydra", ".lock", "train.log", "train_stdout.log"}  # this launch's own files (Hydra's, the lock, logs)


def claim_folder(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds another run (its delta, config and checkpoints would mix with this one's, and its
    eval.json would be read as this run's), unless ``overwrite``: then remove that run's files first."""
    if not any((run_dir / mark).exists() for mark in RUN_MARKS):
        return
    previous = sorted(p.name for p in run_dir.iterdir() if p.name not in FOLDER_KEEP)
    if not overwrite:
        raise UserError(f"run folder '{run_dir}' already holds a run ({', '.join(previous[:5])}"
                        f"{', ...' if len(previous) > 5 else ''}): continue it with resume={run_dir}, train into another "
                        "folder (hydra.run.dir=<folder>), or replace it with overwrite=true")
    log.warning("overwrite=true: removing the previous run's files from %s: %s", run_dir, ", ".join(previous))
    for name in previous:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """Run one erasure job; writes config.yaml, metrics.jsonl, delta.safetensors and summary.json (and what the
    callbacks write: samples/, timeline.png, probe.jsonl, checkpoints/).

    With ``resume=<run folder>`` the run continues in that folder from its last checkpoint, with its saved config.
    """
    checkpoint = None
    if cfg.get("resume"):
        run_dir = Path(str(cfg.resume))
        given = cfg
        cfg, checkpoint = resumed_config(run_dir)
        conflicts = resume_conflicts(cfg, given, list(overrides or []))
        recorded, now = saved_digest(checkpoint[0]), config_digest(run_dir)
        if recorded is not None and recorded != now and not given.get("resume_edited"):
            raise UserError(f"config.yaml of '{run_dir}' was edited after its last checkpoint: restore it, or continue "
                            "with the edited config with resume_edited=true")
        if recorded is not None and recorded != now:
            log.warning("config.yaml of '%s' was edited after its last checkpoint; continuing with the edited config "
                        "(resume_edited=true)", run_dir)
        if conflicts:
            raise UserError(f"resume= continues '{run_dir}' with its saved config, which differs from "
                            f"{', '.join(conflicts)}: drop those overrides, or train a new run with them")
    run_dir = Path(run_dir)
    method_cls, method_cfg = validate(cfg)
    with folder_lock(run_dir, "run folder"):  # one training per folder at a time
        if checkpoint is None:
            claim_folder(run_dir, bool(cfg.get("overwrite")))
        return _train(cfg, run_dir, checkpoint, method_cls, method_cfg)


def _train(cfg: DictConfig, run_dir: Path, checkpoint, method_cls, method_cfg) -> Path:
    tr = cfg.trainer
    seed_everything(int(tr.seed))
    models = load_models(cfg.model, str(tr.device))
    limit = int(models.scheduler.config.num_train_timesteps)  # known once the model's scheduler is loaded
    for group, node, key in (("method", method_cfg, "T"), ("method", method_cfg, "ddim_steps"),
                             ("model", cfg.model, "sample_steps")):
        steps = getattr(node, key, None) if not isinstance(node, DictConfig) else node.get(key)
        if isinstance(steps, int) and steps > limit:
            raise UserError(f"{group}.{key}={steps} is more sampling steps than the model's scheduler has timesteps "
                            f"({limit}): use at most {limit}")
    session = Session.create(cfg, models, method_cls, method_cfg)
    if checkpoint is None:  # written once set-up succeeded: an error before it leaves only Hydra's log in the folder
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    start_step, before = 1, 0.0  # before: training seconds of the steps a resumed checkpoint covers
    if checkpoint is not None:
        for i, candidate in enumerate(checkpoint):
            try:
                done, state = load_checkpoint(candidate)
                break
            except UserError as exc:  # truncated or corrupt (a kill mid-write on a filesystem without atomic rename)
                if i + 1 == len(checkpoint):
                    raise UserError(f"no checkpoint of '{run_dir}' is readable (the last: {exc}); train it again with "
                                    "overwrite=true") from None
                log.warning("%s; falling back to %s", exc, checkpoint[i + 1].name)
        session.restore(state)
        start_step = done + 1
        before = state.get("train_time_s")  # None in a checkpoint written before its time was kept with it
        if before is None:
            log.warning("checkpoint %s does not hold the training time of its %d steps; summary.json will estimate it "
                        "from the steps timed now (train_time_estimated)", candidate.name, done)
        log.info("resuming %s from %s (step %d)", run_dir, candidate.name, done)
    logger = make_logger(cfg.logger, OmegaConf.to_container(cfg, resolve=True), run_dir)
    iterations = int(tr.iterations)
    run = Run(cfg, run_dir, models, session, logger, start_step, iterations)
    callbacks = create_callbacks(run)
    for cb in callbacks:
        cb.on_start(run)

    metrics_path = run_dir / "metrics.jsonl"
    if start_step > 1:  # keep the metrics of the steps the checkpoint covers, drop any written after it
        drop_after(metrics_path, start_step)
    start, aside = time.perf_counter(), 0.0
    with open(metrics_path, "a" if start_step > 1 else "w") as metrics_file, \
            tqdm(range(start_step, iterations + 1), desc=f"erasing ({method_cls.name})", dynamic_ncols=True,
                 disable=None) as bar:
        for step in bar:
            terms = session.step(step)
            record = {"step": step, **{k: v.item() for k, v in terms.items()},
                      **({"lr": session.optimizer.param_groups[0]["lr"]} if session.optimizer is not None else {})}
            metrics_file.write(to_json(record) + "\n")
            metrics_file.flush()
            logger.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss",) if k in record})
            t0 = time.perf_counter()  # previews, probe points and checkpoints are not training time
            # what a checkpoint of this step keeps; unknown (None) after an old checkpoint, so a second resume estimates too
            run.train_time_s = None if before is None else before + t0 - start - aside
            for cb in callbacks:
                cb.on_step(run, step, record)
            aside += time.perf_counter() - t0
    timed = iterations - start_step + 1  # the steps this process trained (all of them unless resumed)
    segment = time.perf_counter() - start - aside
    s_per_it = segment / timed if timed > 0 else 0.0
    # a resumed run adds the time its checkpoint kept; a checkpoint without it: the timed steps' rate for every step
    train_time = s_per_it * iterations if before is None else before + segment

    meta = dict(base_model=models.source, base_fingerprint=models.fingerprint,
                text_encoder_fingerprint=models.text_encoder_fingerprint, model=cfg.model.name,
                method=method_cls.name, params=cfg.params.name, iterations=iterations, seed=int(tr.seed),
                concept=str(cfg.concept.name))
    params = run.params()
    adapters = described(models.unet, params)  # the placement of the adapter sets whose weights the delta holds
    save_delta(run_dir / "delta.safetensors", params, {**meta, **({"adapters": adapters} if adapters else {})})
    resumed = {} if start_step == 1 else {"resumed_from_step": start_step - 1,
                                          **({"train_time_estimated": True} if before is None else {})}
    summary = {**meta, "train_time_s": round(train_time, 3), "s_per_it": round(s_per_it, 5), **resumed,
               "setup_time_s": round(session.setup_time, 3), "trainable_parameters": count(session.trainable),
               "final": {k: v for k, v in record.items() if k != "step"}}
    for cb in callbacks:
        cb.on_end(run, summary)
    write_text_atomic(run_dir / "summary.json", to_json(summary, indent=2) + "\n")
    logger.summary({**{k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                    **{f"final/{k}": v for k, v in summary["final"].items()}})
    logger.finish()
    log.info("done in %.1f s (%.3f s/it); run folder: %s", train_time, s_per_it, run_dir)
    return run_dir
