"""SPM: Concept Semi-Permeable Membrane (Lyu, Yang, Hong, Chen, Jin, He, Xue, Han, Ding; CVPR 2024, "One-dimensional
Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications"). Official code: Con6924/SPM at commit
3dd762e6895b23cd20cf1653a16addc5c16a12f3, cited below by file and line: ``train_spm.py``, ``infer_spm.py``,
``evaluate_task.py``, ``src/models/spm.py``, ``src/configs/{config,prompt}.py``, ``src/engine/{train_util,sampling}.py``
and the erasure configs ``configs/pikachu/{config,prompt}.yaml`` (the pair the README's ``demo.ipynb`` generates;
``configs/snoopy`` differs only in the concept).

The method, as the code runs it:

* **Membrane** (spm.py l.15-77, l.80-161): a rank-1 adapter (``dim`` 1, ``alpha`` 1: scale alpha/rank = 1) beside
  every ``Linear`` and ``Conv2d`` inside every ``Transformer2DModel`` of the UNet (proj_in/out, the attention
  projections, the feed-forward layers): y = W x + m · up(down(x)), down Kaiming-uniform, up zero. On SD v1.4 that is
  192 layers and 423,936 weights (1.6 MiB in fp32). It is this project's adapter shape (:mod:`erasure.adapters`,
  :class:`erasure.method.AdapterMethod`), one set named ``spm``; the UNet's own weights never change (``params=none``).
* **One iteration** (train_spm.py l.138-288): draw a target, k ~ U{1..T−1} (T = ``max_denoising_steps`` 30) and
  x_T; DDIM (η = 0) with classifier-free guidance 3 on the target prompt, by the model *with* the membrane, for k
  steps of a T-step schedule: z. At the timestep t of index ⌊1000 k / T⌋ of a 1000-step schedule (999 − ⌊1000k/T⌋),
  the frozen base gives ε*(z, positive) and ε*(z, neutral), and the membrane model ε_θ(z, target):

      L_erase = MSE(ε_θ(z, target), ε*(z, neutral) − g (ε*(z, positive) − ε*(z, neutral)))     (prompt.py l.142-160)

  with positive = the target and neutral = "" unless the concept says otherwise (prompt.py l.62-74; a surrogate
  concept goes in ``neutral``, demo.ipynb), g = 1.
* **Latent anchoring** (train_spm.py l.237-263, sampling.py l.7-26, prompt.py l.162-182): ``sampling_batch_size`` = 4
  random text embeddings a_i, each a Gaussian direction of the target embedding's shape (77 × d), kept with
  probability 1 − cos(a_i, target), scaled to U[0.8, 1.2) × ‖target‖; the membrane model must match the base on them
  at the same z and t: L = L_erase + λ MSE(ε_θ(z, a), ε*(z, a)), λ = ``la_strength`` 1000.
* **Optimisation** (config.py, pikachu/config.yaml): 3,000 iterations, lr 1e-4 (AdamW8bit from bitsandbytes),
  ``cosine_with_restarts`` schedule with 500 warm-up steps and 3 cycles, no gradient clipping, batch 1.
* **Facilitated transport** (infer_spm.py l.28-51, l.114-142): at generation, each prompt p sets the membrane's
  strength from its similarity to the erased concept c: γ = max(cos(E(p), E(c)), |T(p) ∩ T(c)| / |T(c)|), E the text
  encoder's whole output (77 × d, flattened), T the set of token ids without the special tokens; the max over the
  SPM's concepts. :meth:`SPM.gate` computes it for every prompt that :func:`erasure.generation.generate` samples
  (the previews, the probe, ``python -m erasure.generate``, the evaluation); the delta records it (``gate`` in its
  ``adapters`` metadata). A direct UNet call (training, an attack's gradient loop) sees the membrane at m = 1, as
  the official code does wherever it does not run infer_spm.py (the README: the demo notebook and SD-WebUI "will NOT"
  activate it).

Where the code departs from a plain reading of the method, we follow the code and make it configurable:

* *transport scales the membrane by γ², not γ* (``transport_power`` 2): infer_spm.py l.132-142 multiplies every stored
  tensor, both down and up, by γ before loading them, so the membrane's output m · up(down(x)) grows with γ². Set
  ``method.transport_power=1`` for a membrane scaled by γ itself.
* *the anchors that count* (``anchor_rows: code``): the anchor embeddings go to ``predict_noise`` interleaved with the
  empty prompt, [∅, a_1, ∅, a_2, ∅, a_3, ∅, a_4] (sampling.py l.24-25), which splits its batch in halves as if they were
  [unconditional; conditional] (train_util.py l.161, l.173-176) and, at guidance 1, returns the second half: the loss
  anchors ε on [∅, a_3, ∅, a_4], half of it on the empty prompt, and a_1, a_2 are drawn but unused. ``anchor_rows: all``
  anchors on every a_i. We compute only the rows that count (the discarded half contributes nothing, its gradient is
  exactly zero), and the conditional branch directly rather than as ε_∅ + 1 · (ε_c − ε_∅) (equal up to rounding).
* *query timestep* (``query_timestep: code``): z lives at the T-step DDIM schedule's k-th timestep, but the UNet is
  asked at 999 − ⌊1000k/T⌋ (train_spm.py l.190-194), a few dozen steps noisier (k = 1: 966 instead of ~925).
  ``ddim``: the timestep at which z lives, as this project's ESD does.
* *z is sampled by the model being trained* (``sampler: student``; train_spm.py l.175 ``with network:``), ``teacher``
  for the frozen base.

Further choices, each where the code is silent or cannot run here:

* *optimizer*: AdamW8bit keeps an 8-bit state only for tensors of at least 4,096 elements (bitsandbytes' default
  ``min_8bit_size``); with rank 1, most membrane tensors are below that. We use torch's AdamW with bitsandbytes'
  defaults (betas (0.9, 0.999), eps 1e-8, weight decay 1e-2), in 32 bits throughout.
* *dynamic resolution* (prompt.yaml l.10, train_util.py l.636-648): each side of z is drawn from {256, 320, 384, 448}
  pixels for 512-pixel training, i.e. {4, 5, 6, 7} eighths of the model's side; we draw eighths of the model's latent
  side (SD v1.4: 32-56 latents, as the code; the toy world: 4-7 of its 8 latents). ``dynamic_resolution=false``: the
  model's own side.
* *sampler of z*: the shared DDIM sampler (:func:`erasure.sampling.sample_to_step`, the model's scheduler: SD's
  ``steps_offset`` 1) rather than the code's own DDIMScheduler (``steps_offset`` 0); the same T and guidance.
* *transport details*: the negative prompt's half of classifier-free guidance gets the prompt's γ, as infer_spm.py
  applies one network to the whole pipeline call (l.143-153); our generation's negative prompt stays the empty one
  (infer_spm.py passes a long quality negative prompt, a sampling choice, not the method). evaluate_task.py's
  ``--facilitate_factor`` (default 1, l.413-417) is not implemented.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from erasure.adapters import AdapterSet, attach, layers_inside
from erasure.config import concept_section
from erasure.errors import UserError
from erasure.method import AdapterMethod, BaseMethodConfig
from erasure.registry import register
from erasure.sampling import eps_all, sample_to_step
from erasure.teacher import student_eps

SET = "spm"  # the adapter set's name: its weights are <layer>.erasure_adapters.spm.{down,up}.weight
METRICS = ("clipcos", "tokenuni", "clipcos_tokenuni")  # infer_spm.py l.18-22


@dataclasses.dataclass
class SPMConfig(BaseMethodConfig):
    name: str = "spm"
    iterations: int = 3000  # config.py l.27 (TrainConfig.iterations); pikachu/config.yaml l.17
    lr: float = 1e-4  # config.py l.30; pikachu/config.yaml l.19 (the optimizer reads train.lr: spm.py l.163-174)
    # pikachu/config.yaml l.22: AdamW8bit; bitsandbytes AdamW8bit's defaults (bitsandbytes/optim/adamw.py, AdamW8bit,
    # read at commit 06029dd; requirements.txt pins 0.41.1): betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2
    adam_eps: float = 1e-8
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    grad_clip: float | None = None  # config.py l.43: max_grad_norm 0.0 -> no clipping (train_spm.py l.283-286)
    # learning-rate schedule (train_util.py l.569-633 -> diffusers' get_cosine_with_hard_restarts_schedule_with_warmup)
    lr_scheduler: str = "cosine_with_restarts"  # config.py l.37; pikachu/config.yaml l.23 (or "constant")
    lr_warmup_steps: int = 500  # config.py l.38; pikachu/config.yaml l.24
    lr_scheduler_num_cycles: int = 3  # config.py l.39; pikachu/config.yaml l.25
    # the membrane
    rank: int = 1  # config.py l.19 (NetworkConfig.rank); pikachu/config.yaml l.11
    alpha: float = 1.0  # config.py l.20; pikachu/config.yaml l.12 (scale alpha / rank, spm.py l.57-58)
    # classes of the modules whose Linear/Conv2d layers get a membrane: spm.py l.81-91 (DEFAULT_TARGET_REPLACE)
    containers: list[str] = dataclasses.field(default_factory=lambda: ["Transformer2DModel"])
    # one iteration
    ddim_steps: int = 30  # T: config.py l.45 (max_denoising_steps); pikachu/config.yaml l.26
    sample_guidance: float = 3.0  # guidance of the DDIM run to z: train_spm.py l.187 (guidance_scale=3)
    sampler: str = "student"  # who samples z: the membrane model (train_spm.py l.175 `with network:`) | teacher
    query_timestep: str = "code"  # 999 - floor(1000 k / T) (train_spm.py l.190-194) | ddim: where z lives
    dynamic_resolution: bool = True  # pikachu/prompt.yaml l.10 (train_util.py l.636-648; see the module docstring)
    erase_guidance: float = 1.0  # g: prompt.py l.49; pikachu/prompt.yaml l.7 (guidance_scale "1.0")
    # latent anchoring
    latent_anchoring: bool = True  # pikachu/prompt.yaml l.6: action erase_with_la (false: "erase", the ablation)
    la_strength: float = 1000.0  # λ: prompt.py l.56; pikachu/prompt.yaml l.11
    anchors: int = 4  # sampling_batch_size: prompt.py l.57; pikachu/prompt.yaml l.12
    anchor_scale: tuple[float, float] = (0.8, 1.2)  # sampling.py l.20: U[0.8, 1.2) x the target's norm (l.21)
    anchor_rows: str = "code"  # code: [∅, a_3, ∅, a_4] (see the module docstring) | all: every anchor
    # facilitated transport at generation (infer_spm.py; the delta records it)
    transport: bool = True  # infer_spm.py l.192-198: --spm_multiplier default None = facilitated transport
    matching_metric: str = "clipcos_tokenuni"  # infer_spm.py l.199-204
    transport_power: float = 2.0  # infer_spm.py l.132-142 scales down and up by γ: the membrane by γ²


@dataclasses.dataclass
class SPMConcept:
    """The concept's optional ``spm:`` section (read by :class:`SPM`, checked by its ``validate_concept``): the prompt
    pairs' other prompts (prompt.py l.43-74), each one for all targets or one per target."""

    # the concept the erased target is steered to: prompt.py l.47 + l.71-72 (default: the unconditional prompt "");
    # demo.ipynb's surrogate_concept
    neutral: list[str] = dataclasses.field(default_factory=lambda: [""])
    # the concept whose base prediction is negated: prompt.py l.45 + l.67-68 (default: the target itself)
    positive: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------- pure functions

