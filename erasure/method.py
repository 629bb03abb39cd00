"""What a method plugs into the shared trainer: a config schema, a default parameter subset, and a loss or a
closed-form edit, on the UNet's own weights or on adapters.

A method subclasses :class:`ErasureMethod`, declares ``Config`` (a dataclass: the schema of its
``conf/method/<name>.yaml``) and takes one of three shapes (the class attribute ``shape``, which the trainer reads
from the registered class, never from the method's name):

* ``"loss"`` (default): it implements :meth:`ErasureMethod.training_step`, returning its loss terms, and the
  shared loop optimises the trainable subset with them;
* ``"closed_form"`` (subclass :class:`ClosedFormMethod`): it implements :meth:`ErasureMethod.closed_form`,
  returning the edited parameters at once; the trainer runs no optimizer and counts the edit as one step;
* ``"adapter"`` (subclass :class:`AdapterMethod`): it implements :meth:`AdapterMethod.build_adapters`, attaching
  adapter modules (:mod:`erasure.adapters`: LoRA-style ``up·down`` beside chosen layers, e.g. SPM's membrane) to the
  UNet, and ``training_step`` as a loss method does; the loop trains the adapters' weights (plus the ``params=``
  subset, usually ``params=none``), and the delta holds them with their placement.

Everything else (seeding, device, optimizer, loop, logging, previews, probe, saving the delta) is the trainer's.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .adapters import AdapterSet
from .errors import UserError
from .models import Models
from .teacher import Teacher


@dataclasses.dataclass
class BaseMethodConfig:
    """Keys every method config has (the trainer reads them)."""

    name: str = "???"
    iterations: int = 200  # default number of optimizer steps (trainer.iterations defaults to this)
    lr: float = 1e-5  # AdamW learning rate
    adam_eps: float = 1e-8
    adam_betas: tuple[float, float] = (0.9, 0.999)  # torch defaults
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max gradient norm, or null for none


@dataclasses.dataclass
class ClosedFormConfig:
    """Keys every closed-form method config has (no optimizer settings: nothing is optimised)."""

    name: str = "???"
    iterations: int = 1  # the edit is one step: metrics.jsonl holds step 1, summary.json iterations 1


@dataclasses.dataclass
class TrainContext:
    """What the trainer hands a method."""

    models: Models
    trainable: dict[str, torch.nn.Parameter]  # the student's trained parameters (live in models.unet)
    teacher: Teacher  # frozen theta*, sharing all other weights with the student
    concept: DictConfig
    cfg: DictConfig  # the whole composed config
    generator: torch.Generator  # CPU generator for all of the method's randomness (seeded by trainer.seed)
    adapters: dict[str, AdapterSet] = dataclasses.field(default_factory=dict)  # an adapter method's sets, by name

    @property
    def unet(self) -> torch.nn.Module:
        return self.models.unet

    @property
    def device(self) -> torch.device:
        return self.models.device

    def embed(self, texts: list[str]) -> torch.Tensor:
        return self.models.encode_text(texts)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.device)

    def randint(self, low: int, high: int) -> int:
        """An integer in [low, high)."""
        return int(torch.randint(low, high, (1,), generator=self.generator))


class ErasureMethod:
    """Base class of every erasure method."""

    name: str = ""
    Config: type = BaseMethodConfig
    default_params: str = "to_out"  # documentation; the yaml's defaults list selects conf/params/<this>
    shortcuts: dict[str, str] = {}  # top-level config keys this method reads (erasure.config.SHORTCUTS) -> its field
    # How the trainer runs the method (module docstring): "loss" = training_step inside the optimisation loop,
    # "closed_form" = closed_form() once, no optimizer (erasure.session.Session.edit), "adapter" = training_step
    # on the adapters that build_adapters attached (erasure.session.Session.create).
    shape: str = "loss"

    def __init__(self, cfg: Any, ctx: TrainContext):
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def parse_config(cls, node: DictConfig) -> Any:
        """Check a method config against the schema; returns a typed, read-only config."""
        try:
            resolved = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Config), resolved))
        except OmegaConfBaseException as exc:
            raise UserError(f"invalid method config for '{cls.name}': {str(exc).splitlines()[0]}") from None
        cls.validate(cfg)
        return cfg

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if cfg.iterations < 1:
            raise UserError(f"method.iterations must be at least 1, got {cfg.iterations}")
        if not (math.isfinite(cfg.lr) and cfg.lr > 0):  # nan fails both comparisons: check finiteness first
            raise UserError(f"method.lr must be a positive finite number, got {cfg.lr}")
        if cfg.grad_clip is not None and not (math.isfinite(cfg.grad_clip) and cfg.grad_clip > 0):
            raise UserError(f"method.grad_clip must be a positive finite number or null (no clipping), got {cfg.grad_clip}")

    @classmethod
    def validate_concept(cls, concept: DictConfig) -> None:
        """Check the concept settings only this method reads (e.g. All but One's instruction concepts)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer updates."""
        return list(self.ctx.trainable.values())

    def learning_rate(self) -> float:
        """The optimizer's learning rate; a method may derive it from its config (e.g. scale it by its batch size)."""
        return float(self.cfg.lr)

    def lr_factor(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1, 2, ...) as a factor of :meth:`learning_rate` (a schedule;
        a function of the step alone, so that a resumed run continues it exactly). Default: constant 1."""
        return 1.0

    # Teacher work in bulk (trainer.teacher_batch > 1). A method whose iteration splits into
    #   draw(step)          -> the iteration's randomness, drawn from ctx.generator (e.g. x_T, t, target),
    #   teacher_work(draws) -> what the frozen teacher computes from it, for a list of iterations at once,
    #   student_loss(work)  -> the loss terms (no randomness, no teacher sampling),
    # sets supports_teacher_bank = True: the trainer then draws the randomness of the next n iterations in
    # the order the one-at-a-time loop would, and computes their teacher work in one batch. Methods whose
    # sampler depends on the student (SDD, ESD with student sampling) keep supports_teacher_bank = False.
    supports_teacher_bank: bool = False

    def draw(self, step: int) -> dict:
        raise NotImplementedError

    def teacher_work(self, draws: list[dict]) -> list[dict]:
        raise NotImplementedError

    def student_loss(self, work: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        """Loss terms for one iteration; key ``loss`` is the total that is back-propagated."""
        return self.student_loss(self.teacher_work([self.draw(step)])[0])

    def closed_form(self) -> dict[str, torch.Tensor]:
        """The edited parameters (names of ``ctx.trainable`` -> new values), computed at once from the base weights
        (shape ``"closed_form"``). Called under ``torch.no_grad``; calling it again gives the same edit."""
        raise NotImplementedError

    def followup_steps(self, step: int) -> int:
        """How many further optimizer steps iteration ``step`` takes after its main one, each on the loss
        :meth:`followup_loss` returns (e.g. AdvUnlearn's iterative retain steps, ``retain_train: iter``). Default 0."""
        return 0

    def followup_loss(self, step: int, index: int) -> dict[str, torch.Tensor]:
        """Loss terms of follow-up optimizer step ``index`` (0, 1, ...) of iteration ``step``; key ``loss`` is
        back-propagated. Logged under the method's own keys (choose names other than the main step's)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (e.g. an EMA update)."""

    def state_dict(self) -> dict:
        """The method's own state that changes during training (tensors and JSON values), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def export_params(self) -> dict[str, torch.Tensor]:
        """The weights that make the erased model (saved in the delta and used for previews)."""
        return {name: p.detach() for name, p in self.ctx.trainable.items()}


class ClosedFormMethod(ErasureMethod):
    """Base class of a method whose erasure is one edit in closed form (``models, cfg -> delta``), e.g. UCE.

    The trainer calls :meth:`closed_form` once (step 1) instead of the loop, copies the result into the trainable
    parameters, and then does what it does for every method: the delta with the base fingerprint, the callbacks'
    previews and probe, ``summary.json`` with the time (``train_time_s``: the edit itself).
    """

    shape = "closed_form"
    Config: type = ClosedFormConfig
    # The config fields that set how strongly the edit acts (the official code's own knobs, e.g. UCE's erase_scale).
    # A closed-form method has no iterations to probe along, so its erasure curve (trainer.probe_points = P) is over
    # edit strength: the edit recomputed with these fields scaled by 1/P, 2/P, ..., 1 (fraction 1 = the configured
    # edit; 0 would be the base model, iteration 0 of the curve). Empty: the curve is the base and the edit only.
    strength_keys: tuple[str, ...] = ()

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if cfg.iterations != 1:
            raise UserError(f"method '{cls.name}' is a closed-form edit (one step): method.iterations must be 1, "
                            f"got {cfg.iterations}")

    def parameters(self) -> list[torch.nn.Parameter]:
        return []  # nothing is optimised

    def closed_form_at(self, fraction: float) -> dict[str, torch.Tensor]:
        """:meth:`closed_form` with every field of :attr:`strength_keys` scaled by ``fraction`` (1: the configured
        edit). The method's config is restored afterwards."""
        if not 0 < fraction <= 1:
            raise ValueError(f"edit strength fraction must be in (0, 1], got {fraction}")
        configured = self.cfg
        self.cfg = dataclasses.replace(configured, **{k: getattr(configured, k) * fraction for k in self.strength_keys})
        try:
            return self.closed_form()
        finally:
            self.cfg = configured

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        raise TypeError(f"method '{self.name}' is a closed-form edit: the trainer calls closed_form(), not training_step()")


class AdapterMethod(ErasureMethod):
    """Base class of a method that trains adapter modules instead of (or beside) a subset of the UNet's weights.

    :meth:`build_adapters` attaches its sets to ``models.unet`` before anything else is set up (each adapter the
    identity at first, :mod:`erasure.adapters`); the session adds their weights to the trainable parameters, so the
    frozen teacher, AdamW, checkpoints, previews, the probe and the delta see them as they see a UNet subset. The
    loop then calls ``training_step`` (or the teacher-bank holes) as for a loss method; ``ctx.adapters`` holds the
    sets by name (a method with several, e.g. one per concept, may switch them with ``AdapterSet.multiplied``).
    ``export_params`` defaults to every trainable tensor: the adapter weights, which the delta stores with each set's
    placement; a method may instead return UNet tensors it computes from its adapters (e.g. a fusion into the
    cross-attention weights), and then the delta holds no adapter at all.
    """

    shape = "adapter"

    @classmethod
    def build_adapters(cls, cfg: Any, models: Models, concept: DictConfig, generator: torch.Generator) -> list[AdapterSet]:
        """Attach this method's adapter sets to ``models.unet`` (``erasure.adapters.attach(..., generator=generator)``,
        placed e.g. with ``erasure.adapters.layers_inside``) and return them. ``concept``: the run's concept (what a
        gate or a per-concept set needs to know); ``generator``: the run's seeded generator (initialisation)."""
        raise NotImplementedError

    @classmethod
    def gate(cls, models: Models, prompts: list[str], prompt_embeds: torch.Tensor, settings: dict) -> torch.Tensor:
        """Per-prompt multipliers (len(prompts),) of an adapter set whose ``gate`` names this method, computed each
        time images are generated (``settings``: the set's gate dict, saved in the delta; ``prompt_embeds``: the
        prompts' text-encoder outputs). Only needed by a method that gives its sets a gate."""
        raise NotImplementedError
