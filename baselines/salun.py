"""SalUn: saliency unlearning (Fan, Liu, Zhang, Wong, Wei, Liu; ICLR 2024, "SalUn: Empowering Machine Unlearning via
Gradient-based Weight Saliency in Both Image Classification and Generation"). Official code: OPTML-Group/Unlearn-Saliency
at commit a6e89fd17ff737c24c6aa16c9574469a234ffd91, its Stable Diffusion part ``SD/``, cited below by file and line:
``SD/train-scripts/generate_mask.py`` ("mask.py"), ``SD/train-scripts/random_label.py`` ("rl.py", objects/classes),
``SD/train-scripts/nsfw_removal.py`` ("nsfw.py", nudity), ``SD/train-scripts/dataset.py``, ``SD/README.md`` and the
LDM loss they call (``SD/ldm/models/diffusion/ddpm.py``).

The method, as the code runs it:

* **Data.** D_f, images of the concept with their forgetting caption c_f; D_r, images that must survive with their own
  captions. Nudity (README l.64): 800 SD v1.4 generations of "a photo of a nude person" (D_f) and 800 of "a photo of a
  person wearing clothes" (D_r). Classes: Imagenette photographs, c = "an image of a <class>" (dataset.py l.127), D_f
  the class's images (l.156-164), D_r every other class's (l.144-153). Here both sets are the base model's generations
  of the concept yaml's prompts (``salun:`` section), kept as latents and cached on disk (baselines/common.py,
  :func:`baselines.common.cached_latents`).
* **Saliency mask** (mask.py l.8-108; the nudity variant l.111-211 is the same computation): one pass over D_f in
  batches of 8 (l.33-69; ``--epochs`` l.240-241 is never read), t ~ U{0..999}, x_t = q_sample(x_0, t, ε) (l.50-55),
  the guided prediction ε̂ = (1 + w) ε_θ(x_t, c_f) − w ε_θ(x_t, ∅) with w = ``c_guidance`` 7.5 (l.57-60, l.226-231),
  the forgetting loss ℓ_f = −MSE(ε, ε̂) (l.62), back-propagated into *every* UNet weight (l.29-31, l.66-69: the
  gradients of the batches summed). Saliency is |Σ ∇ℓ_f| (l.71-73); the mask keeps the int(0.5 N) weights of largest
  saliency over the whole UNet at once (one global ranking, not per tensor: l.78-107, N = all UNet weights).
* **Unlearning** (rl.py l.65-143; nsfw.py l.87-164): per step a batch of 8 from D_f in order and one from D_r
  (shuffled for classes, dataset.py l.152; the retain iterator restarts each epoch, rl.py l.67),

      L = MSE(ε_θ(x_t, c_f), sg[ε_θ(x_t, c_p)]) + α MSE(ε_θ(x'_t, c_r), ε')                  (rl.py l.111-128)

  x_t the forget batch noised (one t and ε for both branches: l.111-120), c_p a pseudo caption (classes: the *next*
  class's caption, (k + 1) mod 10, l.80-83; nudity: the retain prompt, nsfw.py l.104), the target from the model being
  trained, detached (l.123); the second term LDM's plain denoising loss on the retain batch (``shared_step``, own t and
  ε: ddpm.py l.1093-1101, l.1286-1316 with ``logvar`` 0 and ``original_elbo_weight`` 0). After ``backward`` every
  gradient is multiplied by the mask (rl.py l.132-137), then Adam steps (l.56, l.139).

The two SD recipes (objects: rl.py via README l.25; nudity: nsfw.py via README l.78) compute the same loss and the same
mask; they differ in data (which pseudo and retain captions, which is per concept here: the concept yaml's ``salun:``
section) and in two numbers: α (README l.25 ``--alpha 0.5`` for classes; nsfw.py l.222-228 default 0.1, README l.78
passes none) and epochs (5, README l.25 = rl.py l.239; 1, nsfw.py l.236-237). The defaults are the object recipe
(the toy world's concept is an object); the nudity recipe is ``method.alpha=0.1 method.iterations=100``.

How it runs here:

* *the mask* is computed once, in the constructor (before any optimizer step, on the base weights), with the
  method's generator (timesteps and noise, batch by batch: t then ε), over every UNet weight as the code does, whatever
  ``params=`` trains (default ``full``, README ``--train_method full``); the trained tensors' slices are applied as a
  gradient hook on each trained parameter (the code's ``p.grad *= mask`` between ``backward`` and ``step``), so a
  masked weight gets a zero gradient. With AdamW and no weight decay (the code's Adam has none) a weight whose gradient
  is always zero never moves; a weight decay would move it, so it is refused with the mask. The mask is part of the
  method's state (:meth:`SalUn.state_dict`): a resumed run recomputes it in the constructor and then replaces it by the
  saved one, so it continues with exactly the mask it started with (recomputation is deterministic on a CPU; on a GPU
  summed gradients may round differently). Its kept fraction is logged and recorded as the loss term ``mask_kept``.
* *ties*: the code ranks with ``argsort`` (an unspecified order among equal saliencies); we keep exactly int(f N)
  weights, ties at the threshold broken by position (UNet parameter order, then element order).
* *steps*: ``iterations`` counts optimizer steps; an epoch is ceil(num_forget_images / batch_size) steps (the forget
  batches in order, the last one smaller as a DataLoader without drop_last makes it). Default 5 epochs of 100 steps.
* *generation*: the README does not say how the 800 images were sampled; the repository's own generation script
  (``SD/eval-scripts/generate-images.py``) samples 100 steps at guidance 7.5 (l.21-23, l.214-220, l.242-248) with an
  LMS scheduler (l.86-91): we take its steps and guidance and the model's own scheduler, as every method here does
  (:func:`erasure.generation.generate`). The sets are generated from their own seeds (``image_seed`` for D_f,
  ``image_seed`` + 1 for D_r), not from the training seed: the official sets are made once and shared by every run,
  and so are ours (``cache_dir``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import weakref

import torch
import torch.nn.functional as F

from erasure.config import concept_section
from erasure.errors import UserError
from erasure.method import BaseMethodConfig, ErasureMethod
from erasure.registry import register
from erasure.teacher import student_eps

from .common import cached_latents

log = logging.getLogger(__name__)

FLOAT_INF_BITS = 0x7F800000  # int32 bit pattern of +inf: non-negative floats order as their bit patterns do


@dataclasses.dataclass
class SalUnConfig(BaseMethodConfig):
    name: str = "salun"
    # object recipe (SD/README.md l.25: random_label.py --train_method full --alpha 0.5 --lr 1e-5 --epochs 5):
    # 5 epochs x 100 steps (800 forget images / batch 8); the nudity recipe (README l.78, nsfw_removal.py) runs 1 epoch
    iterations: int = 500
    lr: float = 1e-5  # README l.25 --lr 1e-5 (random_label.py l.241-247 default; nsfw_removal.py l.240-245 default)
    adam_eps: float = 1e-8  # torch.optim.Adam's default (random_label.py l.56, nsfw_removal.py l.73)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # torch.optim.Adam's default (same lines)
    weight_decay: float = 0.0  # torch.optim.Adam(parameters, lr=lr): no weight decay (same lines)
    grad_clip: float | None = None  # no clipping (random_label.py l.128-139)
    alpha: float = 0.5  # retain weight; README l.25 --alpha 0.5 (random_label.py l.224-230 and nsfw_removal.py l.222-228 default 0.1)
    batch_size: int = 8  # random_label.py l.232-237; nsfw_removal.py l.229-235
    use_mask: bool = True  # README l.25/l.78 pass --mask_path; false = the code without it (random_label.py l.58, l.132)
    mask_threshold: float = 0.5  # fraction of UNet weights kept: generate_mask.py l.78 (threshold_list = [0.5]), l.87
    mask_guidance: float = 7.5  # w of the forgetting loss's guided prediction: generate_mask.py l.226-231 (--c_guidance)
    mask_batch_size: int = 8  # generate_mask.py l.233-238 (--batch_size)
    num_forget_images: int = 800  # README l.64: 800 images as D_f
    num_retain_images: int = 800  # README l.64: another 800 images as D_r
    image_steps: int = 100  # SD/eval-scripts/generate-images.py l.23, l.242-248 (--ddim_steps default 100)
    image_guidance: float = 7.5  # SD/eval-scripts/generate-images.py l.21, l.214-220 (--guidance_scale default 7.5)
    image_seed: int = 0  # ours: D_f from this seed, D_r from seed + 1 (the code makes its sets once, for every run)
    cache_dir: str = "outputs/cache"  # ours: <cache_dir>/latents/ keeps the generated sets (relative: to the repository)


@dataclasses.dataclass
class SalUnConcept:
    """The concept yaml's ``salun:`` section."""

    forget_prompts: list[str] = dataclasses.field(default_factory=list)  # D_f's prompts = c_f; empty: concept.targets
    pseudo_prompts: list[str] = dataclasses.field(default_factory=list)  # c_p: one for all or one per forget prompt
    retain_prompts: list[str] = dataclasses.field(default_factory=list)  # D_r's prompts = c_r