def erase_loss(student_target: torch.Tensor, positive: torch.Tensor, neutral: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """MSE(ε_θ(z, target), ε*(z, neutral) − g (ε*(z, positive) − ε*(z, neutral))) (prompt.py l.151-155)."""
    goal = neutral - guidance * (positive - neutral)
    return F.mse_loss(student_target, goal.detach())


def anchoring_loss(student: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """MSE between the membrane model's and the frozen base's ε on the anchor conditions (prompt.py l.171)."""
    return F.mse_loss(student, base.detach())


def sample_anchors(target: torch.Tensor, count: int, generator: torch.Generator,
                   scale: tuple[float, float] = (0.8, 1.2)) -> torch.Tensor:
    """``count`` random text embeddings of ``target``'s shape (1, L, d) (sampling.py l.7-23): a Gaussian direction,
    kept with probability 1 − cos(direction, target), times a factor drawn from U[scale) times ‖target‖.
    Drawn on the CPU from ``generator``; returns (count, L, d) on ``target``'s device."""
    flat = target.detach().float().cpu().reshape(-1)
    norm = flat.norm()
    low, high = scale
    out = []
    while len(out) < count:
        while True:
            direction = torch.randn(flat.shape, generator=generator)
            direction = direction / direction.norm()
            sim = F.cosine_similarity(flat, direction, dim=0)
            if torch.rand((), generator=generator) < 1 - sim:
                break
        factor = torch.rand((), generator=generator) * (high - low) + low
        out.append(factor * direction * norm)
    return torch.stack(out).reshape(count, *target.shape[1:]).to(target.device, target.dtype)


def anchor_conditions(anchors: torch.Tensor, uncond: torch.Tensor, rows: str) -> torch.Tensor:
    """The conditions the anchoring loss compares the two models on. ``all``: the anchors. ``code``: what
    train_spm.py's predict_noise call keeps of [∅, a_1, ∅, a_2, ..., ∅, a_n] (sampling.py l.24-25) -- its second half
    (train_util.py l.173-176 at guidance 1), e.g. [∅, a_3, ∅, a_4] for n = 4."""
    if rows == "all":
        return anchors
    n = anchors.shape[0]
    interleaved = torch.stack([uncond.expand_as(anchors), anchors], dim=1).reshape(2 * n, *anchors.shape[1:])
    return interleaved[n:]


def code_timestep(k: int, num_steps: int, train_steps: int = 1000) -> int:
    """train_spm.py l.190-194: index ⌊1000 k / T⌋ of a 1000-step schedule, whose timesteps run 999, 998, ..., 0."""
    return train_steps - 1 - (k * train_steps) // num_steps


def cosine_restarts_factor(index: int, warmup: int, total: int, cycles: int) -> float:
    """Learning-rate factor of optimizer step ``index`` (0 for the first step): linear warm-up over ``warmup`` steps,
    then ``cycles`` cosine decays from 1 to 0 with hard restarts, 0 from ``total`` on (the schedule train_util.py
    l.619-626 takes from diffusers, get_cosine_with_hard_restarts_schedule_with_warmup)."""
    if index < warmup:  # so warmup >= 1
        return index / warmup
    progress = (index - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


def token_sets(tokenizer, texts: list[str]) -> list[set[int]]:
    """Each text's token ids without the special tokens (infer_spm.py l.45, l.48: ``special_tokens_map`` ids, which
    for SD's tokenizer are <|startoftext|> and <|endoftext|>, also its padding)."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    special = set(tokenizer.all_special_ids)
    return [set(map(int, row)) - special for row in ids]


def transport_strength(prompt_embeds: torch.Tensor, prompt_tokens: list[set[int]], concept_embeds: torch.Tensor,
                       concept_tokens: list[set[int]], metric: str) -> torch.Tensor:
    """γ of each prompt (infer_spm.py l.28-51, l.135): the largest, over the erased concepts, of
    max(cos(E(p), E(c)) on the flattened (L × d) encoder outputs, |T(p) ∩ T(c)| / |T(c)|) (the terms ``metric``
    names). ``prompt_embeds`` (B, L, d), ``concept_embeds`` (C, L, d); returns (B,)."""
    scores = []
    if "clipcos" in metric:
        p = prompt_embeds.float().flatten(1)[:, None]
        c = concept_embeds.float().to(p.device).flatten(1)[None]
        scores.append(F.cosine_similarity(p, c, dim=-1).cpu())
    if "tokenuni" in metric:
        scores.append(torch.tensor([[len(pt & ct) / len(ct) if ct else 0.0 for ct in concept_tokens]
                                    for pt in prompt_tokens], dtype=torch.float32))
    per_concept = torch.stack(scores).amax(dim=0)  # (B, C): the larger metric
    return per_concept.amax(dim=1)


# ----------------------------------------------------------------------------------------------- the method

@register("spm")
class SPM(AdapterMethod):
    Config = SPMConfig
    default_params = "none"  # only the membrane is trained (conf/method/spm.yaml)
    supports_teacher_bank = False  # z is sampled by the model being trained (sampler=student), one draw at a time

    @classmethod
    def validate(cls, cfg: SPMConfig) -> None:
        super().validate(cfg)
        for key, allowed in (("sampler", ("student", "teacher")), ("query_timestep", ("code", "ddim")),
                             ("anchor_rows", ("code", "all")), ("lr_scheduler", ("cosine_with_restarts", "constant")),
                             ("matching_metric", METRICS)):
            if getattr(cfg, key) not in allowed:
                raise UserError(f"method.{key} must be one of {', '.join(allowed)}, got '{getattr(cfg, key)}'")
        if cfg.ddim_steps < 2:
            raise UserError(f"method.ddim_steps must be at least 2, got {cfg.ddim_steps}")
        # rank, anchors, la_strength, lr_warmup_steps, lr_scheduler_num_cycles, anchor_scale and transport_power: their
        # ranges are erasure/schema.py's (checked with every config)
        if not cfg.containers:
            raise UserError("method.containers must name at least one module class (the code's: Transformer2DModel)")

    @staticmethod
    def concept_settings(concept) -> SPMConcept:
        return concept_section(concept, "spm", SPMConcept)

    @classmethod
    def validate_concept(cls, concept) -> None:
        settings = cls.concept_settings(concept)
        n = len(concept.get("targets") or [])
        for key in ("neutral", "positive"):
            given = getattr(settings, key)
            if given and len(given) not in (1, n):
                raise UserError(f"concept.spm.{key} has {len(given)} prompts for {n} targets: give one for all "
                                "targets or one per target")

    @classmethod
    def per_target(cls, concept) -> tuple[list[str], list[str], list[str]]:
        """(targets, positives, neutrals), one of each per target (the official prompt pairs)."""
        settings = cls.concept_settings(concept)
        targets = [str(t) for t in concept.targets]

        def spread(values, default):
            values = [str(v) for v in values] or default
            return values * len(targets) if len(values) == 1 else values

        return targets, spread(settings.positive, targets), spread(settings.neutral, [""])

    @classmethod
    def build_adapters(cls, cfg: SPMConfig, models, concept, generator: torch.Generator) -> list[AdapterSet]:
        layers = layers_inside(models.unet, cfg.containers)
        if not layers:
            raise UserError(f"this UNet has no Linear/Conv2d layer inside {', '.join(cfg.containers)} "
                            "(method.containers): nothing to put a membrane on")
        gate = dict(method="spm", concepts=[str(t) for t in concept.targets], metric=cfg.matching_metric,
                    power=float(cfg.transport_power)) if cfg.transport else None
        return [attach(models.unet, SET, layers, cfg.rank, cfg.alpha, gate=gate, generator=generator)]

    @classmethod
    def gate(cls, models, prompts: list[str], prompt_embeds: torch.Tensor, settings: dict) -> torch.Tensor:
        """Facilitated transport: the membrane's multiplier for each prompt, γ ** power (module docstring)."""
        concepts = [str(c) for c in settings["concepts"]]
        gamma = transport_strength(prompt_embeds, token_sets(models.tokenizer, prompts), models.encode_text(concepts),
                                   token_sets(models.tokenizer, concepts), str(settings["metric"]))
        return gamma ** float(settings["power"])

    def __init__(self, cfg: SPMConfig, ctx):
        super().__init__(cfg, ctx)
        self.targets, positives, neutrals = self.per_target(ctx.concept)
        self.emb_uncond = ctx.embed([""])  # prompt.yaml l.4: unconditional ""
        self.emb_targets = ctx.embed(self.targets)
        self.emb_positive = ctx.embed(positives)
        self.emb_neutral = ctx.embed(neutrals)
        sides = tuple(ctx.models.latent_shape[1:])
        if cfg.dynamic_resolution and any(side % 8 for side in sides):
            raise UserError(f"method.dynamic_resolution draws eighths of each latent side, and this model's are "
                            f"{sides[0]} x {sides[1]}: set method.dynamic_resolution=false")

    def latent_shape(self) -> tuple[int, int, int]:
        """z's shape: the model's, or with dynamic resolution each side k/8 of it, k ~ U{4..7}, height then width
        (train_util.py l.645-646)."""
        channels, height, width = self.ctx.models.latent_shape
        if not self.cfg.dynamic_resolution:
            return channels, height, width
        return channels, height * self.ctx.randint(4, 8) // 8, width * self.ctx.randint(4, 8) // 8

    def _student(self, x, t, e):
        return student_eps(self.ctx.unet, x, t, e)

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        ctx, cfg = self.ctx, self.cfg
        i = ctx.randint(0, len(self.targets))  # train_spm.py l.146-148: a random prompt pair
        k = ctx.randint(1, cfg.ddim_steps)  # l.150-152: torch.randint(1, max_denoising_steps)
        x_T = ctx.randn(1, *self.latent_shape())  # l.158-173: (dynamic) resolution, then the initial latents
        target = self.emb_targets[i: i + 1]
        sampler = self._student if cfg.sampler == "student" else ctx.teacher
        z, at = sample_to_step(sampler, ctx.models.scheduler, x_T, [self.emb_uncond, target], k, cfg.ddim_steps,
                               cfg.sample_guidance)  # l.175-188
        t = code_timestep(k, cfg.ddim_steps, int(ctx.models.scheduler.config.num_train_timesteps)) \
            if cfg.query_timestep == "code" else int(at)
        t = torch.tensor(t, device=ctx.device)
        positive, neutral = eps_all(ctx.teacher, z, t, [self.emb_positive[i: i + 1], self.emb_neutral[i: i + 1]])
        erase = erase_loss(self._student(z, t, target), positive, neutral, cfg.erase_guidance)  # l.196-233, l.274
        if not cfg.latent_anchoring:
            return {"loss": erase, "erase": erase}
        anchors = sample_anchors(target, cfg.anchors, ctx.generator, tuple(cfg.anchor_scale))  # l.239
        conds = anchor_conditions(anchors, self.emb_uncond, cfg.anchor_rows)
        zs = z.expand(conds.shape[0], *z.shape[1:])  # l.249: the same z for every anchor
        with torch.no_grad():
            base = ctx.teacher(zs, t, conds)  # l.254-262: the model without the membrane
        anchor = anchoring_loss(self._student(zs, t, conds), base)  # l.244-252
        return {"loss": erase + cfg.la_strength * anchor, "erase": erase, "anchor": anchor}

    def lr_factor(self, step: int) -> float:
        if self.cfg.lr_scheduler == "constant":
            return 1.0
        return cosine_restarts_factor(step - 1, self.cfg.lr_warmup_steps, int(self.ctx.cfg.trainer.iterations),
                                      self.cfg.lr_scheduler_num_cycles)
