"""AdvUnlearn: Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion Models
(Zhang, Chen, Jia, Zhang, Fan, Hong, Liu; NeurIPS 2024).

Official code: OPTML-Group/AdvUnlearn @ 9d231249f9af13626e8bb9dcef5521f11d262498 (abbreviated 9d23124 below), cited
as ``AdvUnlearn.py`` (train-scripts/AdvUnlearn.py), ``attack_util.py``, ``get_loss.py`` and ``util.py``
(train-scripts/utils/). This file is our own code; differences from the official code are marked "Deviation".

ESD's erasing loss, made robust by adversarial training, in the *text encoder* by default. One iteration i
(AdvUnlearn.py l.70-199, 0-based i = our step - 1):

1. Every ``adv_prompt_update_step`` iterations (l.74): pick a target word c at random (l.80) and, from iteration
   ``warmup_iter`` on (l.91), run the attack (:func:`erasure.adversarial.soft_prompt_attack`, attack_util.py
   ``soft_prompt_attack``): ``adv_prompt_num`` = k word embeddings put after the start token of c ('prefix_k'),
   moved by Adam (``attack_lr``) for ``attack_step`` steps to minimise MSE(eps_student(z, t, E_student([adv, c])),
   eps*(z, t, c)) on a fresh z each step: the prompt with which the current student still draws the concept. The
   first attack starts from k random vocabulary words; later ones from the previous attack's embeddings
   (``attack_init: latest``) or again random (``random``).
2. The erasing loss (get_loss.py ``get_train_loss_retain``): ESD's, on the adversarial prompt (on c itself during
   the warm-up): MSE(eps_student(z, t, E_student(prompt)), eps*(z, t, ∅) - eta (eps*(z, t, c) - eps*(z, t, ∅))).
   With ``retain_train: reg`` it adds ``retain_loss_w`` x MSE(eps_student(z_r, t, E_student(r)), eps*(z_r, t, r))
   on ``retain_batch`` retain prompts r sampled at the same t (get_loss.py, the 'reg' branch).
3. One optimizer step; then with ``retain_train: iter`` (the argparse default) ``retain_step`` further steps, each on
   MSE(eps_student(z_r, t, E_student(r)), eps*(z_r, t, r)) for ``retain_batch`` retain prompts at a fresh t
   (AdvUnlearn.py l.165-195): :meth:`erasure.method.ErasureMethod.followup_loss`.

Every z, t and timestep query follows train-esd.py's CompVis recipe (``baselines/esd.py``, ``timesteps: compvis``;
AdvUnlearn uses the same ldm DDIMSampler with ``t_start=-1``, util.py ``sample_model`` l.501-526): t_enc ~ U{0..S-1},
z sampled with guidance ``start_guidance`` on the concept (retain) prompt by the *student* UNet (the ldm ``model``;
frozen when only the text encoder trains), every query at t_enc_ddpm inside the bin of t_enc. The teacher's
conditions eps*(., ∅), eps*(., c), eps*(., r) and the prompts z is sampled with are the *base* text encoder's
(``model_orig.get_learned_conditioning``); only E_student, the encoder being trained, sees the adversarial prompt.

Parameters: ``params=text_encoder_full`` (default; AdvUnlearn.py ``--train_method text_encoder_full``, util.py
``param_choices`` l.41-67: every encoder layer and the final layer norm, no embeddings); other official choices are
``params=text_encoder_layer0`` and the UNet subsets (``noxattn``, ``xattn``, ...). The delta then holds text-encoder
tensors and ``erasure.generate`` swaps them in: every prompt, the empty one of classifier-free guidance included, goes
through the trained encoder, as with the released text encoder.

Defaults are the argparse defaults (AdvUnlearn.py l.226-261). The README's nudity command differs in three
settings (``--attack_init random --retain_train reg --retain_loss_w 0.3``, README.md l.99):
``method.attack_init=random method.retain_train=reg method.retain_loss_w=0.3``.

Deviations: (a) the prompt's length for the prefix split is counted in tokens (attack_util.py ``split_id`` counts
words, ``len(word.split())``, which cuts a multi-token word; equal for "nudity"); (b) retain prompts are drawn
without replacement from the method's seeded generator (the official PromptDataset draws with Python's ``random``);
(c) the attack's e_0 = eps*(z, t, ∅), computed and never used in attack_util.py, is not computed.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from erasure.adversarial import SoftPrompt, random_prefix, soft_prompt, soft_prompt_attack
from erasure.config import concept_section
from erasure.errors import UserError
from erasure.method import BaseMethodConfig, ErasureMethod
from erasure.registry import register
from erasure.teacher import student_eps

from .esd import compvis_draw, compvis_sample

RETAIN_TRAIN = ("iter", "reg")
ATTACK_INIT = ("latest", "random")
ATTACK_METHODS = ("pgd", "fast_at")


@dataclasses.dataclass
class AdvUnlearnConfig(BaseMethodConfig):
    name: str = "advunlearn"
    iterations: int = 1000  # AdvUnlearn.py l.249: --iterations 1000
    lr: float = 1e-5  # l.251: --lr default 1e-5 (declared type=int, so only the default is usable there)
    adam_eps: float = 1e-8  # torch.optim.Adam default (AdvUnlearn.py l.62: torch.optim.Adam(parameters, lr=lr))
    adam_betas: tuple[float, float] = (0.9, 0.999)  # torch.optim.Adam default
    weight_decay: float = 0.0  # torch.optim.Adam: no weight decay
    grad_clip: float | None = None  # no clipping
    eta: float = 1.0  # l.227: --negative_guidance 1
    start_guidance: float = 3.0  # l.226: --start_guidance 3
    ddim_steps: int = 50  # l.234: --ddim_steps 50
    retain_train: str = "iter"  # l.241: --retain_train 'iter' (README's nudity command: 'reg')
    retain_step: int = 1  # l.242: --retain_step 1 (retain_train iter)
    retain_batch: int = 5  # l.240: --retain_batch 5
    retain_loss_w: float = 1.0  # l.243: --retain_loss_w 1.0 (retain_train reg; README's nudity command: 0.3)
    attack_method: str = "pgd"  # l.247: --attack_method 'pgd' ('fast_at': Adam on the gradient's sign)
    adv_prompt_num: int = 1  # l.254: --adv_prompt_num 1 (k adversarial word embeddings)
    attack_init: str = "latest"  # l.257: --attack_init 'latest' (README's nudity command: 'random')
    attack_step: int = 30  # l.258: --attack_step 30
    attack_lr: float = 1e-3  # l.260: --attack_lr 1e-3
    warmup_iter: int = 200  # l.261: --warmup_iter 200 (no attack before this iteration)
    adv_prompt_update_step: int = 1  # l.259: --adv_prompt_update_step 1 (a new attack every iteration)
    # Only the official defaults are built: attack_type 'prefix_k' (l.256), attack_embd_type 'word_embd' (l.255).


@dataclasses.dataclass
class AdvUnlearnConcept:
    """The concept yaml's ``advunlearn:`` section: the retain prompts (the official default is the COCO object set,
    ``--dataset_retain coco_object``, data/prompts/train/coco_object_retain.csv). ``retain_prompts`` lists them, or
    ``retain_file`` names a CSV (relative to the repository) with a ``prompt`` column."""

    retain_prompts: list[str] = dataclasses.field(default_factory=list)
    retain_file: str | None = None


def retain_prompts(concept) -> list[str]:
    """The concept's retain prompts (``advunlearn:`` section), refused in one sentence when there are none."""
    section = concept_section(concept, "advunlearn", AdvUnlearnConcept)
    prompts = [str(p) for p in section.retain_prompts]
    if section.retain_file:
        path = Path(section.retain_file)
        if not path.is_absolute():
            path = Path(__file__).resolve().parent.parent / path
        if not path.is_file():
            raise UserError(f"concept.advunlearn.retain_file '{section.retain_file}' does not exist: give a CSV with a "
                            "'prompt' column, relative to the repository")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "prompt" not in rows[0]:
            raise UserError(f"concept.advunlearn.retain_file '{section.retain_file}' has no 'prompt' column")
        prompts += [r["prompt"] for r in rows]
    if not prompts:
        raise UserError(f"method advunlearn needs retain prompts: add `advunlearn: {{retain_prompts: [...]}}` (or "
                        f"retain_file) to the concept yaml of '{concept.name}'")
    return prompts


