"""Ablating Concepts in Text-to-Image Diffusion Models (Kumari, Zhang, Wang, Shechtman, Zhang, Zhu; ICCV 2023).

Official code: nupurkmr9/concept-ablation, ``diffusers/train.py`` (+ ``diffusers/utils.py`` for the dataset).
Model-based variant (``--loss_type_reverse model-based``, its default):

* anchor images: the frozen base model generates ``num_class_images`` images from the anchor prompts
  (train.py, "Generating class images"); we keep their latents (see baselines/common.py);
* each training example is an anchor image x with its anchor prompt c*; its *target caption* c is the
  anchor prompt rewritten to name the concept (utils.py, ``CustomDiffusionDataset.__getprompt__``: style ->
  "<anchor>, in the style of <target>", object -> anchor word replaced by the target word, memorization ->
  the target caption alone; we call the last one ``caption``);
* z_t = add_noise(x, eps, t), t ~ U{0..999} per example;
* ablation loss: MSE(eps_theta(z_t, c), sg[eps_theta(z_t, c*)]), the target from the *current* model;
  train.py averages it as ``(loss * mask).sum([1,2,3]) / mask.sum([1,2,3])`` with a one-channel mask, i.e.
  the squared error summed over the 4 latent channels and averaged over space. Our anchors have no crop
  augmentation, so the mask is all ones and the term is C x the element mean; we keep that scale;
* prior preservation (``--with_prior_preservation``): a second half-batch of anchor images with their
  anchor prompts and the plain denoising loss MSE(eps_theta(z_t, c*), eps), weighted by ``prior_loss_weight``;
* AdamW (weight decay 1e-2, eps 1e-8), gradient norm clipped at 1.0, constant lr; with ``--scale_lr`` the
  lr is multiplied by the batch size (x gradient accumulation x GPUs), and by 2 with prior preservation.

Our defaults are the nudity recipe quoted in the project's issue 5 (see conf/method/ablating.yaml). The
style/object recipe of diffusers/README.md is ``method.lr=2e-6 method.iterations=100 params=xattn_kv``.

Differences: no random resize/crop augmentation (``--noaug``) or horizontal flips; examples are drawn from
fresh random permutations of the anchor set (train.py shuffles a DataLoader, one permutation per epoch).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from erasure.errors import UserError
from erasure.method import BaseMethodConfig, ErasureMethod
from erasure.registry import register
from erasure.teacher import student_eps

from .common import generate_latents

PROMPT_MODES = ("caption", "style", "object")


@dataclasses.dataclass
class AblatingConfig(BaseMethodConfig):
    name: str = "ablating"
    iterations: int = 400  # nudity recipe (issue 5): 400 steps
    lr: float = 4e-6  # nudity recipe (issue 5): base lr 4e-6, scaled (scale_lr)
    scale_lr: bool = True  # diffusers/train.py --scale_lr: lr x batch_size (x 2 with prior preservation)
    adam_eps: float = 1e-8  # diffusers/train.py: --adam_epsilon default 1e-08
    adam_betas: tuple[float, float] = (0.9, 0.999)  # diffusers/train.py: --adam_beta1/2 defaults
    weight_decay: float = 1e-2  # diffusers/train.py: --adam_weight_decay default 1e-2
    grad_clip: float | None = 1.0  # diffusers/train.py: --max_grad_norm default 1.0
    batch_size: int = 4  # diffusers/train.py: --train_batch_size default 4 (and the README recipes)
    prior_preservation: bool = True  # diffusers/train.py: --with_prior_preservation
    prior_loss_weight: float = 1.0  # diffusers/train.py: --prior_loss_weight default 1.0
    num_anchor_images: int = 200  # diffusers/train.py: --num_class_images default 200 (paper: 1000)
    anchor_steps: int = 50  # StableDiffusionPipeline.__call__ default, as train.py calls pipeline(prompt)
    anchor_guidance: float = 7.5  # StableDiffusionPipeline.__call__ default guidance_scale


def ablation_and_prior(pred: torch.Tensor, anchor_target: torch.Tensor, pred_prior: torch.Tensor | None,
                       noise_prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The two terms of diffusers/train.py's model-based loss.

    ``pred``: eps_theta(z_t, target caption), (B, C, H, W); ``anchor_target``: eps_theta(z_t, anchor prompt)
    (detached here). Ablation term: squared error summed over channels, averaged over space and batch (the
    masked mean of train.py with an all-ones one-channel mask). Prior term: plain MSE to the true noise.
    """
    ablation = (pred.float() - anchor_target.detach().float()).pow(2).sum(dim=1).mean()
    prior = None if pred_prior is None else F.mse_loss(pred_prior.float(), noise_prior.float())
    return ablation, prior


def lr_scale(cfg: AblatingConfig) -> int:
    """diffusers/train.py with --scale_lr: x train_batch_size (x accumulation x GPUs, both 1 here), x 2 with
    prior preservation (whose half-batch doubles the examples per step)."""
    if not cfg.scale_lr:
        return 1
    return cfg.batch_size * (2 if cfg.prior_preservation else 1)


