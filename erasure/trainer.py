"""The one shared trainer. A method supplies its loss; the trainer owns everything else.

Seeding, device and dtype, the trainable subset and the frozen teacher, AdamW, the loop with a
progress bar, metrics.jsonl, the logger, preview grids (the paper's iteration timelines) and saving
the delta. It never branches on a method's name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path

import hydra.utils
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import registry
from .delta import save_delta
from .io import write_text_atomic
from .generation import default_sampler, generate
from .checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .errors import UserError
from .images import grid, save_png
from .loggers import make_logger
from .method import TrainContext
from .models import DTYPES, Models, load_models, resolve_dtype
from .params import count, select_params
from .teacher import Teacher, swapped_params

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validate(cfg: DictConfig):
    """Check the whole config before any model loads; returns (method class, typed method config)."""
    from .schemas import check_all

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # an interpolation that does not resolve
        raise UserError(f"the config does not resolve: {str(exc).strip().splitlines()[0]}") from None
    check_all(cfg)
    method_cls = registry.get_method(str(cfg.method.name))
    method_cfg = method_cls.parse_config(cfg.method)
    tr = cfg.trainer
    if int(tr.iterations) < 1:
        raise UserError(f"trainer.iterations must be at least 1, got {tr.iterations}")
    for key, low in (("teacher_batch", 1), ("keep_checkpoints", 1), ("preview_every", 0), ("checkpoint_every", 0),
                     ("probe_points", 0), ("probe_seeds", 1)):
        if int(tr.get(key, low)) < low:
            raise UserError(f"trainer.{key} must be at least {low}, got {tr.get(key)}")
    if not float(cfg.model.get("lr_scale", 1.0)) > 0:
        raise UserError(f"model.lr_scale must be > 0, got {cfg.model.get('lr_scale')}")
    if str(tr.get("precision", "auto")) not in ("auto", *DTYPES):
        raise UserError(f"unknown trainer.precision '{tr.precision}': choose auto, float32 or bfloat16")
    targets = list(cfg.concept.get("targets") or [])
    if not targets or any(not str(t).strip() for t in targets):
        raise UserError(f"concept '{cfg.concept.get('name')}' has no target text: set concept.targets to a list of prompts")
    for inst in cfg.concept.get("instructions") or []:
        if not 0 < float(inst.kappa) <= 1:
            raise UserError(f"instruction concept '{inst.text}' has kappa {inst.kappa}: kappa must be in (0, 1]")
        lo, hi = (float(x) for x in inst.window)
        if not 0 <= lo <= hi <= 1:
            raise UserError(f"instruction concept '{inst.text}' has window {list(inst.window)}: use fractions of T with 0 <= low <= high <= 1")
    return method_cls, method_cfg


class Previews:
    """Fixed prompts x seeds sampled at intervals: the iteration timeline of a run."""

    def __init__(self, models: Models, cfg: DictConfig, out_dir: Path):
        self.models = models
        self.prompts = list(cfg.concept.get("preview_prompts") or cfg.concept.targets)
        self.seeds = list(cfg.trainer.preview_seeds)
        self.sampler = default_sampler(models, cfg.model)  # the model's own sampler, as evaluation's default
        self.out_dir = out_dir
        self.columns: list[tuple[int, list]] = []

    def __call__(self, step: int, params: dict[str, torch.Tensor]) -> Path:
        from PIL import Image

        prompts = [p for p in self.prompts for _ in self.seeds]
        seeds = [s for _ in self.prompts for s in self.seeds]
        array = generate(self.models, prompts, self.sampler, seeds=seeds, params=params)
        images = [Image.fromarray(a) for a in array]
        self.columns.append((step, images))
        labels = [f"{p[:24]} #{s}" for p in self.prompts for s in self.seeds]
        path = save_png(grid([[im] for im in images], row_labels=labels, col_labels=[f"it {step}"]),
                        self.out_dir / f"step_{step:06d}.png")
        return path

    def timeline(self, path: Path) -> Path | None:
        if not self.columns:
            return None
        n = len(self.columns[0][1])
        rows = [[col[1][i] for col in self.columns] for i in range(n)]
        labels = [f"{p[:24]} #{s}" for p in self.prompts for s in self.seeds]
        return save_png(grid(rows, row_labels=labels, col_labels=[f"it {s}" for s, _ in self.columns]), path)


class ProbeCurve:
    """The model's probe at evenly spaced iterations (``trainer.probe_points``), appended to ``probe.jsonl`` and
    logged as ``probe/<name>``: the erasure curve of the paper's Fig. 4. Needs a model tier with ``probe_point``."""

    def __init__(self, cfg: DictConfig, models: Models, run_dir: Path, iterations: int, logger, session):
        points = int(cfg.trainer.get("probe_points") or 0)
        self.fn = None
        self.steps: set[int] = set()
        self.path = run_dir / "probe.jsonl"
        if points <= 0:
            return
        if not cfg.model.get("probe_point"):
            log.warning("trainer.probe_points=%d is ignored: model '%s' has no probe_point", points, cfg.model.name)
            return
        self.fn = hydra.utils.get_method(str(cfg.model.probe_point).replace(":", "."))
        self.steps = {max(1, round(iterations * k / points)) for k in range(1, points + 1)}
        self.cfg, self.models, self.logger, self.session = cfg, models, logger, session
        self.seeds = int(cfg.trainer.get("probe_seeds") or 4)
        self.cache: dict = {}  # the probe's own memory across points (e.g. the base model's images)

    def __call__(self, step: int, params: dict) -> None:
        if self.fn is None:
            return
        if step == 0:
            self.path.unlink(missing_ok=True)
        with self.session.autocast():
            point = self.fn(models=self.models, cfg=self.cfg, params=params, seeds=self.seeds,
                            base_params=self.session.teacher.params, cache=self.cache)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **point}) + "\n")
        self.logger.log({f"probe/{k}": v for k, v in point.items()}, step)
        log.info("probe at iteration %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in point.items()))


class TeacherBank:
    """Teacher work done ahead in batches (``trainer.teacher_batch``), consumed one iteration at a time.

    The randomness of the next n iterations is drawn in the order the one-at-a-time loop draws it, so
    ``teacher_batch=n`` and ``teacher_batch=1`` see the same z_t and targets (up to float rounding of
    batched kernels).
    """

    def __init__(self, method, size: int, last_step: int):
        self.method, self.size, self.last_step = method, size, last_step
        self.queue: list[dict] = []

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        if not self.queue:
            n = min(self.size, self.last_step - step + 1)
            self.queue = self.method.teacher_work([self.method.draw(s) for s in range(step, step + n)])
        return self.method.student_loss(self.queue.pop(0))


def precision_context(device: torch.device, dtype: torch.dtype):
    """Mixed precision on GPU (autocast to bf16/fp16: frozen and teacher evaluations run in low precision while
    trained parameters, gradients and optimizer state stay fp32); plain fp32 on CPU."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@dataclasses.dataclass
class Session:
    """Everything one erasure run optimizes: trainable subset, teacher, method, optimizer, step function."""

    cfg: DictConfig
    models: Models
    trainable: dict[str, torch.nn.Parameter]
    teacher: Teacher
    method: object
    optimizer: torch.optim.Optimizer
    step_fn: object
    precision: torch.dtype
    setup_time: float

    @classmethod
    def create(cls, cfg: DictConfig, models: Models, method_cls, method_cfg) -> "Session":
        tr = cfg.trainer
        trainable = select_params(models.unet, cfg.params)
        for p in trainable.values():
            p.requires_grad_(True)
        precision = resolve_precision(str(tr.get("precision", "auto")), models.device)
        if precision != torch.float32:
            # frozen UNet weights in low precision (memory, bandwidth); trained ones stay fp32
            with torch.no_grad():
                for name, p in models.unet.named_parameters():
                    if name not in trainable:
                        p.data = p.data.to(precision)
        teacher_mode = str(tr.get("teacher_precision", "autocast"))
        if teacher_mode not in ("autocast", "pure"):
            raise UserError(f"trainer.teacher_precision={teacher_mode} is not valid: use autocast or pure")
        # pure: the frozen teacher runs entirely in the low precision (no per-op fp32 norms/casts); CPU stays fp32
        teacher = Teacher(models.unet, trainable, precision if teacher_mode == "pure" and precision != torch.float32 else None)
        n_unet = sum(p.numel() for p in models.unet.parameters())
        log.info("training %s: %.2fM of %.2fM UNet parameters (params=%s); the teacher holds only a frozen copy of "
                 "those (%.1f MB instead of %.1f MB for a full UNet copy)", method_cls.name, count(trainable) / 1e6,
                 n_unet / 1e6, cfg.params.name, teacher.numel() * 4 / 2**20, n_unet * 4 / 2**20)
        if tr.get("compile"):
            models.unet.compile()  # torch.compile through nn.Module.compile (experimental; GPU)
        generator = torch.Generator("cpu").manual_seed(int(tr.seed))
        ctx = TrainContext(models=models, trainable=trainable, teacher=teacher, concept=cfg.concept, cfg=cfg,
                           generator=generator)
        setup_start = time.perf_counter()
        with precision_context(models.device, precision):
            method = method_cls(method_cfg, ctx)  # a method's own preparation (e.g. anchor images) is timed apart
        setup_time = time.perf_counter() - setup_start
        lr = method.learning_rate()
        lr_scale = float(cfg.model.get("lr_scale", 1.0))
        if lr_scale != 1.0:  # a model tier's uniform factor on every method's learning rate (conf/model/toyworld.yaml)
            log.info("learning rate %.3g x model.lr_scale %g = %.3g", lr, lr_scale, lr * lr_scale)
            lr *= lr_scale
        optimizer = torch.optim.AdamW(method.parameters(), lr=lr, betas=tuple(method_cfg.adam_betas),
                                      eps=method_cfg.adam_eps, weight_decay=method_cfg.weight_decay)
        teacher_batch = int(tr.get("teacher_batch", 1))
        step_fn = TeacherBank(method, teacher_batch, int(tr.iterations)) \
            if teacher_batch > 1 and method.supports_teacher_bank else method.training_step
        return cls(cfg, models, trainable, teacher, method, optimizer, step_fn, precision, setup_time)

    def state(self, step: int) -> dict:
        """Everything a resumed run needs to continue exactly (see erasure/checkpoint.py)."""
        opt = self.optimizer.state_dict()
        return {
            "params": {n: p.detach() for n, p in self.trainable.items()},
            "optimizer": {"state": opt["state"], "param_groups": opt["param_groups"]},
            "rng": {**rng_state(), "method_generator": self.method.ctx.generator.get_state()},
            "method": self.method.state_dict(),
            "bank": list(self.step_fn.queue) if isinstance(self.step_fn, TeacherBank) else [],
        }

    def restore(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["params"].items():
                self.trainable[name].copy_(value)
        opt = state["optimizer"]
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in opt["param_groups"]]
        self.optimizer.load_state_dict({"state": {int(k): v for k, v in opt["state"].items()}, "param_groups": groups})
        set_rng_state(state["rng"])
        self.method.ctx.generator.set_state(state["rng"]["method_generator"])
        self.method.load_state_dict(state["method"])
        if isinstance(self.step_fn, TeacherBank):
            device = self.models.device
            self.step_fn.queue = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in w.items()} for w in state["bank"]]

    def autocast(self):
        return precision_context(self.models.device, self.precision)

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimizer step; returns the (detached) loss terms. Stops on a non-finite term."""
        with self.autocast():
            terms = self.step_fn(step)
        for name, value in sorted(terms.items(), key=lambda kv: kv[0] == "loss"):  # name a component before the total
            if not torch.isfinite(value).all():
                raise UserError(f"loss term '{name}' became {value.item()} at step {step}: lower the learning rate "
                                f"(method.lr) or check the inputs; the run stopped")
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        clip = getattr(self.method.cfg, "grad_clip", None)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), clip)
        self.optimizer.step()
        self.method.after_step(step)
        return {k: v.detach().float() for k, v in terms.items()}


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``trainer.precision``: auto = bf16 autocast on CUDA where supported, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.float32
    return resolve_dtype(name, device, key="trainer.precision")


