"""One erasure run's optimisation state: the trainable subset, the frozen teacher, the method, AdamW, and one
optimizer step. :func:`erasure.trainer.train` runs the loop around it; ``erasure.bench`` times it.

A closed-form method (``method.shape == "closed_form"``, :class:`erasure.method.ClosedFormMethod`) gets no optimizer:
its one step is :meth:`Session.edit`, which copies the method's edited parameters into the trainable ones.
An adapter method (``shape == "adapter"``, :class:`erasure.method.AdapterMethod`) attaches its adapter sets first;
their weights join the trainable parameters (after the ``params=`` subset, often empty: ``params=none``), so the
teacher, optimizer and checkpoints treat them like any trained tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time

import numpy as np
import torch
from omegaconf import DictConfig

from .checkpoint import rng_state, set_rng_state
from .config import sdpa_names
from .errors import UserError
from .method import TrainContext
from .models import Models, resolve_dtype
from .params import TEXT_ENCODER_PREFIX, count, select_params
from .teacher import Teacher

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def sdpa_context(spec: str):
    """``trainer.sdpa_backends``: "auto" leaves the choice of attention kernel to PyTorch; otherwise only the named
    kernels may run (torch.nn.attention.sdpa_kernel; the flags are restored on exit)."""
    names = sdpa_names(spec)
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([kinds[n] for n in names])


@dataclasses.dataclass
class Session:
    """Everything one erasure run optimizes: trainable subset, teacher, method, optimizer, step function."""

    cfg: DictConfig
    models: Models
    trainable: dict[str, torch.nn.Parameter]
    teacher: Teacher
    method: object
    optimizer: torch.optim.Optimizer | None  # None for a closed-form method
    step_fn: object
    precision: torch.dtype
    setup_time: float
    base_lrs: list[float]  # each optimizer group's learning rate before the method's schedule (lr_factor); [] without

    @classmethod
    def create(cls, cfg: DictConfig, models: Models, method_cls, method_cfg) -> "Session":
        tr = cfg.trainer
        n_unet = sum(p.numel() for p in models.unet.parameters())
        trainable = select_params(models.unet, cfg.params, models.text_encoder)
        n_text = count({k: v for k, v in trainable.items() if k.startswith(TEXT_ENCODER_PREFIX)})
        if n_text and next(models.text_encoder.parameters()).dtype != torch.float32:
            models.text_encoder.float()  # trained text-encoder weights and their AdamW state in fp32, as the UNet's
        generator = torch.Generator("cpu").manual_seed(int(tr.seed))
        adapters = {}
        if method_cls.shape == "adapter":  # the method's adapter sets, attached as the identity (erasure.adapters)
            for adapter_set in method_cls.build_adapters(method_cfg, models, cfg.concept, generator):
                if not adapter_set.is_identity():
                    raise ValueError(f"adapter set '{adapter_set.name}' of method '{method_cls.name}' does not start as "
                                     "the identity (up weights must be zero): the teacher would not be the base model")
                adapters[adapter_set.name] = adapter_set
                trainable.update(adapter_set.named_parameters())
        for p in trainable.values():
            p.requires_grad_(True)
        precision = resolve_precision(str(tr.get("precision", "auto")), models.device)
        if precision != torch.float32:
            # frozen UNet weights in low precision (memory, bandwidth); trained ones stay fp32
            with torch.no_grad():
                for name, p in models.unet.named_parameters():
                    if name not in trainable:
                        p.data = p.data.to(precision)
        teacher_mode = str(tr.get("teacher_precision", "autocast"))  # autocast | pure (erasure.config.validate)
        # pure: the frozen teacher runs entirely in the low precision (no per-op fp32 norms/casts); CPU stays fp32
        teacher = Teacher(models.unet, trainable, precision if teacher_mode == "pure" and precision != torch.float32 else None,
                          text_encoder=models.text_encoder)
        log.info("training %s: %.2fM parameters (params=%s%s%s; UNet %.2fM); the teacher holds only a frozen copy of "
                 "those (%.1f MB instead of %.1f MB for a full UNet copy)", method_cls.name, count(trainable) / 1e6,
                 cfg.params.name, "".join(f", adapters '{n}' on {len(a.targets)} layers (rank {a.rank})"
                                          for n, a in adapters.items()),
                 f", {n_text / 1e6:.2f}M of them in the text encoder" if n_text else "",
                 n_unet / 1e6, teacher.numel() * 4 / 2**20, n_unet * 4 / 2**20)
        if tr.get("channels_last"):  # NHWC convolutions (GPU tensor cores prefer them; docs/PERFORMANCE.md)
            models.unet.to(memory_format=torch.channels_last)
        if tr.get("compile"):
            models.unet.compile()  # torch.compile through nn.Module.compile (experimental; GPU)
        ctx = TrainContext(models=models, trainable=trainable, teacher=teacher, concept=cfg.concept, cfg=cfg,
                           generator=generator, adapters=adapters)
        setup_start = time.perf_counter()
        with precision_context(models.device, precision), sdpa_context(str(tr.get("sdpa_backends", "auto"))):
            method = method_cls(method_cfg, ctx)  # a method's own preparation (e.g. anchor images) is timed apart
        setup_time = time.perf_counter() - setup_start
        if method.shape == "closed_form":  # one edit (Session.edit), nothing to optimise
            return cls(cfg, models, trainable, teacher, method, None, method.closed_form, precision, setup_time, [])
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
        base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        return cls(cfg, models, trainable, teacher, method, optimizer, step_fn, precision, setup_time, base_lrs)

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

    @contextlib.contextmanager
    def autocast(self):
        """The training's numerics for model calls: mixed precision, and the attention kernels allowed
        (trainer.sdpa_backends)."""
        with precision_context(self.models.device, self.precision), \
                sdpa_context(str(self.cfg.trainer.get("sdpa_backends", "auto"))):
            yield

    def edit(self) -> dict[str, torch.Tensor]:
        """A closed-form method's one step: its edited parameters (``method.closed_form()``, computed in full precision)
        are copied into the trainable ones. Returns ``relative_change``, ||W_new - W||_F / ||W||_F over all edited
        tensors (W: their values before this step)."""
        name = self.method.name
        with torch.no_grad():
            edited = self.step_fn()
        outside = sorted(set(edited) - set(self.trainable))
        if outside:
            raise UserError(f"method '{name}' edits '{outside[0]}', which params={self.cfg.params.name} does not select: "
                            f"choose a parameter subset that holds it (the method's default is params={self.method.default_params})")
        change, norm = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for key, value in edited.items():
                p = self.trainable[key]
                if value.shape != p.shape:
                    raise ValueError(f"method '{name}' returned {tuple(value.shape)} for '{key}' of shape {tuple(p.shape)}")
                if not torch.isfinite(value).all():
                    raise UserError(f"method '{name}' computed a non-finite '{key}': check its settings (method.*); the run stopped")
                change += (value.double() - p.double()).pow(2).sum().cpu()
                norm += p.double().pow(2).sum().cpu()
                p.copy_(value.to(p.device, p.dtype))
        return {"relative_change": (change / norm.clamp_min(1e-30)).sqrt().float()}

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimizer step; returns the (detached) loss terms. Stops on a non-finite term.
        (A closed-form method: its edit, :meth:`edit`.)"""
        if self.method.shape == "closed_form":
            return self.edit()
        with self.autocast():
            terms = self.step_fn(step)
        self.check_terms(terms, step)
        self.optimizer.zero_grad(set_to_none=True)
        factor = self.method.lr_factor(step)  # the method's schedule (constant unless it defines lr_factor)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self._optimize(terms["loss"])
        self.check_finite(step)
        out = {k: v.detach().float() for k, v in terms.items()}
        for index in range(self.method.followup_steps(step)):  # e.g. AdvUnlearn's retain steps (method.followup_loss)
            with self.autocast():
                extra = self.method.followup_loss(step, index)
            self.check_terms(extra, step, f" of follow-up step {index + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            self._optimize(extra.pop("loss"))
            self.check_finite(step)
            out.update({k: v.detach().float() for k, v in extra.items()})
        self.method.after_step(step)
        return out

    @staticmethod
    def check_terms(terms: dict[str, torch.Tensor], step: int, where: str = "") -> None:
        """Stop on a non-finite loss term, naming a component before the total."""
        for name, value in sorted(terms.items(), key=lambda kv: kv[0] == "loss"):
            if not torch.isfinite(value).all():
                raise UserError(f"loss term '{name}'{where} became {value.item()} at step {step}: lower the learning "
                                f"rate (method.lr) or check the inputs; the run stopped")

    def _optimize(self, loss: torch.Tensor) -> None:
        """backward, the method's gradient clipping, one AdamW step."""
        loss.backward()
        clip = getattr(self.method.cfg, "grad_clip", None)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), clip)
        self.optimizer.step()

    def check_finite(self, step: int) -> None:
        """Stop on a trained tensor that the optimizer step made non-finite (e.g. a huge learning rate overflows the
        update while the loss was still finite): such a delta would evaluate to black images. One device sync."""
        params = list(self.trainable.items())
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).cpu()
        if not bool(finite.all()):
            name = params[int((~finite).nonzero()[0])][0]
            raise UserError(f"parameter '{name}' became non-finite at step {step}: lower the learning rate "
                            f"(method.lr) or check the inputs; the run stopped")


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``trainer.precision``: auto = bf16 autocast on CUDA where supported, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.float32
    return resolve_dtype(name, device, key="trainer.precision")