def target_prompt(mode: str, anchor_prompt: str, target: str, rng: np.random.Generator) -> str:
    """The caption that names the concept, built from an anchor prompt (utils.py, ``__getprompt__``)."""
    if mode == "caption":
        return target
    if mode == "style":
        if rng.integers(3) == 0:
            return f"{anchor_prompt}, in the style of {target}"
        return f"in {target}'s style, {anchor_prompt}"
    anchor, _, word = target.partition("+")  # object: "anchor+target", e.g. "robot+r2d2"
    return anchor_prompt.replace(anchor, word)


@register("ablating")
class Ablating(ErasureMethod):
    Config = AblatingConfig
    default_params = "attn_qkv"  # see conf/method/ablating.yaml

    def learning_rate(self) -> float:
        """With ``scale_lr`` the optimizer gets lr x lr_scale (metrics.jsonl logs it; config.yaml keeps the base)."""
        return self.cfg.lr * lr_scale(self.cfg)

    @classmethod
    def validate(cls, cfg: AblatingConfig) -> None:
        super().validate(cfg)  # batch_size, num_anchor_images >= 1: erasure/schema.py
        if cfg.prior_loss_weight < 0:
            raise UserError(f"method.prior_loss_weight must be >= 0, got {cfg.prior_loss_weight}")

    @classmethod
    def validate_concept(cls, concept) -> None:
        """The concept's ``ablating:`` section: anchor prompts, target captions and the caption mode."""
        spec = concept.get("ablating")
        if not spec or not spec.get("anchor_prompts") or not spec.get("captions"):
            raise UserError(f"concept '{concept.get('name')}' has no Ablating Concepts data: add "
                            f"ablating: {{anchor_prompts: [...], captions: [...], mode: caption|style|object}} to its yaml")
        if str(spec.get("mode", "caption")) not in PROMPT_MODES:
            raise UserError(f"concept.ablating.mode must be one of {', '.join(PROMPT_MODES)}, got '{spec.get('mode')}'")

    def __init__(self, cfg: AblatingConfig, ctx):
        super().__init__(cfg, ctx)
        spec = ctx.concept.ablating  # checked by validate_concept
        self.mode = str(spec.get("mode", "caption"))
        self.captions = [str(c) for c in spec.captions]
        self.latents, self.anchor_prompts = generate_latents(
            ctx, [str(p) for p in spec.anchor_prompts], cfg.num_anchor_images, cfg.anchor_steps, cfg.anchor_guidance)
        self.rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=ctx.generator)))
        self._order: list[int] = []
        self._emb_cache: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict:
        return {"order": list(self._order), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._order = [int(i) for i in state["order"]]
        self.rng.bit_generator.state = state["rng"]

    def _next_index(self) -> int:
        if not self._order:
            self._order = torch.randperm(len(self.latents), generator=self.ctx.generator).tolist()
        return self._order.pop()

    def _embed(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._emb_cache]
        if missing:
            for t, e in zip(missing, self.ctx.embed(missing)):
                self._emb_cache[t] = e
        return torch.stack([self._emb_cache[t] for t in texts])

    def _noised(self, idx: list[int]):
        ctx = self.ctx
        x0 = self.latents[idx]
        noise = ctx.randn(*x0.shape)
        sched = ctx.models.scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=ctx.generator).to(ctx.device)
        return sched.add_noise(x0, noise, t), noise, t

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg, ctx = self.cfg, self.ctx
        idx = [self._next_index() for _ in range(cfg.batch_size)]
        anchors = [self.anchor_prompts[i] for i in idx]
        # several captions cycle with the example index, as utils.py does with ';'-separated targets
        captions = [target_prompt(self.mode, a, self.captions[i % len(self.captions)], self.rng)
                    for a, i in zip(anchors, idx)]
        z, _, t = self._noised(idx)
        emb_anchor, emb_caption = self._embed(anchors), self._embed(captions)
        with torch.no_grad():
            anchor_target = student_eps(ctx.unet, z, t, emb_anchor)  # sg[eps_theta(z_t, c*)]: current model
        if cfg.prior_preservation:
            pidx = [self._next_index() for _ in range(cfg.batch_size)]
            zp, noise_p, tp = self._noised(pidx)
            emb_p = self._embed([self.anchor_prompts[i] for i in pidx])
            both = student_eps(ctx.unet, torch.cat([z, zp]), torch.cat([t, tp]), torch.cat([emb_caption, emb_p]))
            pred, pred_prior = both[:len(idx)], both[len(idx):]
        else:
            pred, pred_prior, noise_p = student_eps(ctx.unet, z, t, emb_caption), None, None
        ablation, prior = ablation_and_prior(pred, anchor_target, pred_prior, noise_p)
        if prior is None:
            return {"loss": ablation, "ablation": ablation}
        return {"loss": ablation + cfg.prior_loss_weight * prior, "ablation": ablation, "prior": prior}
