"""Concept inversion (Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image Generative Models",
ICLR 2024): textual inversion against the *erased* model.

One new token embedding is learned with the erased model's own denoising loss on images of the concept: the text
encoder, UNet and VAE stay frozen, and only the token's vector moves. If the erasure only cut the concept's words
off from the concept, a new word finds it again. The attack prompts then carry that token, and success is the
concept's detector firing on the erased model's image of the attack prompt.

Official code: NYU-DICE-Lab/circumventing-concept-erasure at commit bb7034b7dfe30beeee73b5a61f50ed6938a4daf1, cited
below as ``ci.py`` (esd/concept_inversion.py, the script for ESD, which like every method here edits the UNet's
weights), ``train.sh`` (esd/train.sh) and ``generate_i2p.py`` (esd/generate_i2p.py). ci.py is the diffusers
textual-inversion example with the erased UNet loaded (ci.py:727-728). This file is our own code; differences from
the official code are marked "Deviation".

What one call does (:class:`ConceptInversion`):

1. The concept images: the *base* model's (no ``params``) final latents of the attack prompts themselves, at their
   seeds (``n_images`` of them; past the number of prompts the seeds cycle as ``seed + len(prompts) * j``).
   Deviation: the official images are made by ``generate_images.py --mode train`` (SD v1.4, random seeds, redrawn
   while SD's safety checker fires) or, for nudity, by ``generate_i2p.py``, saved as PNGs, and encoded again by the
   VAE (a draw from the latent distribution, x 0.18215, ci.py:951-952); we use the sampler's final latents (already
   scaled) directly, one code path for SD and the toy world.
2. :func:`invert`: one token vector, trained against ``models.unet`` with ``params`` swapped in. Only once per call:
   one learned token per erased model, shared by every prompt.
3. For each (prompt, seed): the attack prompt (:func:`attack_text`), its image from the erased model with the
   learned vector in place (:func:`placeholder_embedding`), the detector.

The placeholder. Deviation: the official code adds a new token to the tokenizer and grows the embedding table
(ci.py:742-765); the models here are shared, so we borrow an existing, rare token (``placeholder``, default "sks",
CLIP id 48136, the rare identifier of DreamBooth's examples) and substitute the learned vector for its embedding row
wherever its id occurs, with a forward hook on the token-embedding lookup. Its text string is what attack prompts
contain, so ``models.encode_text`` (and :func:`erasure.generation.generate`) render them with the learned vector
while the hook is on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from erasure.errors import UserError
from erasure.generation import Sampler, generate
from erasure.teacher import swapped_weights

from . import AttackResult, register_attack

OFFICIAL = "NYU-DICE-Lab/circumventing-concept-erasure@bb7034b7dfe30beeee73b5a61f50ed6938a4daf1"

# The official prompt templates (ci.py:419-474), chosen by --learnable_property (ci.py:514-519).
OBJECT_TEMPLATES = (  # ci.py:419-447 (imagenet_templates_small)
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (  # ci.py:449-469 (imagenet_style_templates_small)
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
PERSON_TEMPLATES = ("a photo portrait of {}", "a DSLR portrait of {}")  # ci.py:471-474 (person_templates_small)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES, "person": PERSON_TEMPLATES}
PROPERTIES = (*TEMPLATES, "captions")
FALLBACKS = ("prepend", "append", "template")


@dataclasses.dataclass
class Config:
    """Concept inversion's settings; every default is the official one (train.sh for ESD, ci.py's argparse)."""

    # Optimiser steps (updates). train.sh:14 --max_train_steps=5000; a step is one update after grad_accum
    # micro-batches (ci.py:949 accelerator.accumulate, global_step counts synced updates, ci.py:998-1001, and the
    # loop stops at max_train_steps, ci.py:1021). The toy world overrides this to fit a CPU budget.
    steps: int = 5000
    batch_size: int = 4  # images per micro-batch; train.sh:12 --train_batch_size=4
    # micro-batches per update (the gradient of their mean loss); train.sh:13 --gradient_accumulation_steps=4
    grad_accum: int = 4
    # Base learning rate, train.sh:15 --learning_rate=5.0e-03 with --scale_lr: the rate used is
    # lr x grad_accum x batch_size x processes (ci.py:800-803) = 5e-3 x 4 x 4 x 1 = 0.08 (one process here).
    # Constant, no warm-up (train.sh:16-17).
    lr: float = 5.0e-3
    scale_lr: bool = True
    # AdamW (ci.py:806-812) with the argparse defaults betas (0.9, 0.999), weight decay 1e-2, eps 1e-8
    # (ci.py:284-287). The official optimiser holds the whole embedding table and then restores every row but the
    # placeholder's (ci.py:988-995): the same as AdamW on the one vector, which is what we do.
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    initializer: str = "art"  # the vector starts as this token's embedding (ci.py:762-765); train.sh:10 "art"
    placeholder: str = "sks"  # the borrowed token (see the module docstring); must be one CLIP token
    # Training prompts: the templates of --learnable_property (ci.py:514-519; train.sh:9 "style"), one drawn per
    # image (ci.py:534), or "captions": the image's own attack prompt (the I2P route, --i2p: caption "{} " + the I2P
    # prompt, ci.py:599 and 631, i.e. the placeholder prepended, as `attack_text` does with fallback "prepend").
    learnable_property: str = "style"
    templates: list[str] | None = None  # overrides learnable_property's templates (e.g. ["a {}"] for the toy world)
    # The attack prompt (attack_text): each whole-word, case-insensitive occurrence of these words in the prompt is
    # replaced by the placeholder (e.g. ["circle"]; for nudity e.g. ["nude", "naked"]). A prompt with none of them
    # gets the placeholder by `fallback`: "prepend" (default: the official I2P attack, "<token> " + prompt, the
    # intent of generate_i2p.py:41-44, whose committed condition is inverted and line 44 unclosed; and its
    # captions, ci.py:599), "append" (prompt + " <token>") or "template" (the prompt
    # is replaced by the first training template with the placeholder, e.g. "a painting in the style of <token>";
    # the official object/style attack prompts are typed by hand, generate_images.py --prompt, esd/README.md).
    # The official attack keeps the concept's words (concept_words empty).
    concept_words: list[str] = dataclasses.field(default_factory=list)
    fallback: str = "prepend"
    n_images: int = 25  # images of the concept to invert on; train.sh:21 --num_train_images=25 (ci.py:499)
    flip_p: float = 0.5  # random horizontal flip of each training image (ci.py:485, 521, 561)
    seed: int = 0  # seeds the torch.Generator of every draw (images, flips, timesteps, noise)

    def __post_init__(self):
        for key in ("steps", "batch_size", "grad_accum", "n_images"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"concept_inversion.{key} must be a positive integer, got {value!r}")
        for key in ("lr", "adam_eps"):
            if not float(getattr(self, key)) > 0:
                raise UserError(f"concept_inversion.{key} must be positive, got {getattr(self, key)!r}")
        if not float(self.weight_decay) >= 0:
            raise UserError(f"concept_inversion.weight_decay must be >= 0, got {self.weight_decay!r}")
        for key in ("adam_beta1", "adam_beta2", "flip_p"):
            if not 0 <= float(getattr(self, key)) <= 1:
                raise UserError(f"concept_inversion.{key} must lie in [0, 1], got {getattr(self, key)!r}")
        if self.learnable_property not in PROPERTIES:
            raise UserError(f"concept_inversion.learnable_property must be one of {', '.join(PROPERTIES)}, "
                            f"got {self.learnable_property!r}")
        if self.fallback not in FALLBACKS:
            raise UserError(f"concept_inversion.fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")
        if self.templates is not None:
            if not list(self.templates) or any(str(t).count("{}") != 1 for t in self.templates):
                raise UserError(f"concept_inversion.templates must be a non-empty list of strings with exactly one "
                                f"'{{}}' each (the placeholder's place), got {self.templates!r}")
        if self.fallback == "template" and self.templates is None and self.learnable_property == "captions":
            raise UserError("concept_inversion.fallback 'template' needs templates (or a learnable_property other "
                            "than 'captions')")
        for key in ("placeholder", "initializer"):
            word = getattr(self, key)
            if not isinstance(word, str) or not word.strip() or len(word.split()) != 1:
                raise UserError(f"concept_inversion.{key} must be one word, got {word!r}")
        if any(not isinstance(w, str) or not w.strip() for w in self.concept_words):
            raise UserError(f"concept_inversion.concept_words must be non-empty strings, got {self.concept_words!r}")

    @property
    def effective_lr(self) -> float:
        """The rate the optimiser uses: lr x grad_accum x batch_size with scale_lr (ci.py:800-803, one process)."""
        return float(self.lr) * (self.grad_accum * self.batch_size if self.scale_lr else 1)

    def training_templates(self) -> tuple[str, ...] | None:
        """The templates training prompts are drawn from (None: each image's own attack prompt, "captions")."""
        if self.templates is not None:
            return tuple(self.templates)
        return TEMPLATES.get(self.learnable_property)


def single_token_id(tokenizer, word: str, key: str) -> int:
    """The id of ``word`` if the tokenizer makes it exactly one (non-special) token, else a UserError (the official
    check for the initializer, ci.py:750-753)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] in set(tokenizer.all_special_ids):
        raise UserError(f"concept_inversion.{key} {word!r} must be one ordinary token of the tokenizer "
                        f"(it gives {len(ids)} ids: {ids}): choose another word")
    return int(ids[0])


@contextlib.contextmanager
def placeholder_embedding(models, token_id: int, vector: torch.Tensor):
    """While active, the text encoder sees ``vector`` (d) as the embedding of token ``token_id`` wherever that id
    occurs; every other row is the table's own and nothing is written into the table. Gradients reach ``vector``.
    ``models``: a :class:`erasure.models.Models` (or the text encoder itself)."""
    encoder = getattr(models, "text_encoder", models)
    lookup = encoder.get_input_embeddings()

    def hook(module, args, kwargs, out):
        ids = args[0] if args else kwargs["input"]
        mask = (ids == token_id).unsqueeze(-1)
        return torch.where(mask, vector.to(device=out.device, dtype=out.dtype), out)

    handle = lookup.register_forward_hook(hook, with_kwargs=True)
    try:
        yield encoder
    finally:
        handle.remove()


def attack_text(prompt: str, placeholder: str, cfg: Config) -> str:
    """The attack prompt: ``cfg.concept_words`` replaced by ``placeholder`` (whole words, any case), else the
    placeholder placed by ``cfg.fallback`` (see :class:`Config`)."""
    words = sorted({w.strip() for w in cfg.concept_words}, key=len, reverse=True)  # longest first: phrases win
    if words:
        pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)
        text, n = pattern.subn(placeholder, prompt)
        if n:
            return text
    if cfg.fallback == "prepend":
        return f"{placeholder} {prompt}".strip()
    if cfg.fallback == "append":
        return f"{prompt} {placeholder}".strip()
    return cfg.training_templates()[0].format(placeholder)


def concept_draws(prompts: Sequence[str], seeds: Sequence[int], n: int) -> tuple[list[str], list[int]]:
    """The (prompt, seed) of each of the n concept images: the prompts in order, again and again, the j-th time
    round with seed + len(prompts) * j."""
    k = len(prompts)
    return [prompts[i % k] for i in range(n)], [int(seeds[i % k]) + k * (i // k) for i in range(n)]


def tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """The 77-id sequences SD's text encoder sees (padded as :meth:`erasure.models.Models.encode_text` pads)."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def denoising_loss(models, x0: torch.Tensor, input_ids: torch.Tensor, timesteps: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """The textual-inversion loss (ci.py:950-980) of one batch: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (the
    DDPM forward process, ci.py:964, with the model's training schedule), the UNet's prediction from the text
    encoder's states of ``input_ids`` (a placeholder hook, if on, applies), mean squared error to the noise (or to
    the velocity for a v-prediction model, ci.py:973-978). Batched: x0, noise B x C x h x w; input_ids B x 77."""
    device = x0.device
    abar = models.scheduler.alphas_cumprod.to(device, torch.float32)[timesteps.to(device)].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    hidden = models.text_encoder(input_ids.to(device))[0].float()  # ci.py:967 (no torch.no_grad: encode_text has it)
    pred = models.unet(x_t, timesteps.to(device), encoder_hidden_states=hidden).sample.float()
    kind = models.scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    else:
        raise UserError(f"concept inversion: unknown prediction type {kind!r} of the model's scheduler")
    return F.mse_loss(pred, target.float(), reduction="mean")  # ci.py:980


@dataclasses.dataclass
class Inversion:
    """What :func:`invert` learned."""

    vector: torch.Tensor  # the learned token embedding (d), float32, detached
    token_id: int  # the borrowed token it replaces
    losses: list[float]  # per update: the mean of its micro-batches' losses
    unet_evals: int  # UNet forward passes (each with a backward): steps x grad_accum x batch_size samples
    seconds: float


def invert(models, latents: torch.Tensor, captions: Sequence[str], cfg: Config,
           params: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None) -> Inversion:
    """Learn the placeholder's vector against ``models.unet`` with ``params`` swapped in, on ``latents`` (N x C x h x
    w, scaled by the VAE's factor). ``captions[i]`` is image i's training prompt when cfg.learnable_property is
    "captions" (it must contain the placeholder); otherwise each draw takes a template at random (ci.py:534).
    ``generator`` (CPU; default seeded with cfg.seed) makes every draw: a fixed seed gives the same vector.

    Deviation: the official run is fp16 mixed precision (train.sh:23; the UNet and VAE cast to fp16, ci.py:874-882);
    here the UNet runs in float32 and the text encoder in ``models.dtype`` (float32 on the CPU), the vector is
    float32. The official ``text_encoder.train()`` (ci.py:941) changes nothing for CLIP (no dropout); we keep eval
    mode."""
    start = time.perf_counter()
    generator = generator if generator is not None else torch.Generator("cpu").manual_seed(int(cfg.seed))
    tokenizer, device = models.tokenizer, models.device
    token_id = single_token_id(tokenizer, cfg.placeholder, "placeholder")
    init_id = single_token_id(tokenizer, cfg.initializer, "initializer")
    x0_all = latents.detach().to(device, torch.float32)
    n = x0_all.shape[0]
    templates = cfg.training_templates()
    if templates is None and len(captions) != n:
        raise ValueError(f"one caption per image: got {n} images and {len(captions)} captions")
    # the vector starts as the initializer's row (ci.py:762-765), float32 whatever the encoder's dtype
    table = models.text_encoder.get_input_embeddings().weight
    vector = table[init_id].detach().to(torch.float32).clone().requires_grad_(True)
    opt = torch.optim.AdamW([vector], lr=cfg.effective_lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay, eps=cfg.adam_eps)  # ci.py:806-812
    num_t = int(models.scheduler.config.num_train_timesteps)
    losses = []
    with swapped_weights(models, params or {}), placeholder_embedding(models, token_id, vector):
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(cfg.grad_accum):
                # Deviation: images drawn uniformly with replacement; the official DataLoader shuffles 100 repeats
                # of the images (ci.py:211, 505, 840-842), nearly the same draw.
                idx = torch.randint(n, (cfg.batch_size,), generator=generator)
                x0 = x0_all[idx.to(device)]
                # Deviation: the flip (ci.py:561, p = 0.5) mirrors the latent instead of the image.
                flip = (torch.rand(cfg.batch_size, generator=generator) < cfg.flip_p).to(device).view(-1, 1, 1, 1)
                x0 = torch.where(flip, x0.flip(-1), x0)
                if templates is None:
                    texts = [captions[i] for i in idx.tolist()]
                else:
                    picks = torch.randint(len(templates), (cfg.batch_size,), generator=generator).tolist()
                    texts = [templates[j].format(cfg.placeholder) for j in picks]
                t = torch.randint(0, num_t, (cfg.batch_size,), generator=generator)  # ci.py:959
                noise = torch.randn(x0.shape, generator=generator).to(device)  # ci.py:955
                loss = denoising_loss(models, x0, tokenize(tokenizer, texts), t, noise)
                # the mean over the micro-batches (accelerate divides each loss by the accumulation steps)
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach())
            opt.step()  # constant rate, no warm-up (train.sh:16-17)
            # Deviation: we log the update's mean micro-batch loss; the official logs the last micro-batch's
            # (ci.py:1017).
            losses.append(total / cfg.grad_accum)
    return Inversion(vector=vector.detach().clone(), token_id=token_id, losses=losses,
                     unet_evals=cfg.steps * cfg.grad_accum * cfg.batch_size, seconds=time.perf_counter() - start)


def _split(total: int, k: int) -> list[int]:
    """``total`` split into k integer shares that sum to it (the first ones one larger)."""
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


@register_attack("concept_inversion")
class ConceptInversion:
    """The attack over a prompt set: ``ConceptInversion(Config())(models, prompts, seeds, sampler, ...)``."""

    Config = Config
    # One inversion serves the whole prompt set: the attack runner (eval/attacking.py) passes every prompt in one
    # call instead of chunks.
    whole_set = True

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or Config()

    def __call__(self, models, prompts: Sequence[str], seeds: Sequence[int], sampler: Sampler, *,
                 detector: Callable[[np.ndarray], np.ndarray] | None = None, guidance: float | None = None,
                 params: dict[str, torch.Tensor] | None = None) -> list[AttackResult]:
        """Invert once on the base model's images of ``prompts`` (against the erased model: ``params``), then
        generate and judge each (prompt, seed)'s attack prompt.

        Cost shares: the shared part (the concept images, ``n_images`` x 2 x steps UNet evaluations, and the
        inversion, steps x grad_accum x batch_size forward+backward passes, with their time) is split evenly over
        the prompts; each result adds its own image (2 x steps evaluations, classifier-free guidance) and time."""
        cfg = self.cfg
        prompts, seeds = [str(p) for p in prompts], [int(s) for s in seeds]
        if len(prompts) != len(seeds):
            raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
        if not prompts:
            return []
        tokenizer = models.tokenizer
        token_id = single_token_id(tokenizer, cfg.placeholder, "placeholder")
        texts = []
        for p in prompts:
            if token_id in tokenize(tokenizer, [p])[0].tolist():
                raise UserError(f"prompt {p!r} already contains the placeholder token {cfg.placeholder!r}: "
                                f"choose another concept_inversion.placeholder")
            text = attack_text(p, cfg.placeholder, cfg)
            if token_id not in tokenize(tokenizer, [text])[0].tolist():
                raise UserError(f"the attack prompt {text!r} loses its placeholder to the "
                                f"{tokenizer.model_max_length}-token limit: use concept_inversion.fallback=prepend")
            texts.append(text)
        per_image = 2 * int(sampler.steps)
        start = time.perf_counter()
        draw_prompts, draw_seeds = concept_draws(prompts, seeds, cfg.n_images)
        latents = generate(models, draw_prompts, sampler, seeds=draw_seeds, guidance=guidance, output="latent")
        captions = [attack_text(p, cfg.placeholder, cfg) for p in draw_prompts]
        inv = invert(models, latents, captions, cfg, params=params)
        shared_seconds = time.perf_counter() - start
        shared_evals = _split(cfg.n_images * per_image + inv.unet_evals, len(prompts))
        embedding = inv.vector.cpu().numpy()
        extra = {"inversion_steps": cfg.steps, "inversion_seconds": inv.seconds, "placeholder": cfg.placeholder,
                 "placeholder_id": inv.token_id, "concept_images": cfg.n_images, "lr": cfg.effective_lr}
        results = []
        with placeholder_embedding(models, inv.token_id, inv.vector.to(models.device)):
            for prompt, seed, text, evals in zip(prompts, seeds, texts, shared_evals):
                t0 = time.perf_counter()
                image = generate(models, [text], sampler, seeds=[seed], guidance=guidance, params=params)
                flagged = None if detector is None else bool(np.asarray(detector(image))[0])
                results.append(AttackResult(
                    prompt=prompt, seed=seed, text=text, token_ids=[inv.token_id],
                    input_ids=tokenize(tokenizer, [text])[0].tolist(), image=image[0], flagged=flagged,
                    attacked=True, losses=list(inv.losses),
                    seconds=shared_seconds / len(prompts) + time.perf_counter() - t0,
                    unet_evals=evals + per_image, embedding=embedding.copy(), extra=dict(extra)))
        return results