def esd_target(teacher_u: torch.Tensor, teacher_c: torch.Tensor, eta: float) -> torch.Tensor:
    """eps*(z, ∅) - eta (eps*(z, c) - eps*(z, ∅)): get_loss.py's erasing target."""
    return teacher_u - eta * (teacher_c - teacher_u)


@register("advunlearn")
class AdvUnlearn(ErasureMethod):
    Config = AdvUnlearnConfig
    default_params = "text_encoder_full"

    @classmethod
    def validate(cls, cfg: AdvUnlearnConfig) -> None:
        super().validate(cfg)
        for key, allowed in (("retain_train", RETAIN_TRAIN), ("attack_init", ATTACK_INIT),
                             ("attack_method", ATTACK_METHODS)):
            if getattr(cfg, key) not in allowed:
                raise UserError(f"method.{key} must be one of {', '.join(allowed)}, got '{getattr(cfg, key)}'")
        for key in ("retain_batch", "adv_prompt_num", "attack_step", "adv_prompt_update_step"):
            if getattr(cfg, key) < 1:
                raise UserError(f"method.{key} must be at least 1, got {getattr(cfg, key)}")
        for key in ("retain_step", "warmup_iter"):
            if getattr(cfg, key) < 0:
                raise UserError(f"method.{key} must be 0 or more, got {getattr(cfg, key)}")
        if cfg.ddim_steps < 2:
            raise UserError(f"method.ddim_steps must be at least 2, got {cfg.ddim_steps}")

    @classmethod
    def validate_concept(cls, concept) -> None:
        retain_prompts(concept)

    def __init__(self, cfg: AdvUnlearnConfig, ctx):
        super().__init__(cfg, ctx)
        models = ctx.models
        self.targets = [str(t) for t in ctx.concept.targets]
        self.retain = retain_prompts(ctx.concept)
        self.tokenizer = models.tokenizer
        # The base encoder's conditions (model_orig.get_learned_conditioning): the teacher's and the sampler's.
        self.emb_uncond = ctx.teacher.encode(self._ids([""]))
        self.emb_targets = ctx.teacher.encode(self._ids(self.targets))
        self.emb_retain = ctx.teacher.encode(self._ids(self.retain))
        self.word = 0  # index of the current target word (AdvUnlearn.py l.74)
        self.adv: SoftPrompt | None = None  # the current adversarial prompt (after the warm-up)
        self.attack_round = 0
        self.unseen = list(range(len(self.retain)))  # retain prompts not drawn since the last reset (PromptDataset)

    def _ids(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.ctx.device)

    def _student_text(self, ids: torch.Tensor) -> torch.Tensor:
        """E_student: the text encoder as it trains (gradients reach its trained weights)."""
        return self.ctx.models.text_encoder(ids)[0].float()

    def _student_unet(self, x, t, e):
        return student_eps(self.ctx.unet, x, t, e)

    def _sample(self, emb: torch.Tensor, batch: int, draw: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, t_enc_ddpm): a CompVis draw (or ``draw``), z sampled by the student UNet with guidance start_guidance
        on ``emb``. Keeps the draw in ``self.last_draw`` (retain_train reg reuses its t_enc)."""
        draw = draw or compvis_draw(self.ctx, self.cfg.ddim_steps, batch)
        self.last_draw = draw
        z = compvis_sample(self._student_unet, self.ctx.models.scheduler, draw, self.emb_uncond, emb,
                           self.cfg.ddim_steps, self.cfg.start_guidance)
        return z, draw["query"]

    def _retain_batch(self) -> list[int]:
        """``retain_batch`` retain prompts drawn without replacement; all put back once fewer remain (PromptDataset,
        AdvUnlearn.py l.77-78 and l.169-170)."""
        if len(self.unseen) < self.cfg.retain_batch:
            self.unseen = list(range(len(self.retain)))
        n = min(self.cfg.retain_batch, len(self.unseen))
        picked = [self.unseen[int(i)] for i in torch.randperm(len(self.unseen), generator=self.ctx.generator)[:n]]
        self.unseen = [i for i in self.unseen if i not in picked]
        return picked

    def _retain_loss(self, picked: list[int], draw: dict | None = None) -> torch.Tensor:
        """MSE(eps_student(z_r, t, E_student(r)), eps*(z_r, t, r)) over the picked retain prompts, at a fresh CompVis
        draw, or at ``draw``'s t_enc and query timestep with start codes of its own (retain_train reg)."""
        emb_p = self.emb_retain[picked]
        if draw is None:
            z, t = self._sample(emb_p, len(picked))
        else:
            draw = {**draw, "x_T": self.ctx.randn(len(picked), *self.ctx.models.latent_shape)}  # get_loss.py l.313
            z, t = self._sample(emb_p, len(picked), draw)
        with torch.no_grad():
            target = self.ctx.teacher(z, t.expand(len(picked)), emb_p)
        emb_n = self._student_text(self._ids([self.retain[i] for i in picked]))
        return F.mse_loss(self._student_unet(z, t.expand(len(picked)), emb_n), target)

    def attack(self) -> SoftPrompt:
        """One run of the inner attack on the current target word against the current student."""
        cfg, ctx = self.cfg, self.ctx
        emb_p = self.emb_targets[self.word: self.word + 1]

        def loss_fn(hidden: torch.Tensor) -> torch.Tensor:  # attack_util.py soft_prompt_attack, the loop body
            z, t = self._sample(emb_p, 1)
            with torch.no_grad():
                target = ctx.teacher(z, t, emb_p)
            return F.mse_loss(self._student_unet(z, t, hidden), target)

        if self.adv is None or cfg.attack_init == "random":  # attack_util.py init_adv without / with attack_init_embd
            init = random_prefix(ctx.models.text_encoder, cfg.adv_prompt_num, ctx.generator)
        else:
            init = self.adv.adv
        # the attack moves only the adversarial embeddings (AdvUnlearn.py l.92-94)
        return soft_prompt_attack(ctx.models.text_encoder, self.tokenizer, self.targets[self.word], init,
                                  cfg.attack_step, cfg.attack_lr, loss_fn, method=cfg.attack_method,
                                  frozen=ctx.trainable.values())

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg, ctx = self.cfg, self.ctx
        i = step - 1  # the official 0-based iteration
        terms: dict[str, torch.Tensor] = {}
        if i % cfg.adv_prompt_update_step == 0:
            self.word = ctx.randint(0, len(self.targets))  # AdvUnlearn.py l.80: random.sample(words, 1)[0]
            if i >= cfg.warmup_iter:
                self.adv = self.attack()
                self.attack_round += 1
                terms["attack_loss"] = torch.tensor(self.adv.losses[-1])
        emb_p = self.emb_targets[self.word: self.word + 1]
        z, t = self._sample(emb_p, 1)
        draw = self.last_draw
        with torch.no_grad():
            teacher_u = ctx.teacher(z, t, self.emb_uncond)
            teacher_c = ctx.teacher(z, t, emb_p)
        if i < cfg.warmup_iter or self.adv is None:
            emb_n = self._student_text(self._ids([self.targets[self.word]]))  # warm-up: the plain word
        else:
            emb_n = self.adv.encode(ctx.models.text_encoder)  # the adversarial prompt through E_student
        unlearn = F.mse_loss(self._student_unet(z, t, emb_n), esd_target(teacher_u, teacher_c, cfg.eta).detach())
        terms["unlearn"] = unlearn
        if cfg.retain_train == "reg":  # get_loss.py: retain z at the same t_enc, its own start codes
            retain = self._retain_loss(self._retain_batch(), draw)
            terms["retain"] = retain
            terms["loss"] = unlearn + cfg.retain_loss_w * retain
        else:
            terms["loss"] = unlearn
        return terms

    def followup_steps(self, step: int) -> int:
        return self.cfg.retain_step if self.cfg.retain_train == "iter" else 0

    def followup_loss(self, step: int, index: int) -> dict[str, torch.Tensor]:
        retain = self._retain_loss(self._retain_batch())  # AdvUnlearn.py l.165-195
        return {"loss": retain, "retain": retain}

    def state_dict(self) -> dict:
        # the adversarial embeddings warm-start the next attack; their attack's loss history is logged once, when made
        return {"word": self.word, "attack_round": self.attack_round, "unseen": list(self.unseen),
                **({"adv": self.adv.adv} if self.adv is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.word = int(state["word"])
        self.attack_round = int(state["attack_round"])
        self.unseen = [int(i) for i in state["unseen"]]
        if "adv" in state:
            self.adv = soft_prompt(self.ctx.models.text_encoder, self.tokenizer, self.targets[self.word],
                                   state["adv"].to(self.ctx.device))