def train(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Run one erasure job; writes config.yaml, metrics.jsonl, samples/, timeline.png, delta.safetensors, summary.json.

    With ``resume=<run folder>`` the run continues in that folder from its last checkpoint, with its saved config.
    """
    resume = cfg.get("resume")
    if resume:
        run_dir = Path(str(resume))
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"cannot resume '{run_dir}': it holds no config.yaml; pass a run folder written by erasure.train")
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise UserError(f"cannot resume '{run_dir}': it has no checkpoint (train with trainer.checkpoint_every=<n>)")
        cfg = OmegaConf.load(run_dir / "config.yaml")
    run_dir = Path(run_dir)
    method_cls, method_cfg = validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    tr = cfg.trainer
    seed_everything(int(tr.seed))
    models = load_models(cfg.model, str(tr.device))
    base_fingerprint = models.fingerprint
    session = Session.create(cfg, models, method_cls, method_cfg)
    method, optimizer, trainable, teacher = session.method, session.optimizer, session.trainable, session.teacher
    start_step = 1
    if resume:
        done, state = load_checkpoint(checkpoints[-1])
        session.restore(state)
        start_step = done + 1
        log.info("resuming %s from %s (step %d)", run_dir, checkpoints[-1].name, done)
    logger = make_logger(cfg.logger, OmegaConf.to_container(cfg, resolve=True), run_dir)

    iterations = int(tr.iterations)
    every = int(tr.preview_every) if tr.preview_every else 0
    previews = Previews(models, cfg, run_dir / "samples")
    if every and start_step == 1:
        with session.autocast():
            logger.log_image("preview", previews(0, method.export_params()), 0)
    checkpoint_every = int(tr.get("checkpoint_every") or 0)
    keep = int(tr.get("keep_checkpoints", 2))

    curve = ProbeCurve(cfg, models, run_dir, iterations, logger, session)
    if start_step == 1:
        curve(0, teacher.params)
    elif curve.path.is_file():  # resumed: drop curve points written after the checkpoint
        lines = curve.path.read_text().splitlines()
        write_text_atomic(curve.path, "".join(l + "\n" for l in lines if json.loads(l)["step"] < start_step))

    metrics_path = run_dir / "metrics.jsonl"
    if start_step > 1:  # keep the metrics of the steps the checkpoint covers, drop any written after it
        lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
        write_text_atomic(metrics_path, "".join(l + "\n" for l in lines if json.loads(l)["step"] < start_step))
    start, excluded = time.perf_counter(), 0.0
    with open(metrics_path, "a" if start_step > 1 else "w") as metrics_file, \
            tqdm(range(start_step, iterations + 1), desc=f"erasing ({method_cls.name})", dynamic_ncols=True,
                 disable=None) as bar:
        for step in bar:
            terms = session.step(step)
            record = {"step": step, **{k: v.item() for k, v in terms.items()}, "lr": optimizer.param_groups[0]["lr"]}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            logger.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            aside = time.perf_counter()  # previews, probe points and checkpoints are not training time
            if every and (step % every == 0 or step == iterations):
                with session.autocast():
                    logger.log_image("preview", previews(step, method.export_params()), step)
            if step in curve.steps:
                curve(step, method.export_params())
            if checkpoint_every and step % checkpoint_every == 0 and step < iterations:
                save_checkpoint(run_dir, step, session.state(step), keep)
            excluded += time.perf_counter() - aside
    train_time = time.perf_counter() - start - excluded

    meta = dict(base_model=models.source, base_fingerprint=base_fingerprint, model=cfg.model.name,
                method=method_cls.name, params=cfg.params.name, iterations=iterations, seed=int(tr.seed),
                concept=str(cfg.concept.name))
    save_delta(run_dir / "delta.safetensors", method.export_params(), meta)
    timeline = previews.timeline(run_dir / "timeline.png")
    if timeline:
        logger.log_image("timeline", timeline, iterations, caption="rows: preview prompts; columns: iterations")
    summary = {**meta, "train_time_s": round(train_time, 3), "s_per_it": round(train_time / iterations, 5),
               "setup_time_s": round(session.setup_time, 3),
               "trainable_parameters": count(trainable), "final": {k: v for k, v in record.items() if k != "step"}}
    if cfg.model.get("probe"):
        # A model tier may name a probe (model.probe = "module:function") that measures erasure on that
        # model right after training, e.g. the toy world's detector rates; its numbers join summary.json.
        probe = hydra.utils.get_method(str(cfg.model.probe).replace(":", "."))
        with session.autocast():
            summary.update(probe(models=models, cfg=cfg, base_params=teacher.params, erased_params=method.export_params()))
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    logger.summary({**{k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                    **{f"final/{k}": v for k, v in summary["final"].items()}})
    logger.finish()
    log.info("done in %.1f s (%.3f s/it); run folder: %s%s", train_time, train_time / iterations, run_dir,
             f"; timeline: {timeline}" if timeline else "")
    return run_dir