# ------------------------------------------------------------------------------------------- formulas (pure)


def forgetting_loss(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    """The loss whose gradient makes the saliency (generate_mask.py l.60-62): −MSE(ε, (1 + w) ε_c − w ε_∅)."""
    guided = (1 + guidance) * eps_cond.float() - guidance * eps_uncond.float()
    return -F.mse_loss(guided, noise.float())


def unlearning_losses(pred_forget: torch.Tensor, pseudo_target: torch.Tensor, pred_retain: torch.Tensor,
                      noise_retain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(forget term MSE(ε_θ(x_t, c_f), sg[ε_θ(x_t, c_p)]), retain term MSE(ε_θ(x'_t, c_r), ε')) (random_label.py
    l.125 and l.91; the total is forget + α retain, l.128)."""
    forget = F.mse_loss(pred_forget.float(), pseudo_target.detach().float())
    retain = F.mse_loss(pred_retain.float(), noise_retain.float())
    return forget, retain


def _count_above(bits: dict[str, torch.Tensor], threshold: int) -> int:
    return int(torch.stack([(b > threshold).sum() for b in bits.values()]).sum())


@torch.no_grad()
def top_fraction_mask(saliency: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the int(fraction · N) largest entries of all tensors together (N: their total size),
    the global ranking of generate_mask.py l.84-107. Ties at the threshold are kept in order of position (the dict's
    order, then element order); the code's argsort leaves their order unspecified.

    Exact and without sorting N numbers (860M on SD v1.4): non-negative float32 values order as their int32 bit
    patterns, so a bisection over bit patterns (31 rounds of counting) finds the k-th largest value v; every entry
    above v is kept, and of those equal to v as many as k still needs.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    values = {n: s.detach().float().abs().contiguous() for n, s in saliency.items()}  # abs: -0.0 -> +0.0
    if not all(bool(torch.isfinite(v).all()) for v in values.values()):
        raise UserError("the saliency (gradient of the forgetting loss) is not finite: check the model and "
                        "method.mask_guidance")
    bits = {n: v.view(torch.int32) for n, v in values.items()}
    total = sum(v.numel() for v in values.values())
    k = int(total * fraction)  # generate_mask.py l.87: threshold_index = int(len(all_elements) * i)
    if k == 0:
        return {n: torch.zeros_like(v, dtype=torch.bool) for n, v in values.items()}
    low, high = -1, FLOAT_INF_BITS  # count(> low) = total >= k; count(> high) = 0 < k
    while high - low > 1:
        mid = (low + high) // 2
        if _count_above(bits, mid) < k:
            high = mid
        else:
            low = mid
    kth = high  # the k-th largest value's bits: count(> kth) < k <= count(>= kth)
    left = k - _count_above(bits, kth)  # ties at kth still to keep
    masks = {}
    for n, b in bits.items():
        keep = b > kth
        if left > 0:
            tied = (b == kth).flatten()
            take = tied & (tied.cumsum(0) <= left)
            left -= int(take.sum())
            keep = keep | take.view_as(keep)
        masks[n] = keep
    return masks


# -------------------------------------------------------------------------------------------------- the method


def _masking_hook(method_ref, name: str):
    """A gradient hook: the gradient times the method's current mask of ``name`` (a no-op once the method is gone)."""

    def hook(grad: torch.Tensor):
        method = method_ref()
        if method is None:  # hooks exist only for the masked names (load_state_dict keeps the same names)
            return None
        return grad * method.masks[name]

    return hook


@register("salun")
class SalUn(ErasureMethod):
    Config = SalUnConfig
    default_params = "full"  # README l.25/l.78: --train_method full (the whole UNet)

    @classmethod
    def validate(cls, cfg: SalUnConfig) -> None:
        # mask_threshold in (0, 1] (the fraction of UNet weights kept), the counts >= 1, alpha >= 0 and finite
        # guidance scales: erasure/schema.py's rules (erasure.config.validate applies them after this)
        super().validate(cfg)
        if cfg.use_mask and cfg.weight_decay != 0:
            raise UserError(f"method.weight_decay must be 0 with the saliency mask (AdamW's decay would move the weights "
                            f"the mask freezes; the official optimizer is Adam without decay), got {cfg.weight_decay}")

    @staticmethod
    def concept_settings(concept) -> SalUnConcept:
        return concept_section(concept, "salun", SalUnConcept)

    @classmethod
    def validate_concept(cls, concept) -> None:
        settings = cls.concept_settings(concept)
        if not settings.pseudo_prompts or not settings.retain_prompts:
            raise UserError(f"concept '{concept.get('name')}' has no SalUn data: add salun: {{pseudo_prompts: [...], "
                            "retain_prompts: [...]}} to its yaml (forget_prompts defaults to the targets; "
                            "baselines/salun.py says what each is)")
        forget = settings.forget_prompts or list(concept.get("targets") or [])
        if len(settings.pseudo_prompts) not in (1, len(forget)):
            raise UserError(f"concept.salun.pseudo_prompts has {len(settings.pseudo_prompts)} prompts for "
                            f"{len(forget)} forget prompts: give one for all or one per forget prompt")

    @classmethod
    def prompts(cls, concept) -> tuple[list[str], list[str], list[str]]:
        """(forget prompts, the pseudo prompt of each forget prompt, retain prompts)."""
        s = cls.concept_settings(concept)
        forget = [str(p) for p in (s.forget_prompts or concept.targets)]
        pseudo = [str(p) for p in s.pseudo_prompts]
        return forget, pseudo * len(forget) if len(pseudo) == 1 else pseudo, [str(p) for p in s.retain_prompts]

    def __init__(self, cfg: SalUnConfig, ctx):
        super().__init__(cfg, ctx)
        unet_names = {n for n, _ in ctx.unet.named_parameters()}
        outside = sorted(set(ctx.trainable) - unet_names)
        if outside:
            raise UserError(f"SalUn masks UNet weights only, and params={ctx.cfg.params.name} also trains '{outside[0]}': "
                            "choose a UNet subset (its default: params=full)")
        forget_prompts, pseudo_prompts, retain_prompts = self.prompts(ctx.concept)
        self.forget, forget_of = cached_latents(ctx, forget_prompts, cfg.num_forget_images, cfg.image_steps,
                                                cfg.image_guidance, seed=cfg.image_seed, cache_dir=cfg.cache_dir)
        self.retain, self.retain_of = cached_latents(ctx, retain_prompts, cfg.num_retain_images, cfg.image_steps,
                                                     cfg.image_guidance, seed=cfg.image_seed + 1, cache_dir=cfg.cache_dir)
        self.forget_of = forget_of  # c_f of each forget image (generate: prompt i % len for image i)
        self.pseudo_of = [pseudo_prompts[i % len(forget_prompts)] for i in range(len(forget_of))]  # c_p of each
        texts = list(dict.fromkeys(["", *forget_of, *self.pseudo_of, *self.retain_of]))
        self._emb = dict(zip(texts, ctx.embed(texts)))
        self.forget_batches = math.ceil(len(self.forget) / cfg.batch_size)  # steps per epoch
        self._retain_batches: list[list[int]] = []
        self._hooks = []
        self.masks: dict[str, torch.Tensor] = {}
        if cfg.use_mask:
            full = top_fraction_mask(self.saliency(), cfg.mask_threshold)
            self.masks = {n: full[n] for n in ctx.trainable}
            kept = sum(int(m.sum()) for m in full.values())
            total = sum(m.numel() for m in full.values())
            kept_trained = sum(int(m.sum()) for m in self.masks.values())
            trained = sum(m.numel() for m in self.masks.values())
            self.kept_fraction = kept_trained / max(trained, 1)
            log.info("SalUn saliency mask: keeps %d of %d UNet weights (%.4f; threshold %g), %d of the %d trained "
                     "ones (%.4f)", kept, total, kept / total, cfg.mask_threshold, kept_trained, trained,
                     self.kept_fraction)
            ref = weakref.ref(self)
            self._hooks = [ctx.trainable[n].register_hook(_masking_hook(ref, n)) for n in self.masks]

    def __del__(self):
        self.remove_hooks()

    def remove_hooks(self) -> None:
        """Take the gradient hooks off the trained parameters (they are inert once the method is gone anyway)."""
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self._emb[t] for t in texts])

    def _noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.ctx.models.scheduler.add_noise(x0, noise, t)

    def _timesteps(self, n: int) -> torch.Tensor:
        sched = self.ctx.models.scheduler
        return torch.randint(0, sched.config.num_train_timesteps, (n,), generator=self.ctx.generator).to(self.ctx.device)

    def saliency(self) -> dict[str, torch.Tensor]:
        """|Σ over the forget batches of ∇ forgetting loss| for every UNet weight (generate_mask.py l.29-73), on the
        current (base) weights. Draws t then ε for each batch of ``mask_batch_size`` forget images, in order."""
        ctx, cfg = self.ctx, self.cfg
        params = dict(ctx.unet.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        # frozen weights held in low precision (trainer.precision on a GPU, params= a subset) get float32 sums, as the
        # code's CPU copies are (l.69); float32 weights sum in place in p.grad
        low = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items() if p.dtype != torch.float32}
        try:
            for p in params.values():
                p.requires_grad_(True)
                p.grad = None
            for start in range(0, len(self.forget), cfg.mask_batch_size):
                idx = list(range(start, min(start + cfg.mask_batch_size, len(self.forget))))
                t = self._timesteps(len(idx))
                noise = ctx.randn(len(idx), *self.forget.shape[1:])
                x_t = self._noised(self.forget[idx], t, noise)
                emb = torch.cat([self._embed([self.forget_of[i] for i in idx]), self._embed([""] * len(idx))])
                eps_c, eps_u = student_eps(ctx.unet, torch.cat([x_t, x_t]), torch.cat([t, t]), emb).chunk(2)
                forgetting_loss(eps_c, eps_u, noise, cfg.mask_guidance).backward()  # gradients add up in p.grad
                for n, total in low.items():
                    if params[n].grad is not None:
                        total += params[n].grad.float()
                        params[n].grad = None
            sums = {n: low[n] if n in low else p.grad for n, p in params.items()}
            return {n: (g.detach().float().abs() if g is not None else torch.zeros_like(params[n], dtype=torch.float32))
                    for n, g in sums.items()}
        finally:
            for n, p in params.items():
                p.grad = None
                p.requires_grad_(flags[n])

    def state_dict(self) -> dict:
        return {"masks": dict(self.masks), "retain_batches": [list(b) for b in self._retain_batches]}

    def load_state_dict(self, state: dict) -> None:
        masks = state.get("masks") or {}
        if set(masks) != set(self.masks):
            raise UserError("the checkpoint's SalUn mask does not cover this run's trained parameters: resume with the "
                            "run's own config")
        self.masks = {n: m.to(self.ctx.device) for n, m in masks.items()}  # bool, as saved (safetensors keeps the dtype)
        if self.masks:
            self.kept_fraction = sum(int(m.sum()) for m in self.masks.values()) / max(1, sum(m.numel() for m in self.masks.values()))
        self._retain_batches = [[int(i) for i in b] for b in state.get("retain_batches", [])]

    def _next_retain(self, new_epoch: bool) -> list[int]:
        """The next retain batch: a fresh shuffled pass at each epoch's start (random_label.py l.67) and whenever one
        runs out (l.72-76); batches of ``batch_size``, the pass's last one smaller (DataLoader, dataset.py l.152)."""
        if new_epoch or not self._retain_batches:
            order = torch.randperm(len(self.retain), generator=self.ctx.generator).tolist()
            size = self.cfg.batch_size
            self._retain_batches = [order[i:i + size] for i in range(0, len(order), size)]
        return self._retain_batches.pop(0)

    def draw(self, step: int) -> dict:
        """Step ``step``'s randomness: its forget batch (in order), its retain batch, and t and ε for each."""
        ctx, size = self.ctx, self.cfg.batch_size
        b = (step - 1) % self.forget_batches
        forget_idx = list(range(b * size, min((b + 1) * size, len(self.forget))))
        retain_idx = self._next_retain(new_epoch=b == 0)
        shape = self.forget.shape[1:]
        t_r = self._timesteps(len(retain_idx))  # retain first, as random_label.py l.86-91 computes it first
        noise_r = ctx.randn(len(retain_idx), *shape)
        t_f = self._timesteps(len(forget_idx))
        noise_f = ctx.randn(len(forget_idx), *shape)
        return dict(forget_idx=forget_idx, t_f=t_f, noise_f=noise_f, retain_idx=retain_idx, t_r=t_r, noise_r=noise_r)

    def losses(self, d: dict) -> dict[str, torch.Tensor]:
        """The loss terms of one step's draws (module docstring; random_label.py l.86-128)."""
        ctx = self.ctx
        fi, ri = d["forget_idx"], d["retain_idx"]
        x_f = self._noised(self.forget[fi], d["t_f"], d["noise_f"])  # forget and pseudo share x_t (l.119-120)
        x_r = self._noised(self.retain[ri], d["t_r"], d["noise_r"])
        with torch.no_grad():  # sg[ε_θ(x_t, c_p)]: the model being trained, detached (l.123)
            target = student_eps(ctx.unet, x_f, d["t_f"], self._embed([self.pseudo_of[i] for i in fi]))
        emb = torch.cat([self._embed([self.forget_of[i] for i in fi]), self._embed([self.retain_of[i] for i in ri])])
        pred = student_eps(ctx.unet, torch.cat([x_f, x_r]), torch.cat([d["t_f"], d["t_r"]]), emb)
        forget, retain = unlearning_losses(pred[:len(fi)], target, pred[len(fi):], d["noise_r"])
        terms = {"loss": forget + self.cfg.alpha * retain, "forget": forget, "retain": retain}
        if self.masks:
            terms["mask_kept"] = torch.tensor(self.kept_fraction)
        return terms

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        return self.losses(self.draw(step))
