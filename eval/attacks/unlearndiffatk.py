"""UnlearnDiffAtk (Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to
Generate Unsafe Images ... For Now", ECCV 2024): a white-box attack on the erased model.

k adversarial tokens are prepended to the prompt. Each is a distribution over the vocabulary, kept on the
probability simplex; a token drawn from it enters the text encoder as a one-hot row times the token embedding table,
with a straight-through gradient. Adam minimises the erased model's denoising L2 on a noised latent of the *target
image*, the base model's image of the same prompt and seed: tokens that let the erased UNet denoise that image are
tokens that bring the concept back. Success: the image generated from the adversarial prompt (same seed, same
guidance) is flagged by the concept's detector.

Official code: OPTML-Group/Diffusion-MU-Attack at commit 5a3e5d37fb8787113e5d479204ab593a60e303e0, cited below as
``text_grad_.py`` (src/attackers/text_grad_.py), ``classifier_.py`` (src/tasks/classifier_.py), ``attack.py``
(src/execs/attack.py) and ``nudity.json`` (configs/nudity/text_grad_esd_nudity_classifier.json). This file is our
own code; differences from the official code are marked "Deviation".
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from erasure.adversarial import encode_embeddings, insert_prefix, prompt_ids, token_embeddings_replaced  # noqa: F401 (re-exported)
from erasure.errors import UserError
from erasure.generation import Sampler, generate
from erasure.teacher import swapped_weights

from . import AttackResult, register_attack

OFFICIAL = "OPTML-Group/Diffusion-MU-Attack@5a3e5d37fb8787113e5d479204ab593a60e303e0"


@dataclasses.dataclass
class Config:
    """UnlearnDiffAtk's settings; every default is the official one for the ESD-nudity attack."""

    k: int = 5  # adversarial tokens; nudity.json "attacker.k": 5 (attack.py:39 defaults to 3)
    insertion: str = "prefix_k"  # placement: nudity.json "insertion_location"; text_grad_.py:93-94 (only one built)
    lr: float = 0.01  # Adam learning rate; nudity.json "text_grad.lr", text_grad_.py:10
    weight_decay: float = 0.1  # Adam's (L2) weight decay, torch.optim.Adam not AdamW; nudity.json, text_grad_.py:11,79
    iterations: int = 40  # Adam steps per timestep; nudity.json "attacker.iteration": 40, text_grad_.py:209
    # Timesteps, in order: classifier_.py:67-70 takes n_samples = 50 (its default, classifier_.py:30; attack.py
    # never sets it) of T = 1000: range(T // n // 2, T, T // n) = 10, 30, ..., 990. With sequential = true
    # (nudity.json) text_grad_.py:207-233 runs `iterations` steps at each t in turn, then generates from the argmax
    # tokens and stops at the first success.
    n_timesteps: int = 50
    projection_tol: float = 1e-5  # bisection tolerance xi; text_grad_.py:20,59
    # The loss: classifier_.py:76-87: fresh noise each step, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise with
    # the training schedule's abar, loss = MSE(noise, eps_erased(x_t, t, text)) ("criterion": "l2", nudity.json).
    # Initial distributions: uniform 1/|V| (text_grad_.py:70; rand_init=False, text_grad_.py:12).
    # Final tokens: the argmax of each distribution (argmax_project, text_grad_.py:164-171), decoded without the
    # EOS tokens (text_grad_.py:222-226). Images: classifier_.py:108-248 samples with LMS, sampling_step_num = 50
    # (attack.py:34) and the dataset's guidance; here the caller's Sampler (the evaluation's) and guidance instead.

    def __post_init__(self):
        if self.insertion != "prefix_k":
            raise UserError(f"unlearndiffatk.insertion must be 'prefix_k' (the only placement built), "
                            f"got {self.insertion!r}")
        for key in ("k", "iterations", "n_timesteps"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"unlearndiffatk.{key} must be a positive integer, got {getattr(self, key)!r}")


def official_timesteps(n: int, num_train_timesteps: int = 1000) -> list[int]:
    """The official timestep schedule (classifier_.py:67-70): n evenly spaced t, from T // n // 2 upwards."""
    start = num_train_timesteps // n // 2
    return list(range(start, num_train_timesteps, num_train_timesteps // n))[:n]


@torch.no_grad()
def project_to_simplex(x: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """Euclidean projection of each row of ``x`` onto the probability simplex: ``relu(x - mu)`` with the row's
    threshold ``mu`` chosen so that the row sums to 1.

    As the official code (text_grad_.py:20-66, ``bisection`` with ub = 1, eps = 1, xi = 1e-5), ``mu`` is bracketed by
    bisection on ``[min(x) - 1, max(x)]`` until the bracket is narrower than ``tol`` (all rows at once here, in
    float64). Deviation: the official code returns ``clip(x - mu, 0, 1)`` at that approximate ``mu``, whose row sum
    misses 1 by up to (number of positive entries) x tol, which on a 49408-word vocabulary can be far from 1; we
    finish with exact active-set steps (Michelot 1986: ``mu <- (sum of x_i > mu - 1) / #{x_i > mu}``, which rises
    monotonically from the lower end of the bracket to the exact threshold), so rows sum to 1 to rounding. (The
    official upper bound 1 never binds on the simplex.)
    """
    a = x.detach().to(torch.float64)
    lo = a.min(dim=-1, keepdim=True).values - 1.0  # f(lo) = sum relu(a - lo) - 1 >= 0
    hi = a.max(dim=-1, keepdim=True).values  # f(hi) = -1 < 0
    while bool(((hi - lo) > tol).any()):
        mid = (lo + hi) / 2
        above = (a - mid).clamp(min=0).sum(dim=-1, keepdim=True) > 1.0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    mu = lo
    for _ in range(a.shape[-1]):  # terminates in a few steps; the bound is the worst case
        active = a > mu
        new = ((a * active).sum(dim=-1, keepdim=True) - 1.0) / active.sum(dim=-1, keepdim=True)
        if torch.equal(new, mu):
            break
        mu = new
    return (a - mu).clamp(min=0).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the one-hot rows of the drawn tokens. Backward: the incoming gradient, clipped to [-1, 1] (the
    official STERandSelect's hardtanh, text_grad_.py:240-255), to the distributions."""

    @staticmethod
    def forward(ctx, probs, ids):
        return F.one_hot(ids, num_classes=probs.shape[-1]).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad):
        return F.hardtanh(grad), None


def straight_through_embeddings(probs: torch.Tensor, table: torch.Tensor, generator: torch.Generator | None = None):
    """Token embeddings of tokens drawn from ``probs`` (k x V, rows on the simplex): one token per row drawn by
    ``torch.multinomial`` (text_grad_.py:243-249), its one-hot row times the embedding ``table`` (V x d)
    (text_grad_.py:211-212). Returns (k x d embeddings with a straight-through gradient to ``probs``, the k ids)."""
    ids = torch.multinomial(probs.detach().cpu().to(torch.float64), 1, generator=generator).view(-1).to(probs.device)
    return _StraightThrough.apply(probs, ids) @ table, ids


@dataclasses.dataclass
class PromptAttack:
    """What :func:`attack_prompts` found for one prompt."""

    token_ids: list[int]  # the k adversarial token ids (argmax of each distribution)
    input_ids: list[int]  # the whole 77-id sequence they make with the prompt
    text: str  # the adversarial prompt, decoded from input_ids
    losses: list[float]  # the loss of every Adam step, in order
    timesteps: list[int]  # the timesteps optimised at (fewer than the schedule when `check` stopped early)
    unet_evals: int  # UNet forward passes (each with a backward) of the optimisation
    seconds: float  # wall clock of the optimisation (shared equally by the prompts of one batch)


def attack_prompts(models, prompts: Sequence[str], seeds: Sequence[int], target_latents: torch.Tensor, cfg: Config,
                   params: dict[str, torch.Tensor] | None = None,
                   check: Callable[[list[int], list[str]], Sequence[bool]] | None = None) -> list[PromptAttack]:
    """Optimise k prefix-token distributions per prompt against the erased model's denoising loss on that prompt's
    ``target_latents`` row (N x C x h x w, scaled by the VAE's factor: the base model's latent for the prompt and
    seed). All prompts go through the UNet as one batch; each keeps its own distributions, its own Adam and its own
    random stream (``torch.Generator().manual_seed(seed)``, which draws its tokens and its noise; the official code
    draws from the global RNG that its generation just seeded with the prompt's seed, classifier_.py:142), and the
    loss is the sum of the per-prompt losses, so a prompt's trajectory does not depend on the others in its batch.

    The erased model is ``models.unet`` with ``params`` (a delta's tensors) swapped in. ``check(indices, texts)``,
    if given, is called after each timestep's block with the current adversarial prompts of the prompts still being
    attacked and returns which of them succeed; those stop there (the official early stop, text_grad_.py:222-233)."""
    start = time.perf_counter()
    tokenizer, device = models.tokenizer, models.device
    table = models.text_encoder.get_input_embeddings().weight.detach()
    vocab = table.shape[0]
    n_prompts = len(prompts)
    ids, lens = zip(*(prompt_ids(tokenizer, p, cfg.k) for p in prompts)) if n_prompts else ((), ())
    ids = [i.to(device) for i in ids]
    bases = [table[i] for i in ids]  # 1 x 77 x d each, the prompt's token embeddings (classifier_.py:102-106)
    x0 = target_latents.to(device, torch.float32).reshape(n_prompts, *target_latents.shape[-3:])
    abar = models.scheduler.alphas_cumprod
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    uniform = torch.full((cfg.k, vocab), 1.0 / vocab, device=device)  # text_grad_.py:70
    probs = [project_to_simplex(uniform, cfg.projection_tol).requires_grad_(True) for _ in prompts]  # :74-76
    opts = [torch.optim.Adam([p], lr=cfg.lr, weight_decay=cfg.weight_decay) for p in probs]  # text_grad_.py:79
    losses = [[] for _ in prompts]
    used = [[] for _ in prompts]
    active = list(range(n_prompts))
    with swapped_weights(models, params or {}):
        for t in official_timesteps(cfg.n_timesteps, int(models.scheduler.config.num_train_timesteps)):
            if not active:
                break
            for i in active:
                used[i].append(t)
            a_t = abar[t].to(device, torch.float32)
            steps = torch.full((len(active),), t, device=device)
            for _ in range(cfg.iterations):
                embeds, noises = [], []
                for i in active:
                    adv, _ = straight_through_embeddings(probs[i], table, gens[i])
                    embeds.append(insert_prefix(bases[i], adv[None], lens[i]))
                    noises.append(torch.randn(x0.shape[1:], generator=gens[i]))  # classifier_.py:80
                hidden = encode_embeddings(models.text_encoder, torch.cat([ids[i] for i in active]), torch.cat(embeds))
                noise = torch.stack(noises).to(device)
                x_t = a_t.sqrt() * x0[active] + (1 - a_t).sqrt() * noise  # classifier_.py:82-83
                eps = models.unet(x_t, steps, encoder_hidden_states=hidden).sample
                per_prompt = ((eps.float() - noise) ** 2).flatten(1).mean(1)  # MSE per prompt: classifier_.py:43,86
                grads = torch.autograd.grad(per_prompt.sum(), [probs[i] for i in active])  # text_grad_.py:217
                for i, g, loss in zip(active, grads, per_prompt.detach().tolist()):
                    probs[i].grad = g
                    opts[i].step()
                    probs[i].data = project_to_simplex(probs[i].data, cfg.projection_tol)  # text_grad_.py:219-220
                    losses[i].append(loss)
            if check is not None:
                done = check(list(active), [_decode(tokenizer, ids[i], probs[i], lens[i])[2] for i in active])
                active = [i for i, ok in zip(active, done) if not ok]
    seconds = (time.perf_counter() - start) / max(1, n_prompts)
    out = []
    for i in range(n_prompts):
        adv_ids, full, text = _decode(tokenizer, ids[i], probs[i], lens[i])
        out.append(PromptAttack(token_ids=adv_ids, input_ids=full, text=text, losses=losses[i], timesteps=used[i],
                                unet_evals=len(losses[i]), seconds=seconds))
    return out


def attack_prompt(models, prompt: str, seed: int, target_latent: torch.Tensor, cfg: Config,
                  params: dict[str, torch.Tensor] | None = None,
                  check: Callable[[str], bool] | None = None) -> PromptAttack:
    """:func:`attack_prompts` for one prompt (``check(text) -> bool``)."""
    one = None if check is None else (lambda indices, texts: [bool(check(texts[0]))])
    return attack_prompts(models, [prompt], [seed], target_latent, cfg, params=params, check=one)[0]


def _decode(tokenizer, ids: torch.Tensor, probs: torch.Tensor, n: int):
    """(adversarial ids, the full id sequence, its text): argmax tokens (text_grad_.py:164-171), decoded from the
    sequence without its start token and EOS tokens (text_grad_.py:222-226)."""
    adv = probs.detach().argmax(dim=-1).cpu()
    full = insert_prefix(ids.cpu(), adv[None], n)[0].tolist()
    text = tokenizer.decode([i for i in full[1:] if i != tokenizer.eos_token_id])
    return adv.tolist(), full, text


@register_attack("unlearndiffatk")
class UnlearnDiffAtk:
    """The attack over a prompt set: ``UnlearnDiffAtk(Config())(models, prompts, seeds, sampler, ...)``, all prompts
    in one batch (images in the sampler's batches)."""

    Config = Config

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or Config()

    def __call__(self, models, prompts: Sequence[str], seeds: Sequence[int], sampler: Sampler, *,
                 detector: Callable[[np.ndarray], np.ndarray] | None = None, guidance: float | None = None,
                 params: dict[str, torch.Tensor] | None = None) -> list[AttackResult]:
        """Attack each (prompt, seed). ``detector``: uint8 images (N x H x W x 3) -> N booleans (the concept is
        there); ``params``: the erased model's delta tensors (None: the UNet as it is)."""
        start = time.perf_counter()
        prompts, seeds = [str(p) for p in prompts], [int(s) for s in seeds]
        if len(prompts) != len(seeds):
            raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
        per_image = 2 * int(sampler.steps)
        evals = [0] * len(prompts)

        def images_of(indices, texts):
            for i in indices:
                evals[i] += per_image
            img = generate(models, texts, sampler, seeds=[seeds[i] for i in indices], guidance=guidance, params=params)
            flags = [None] * len(indices) if detector is None else [bool(f) for f in np.asarray(detector(img))]
            return img, flags

        images, flags = images_of(range(len(prompts)), prompts)
        todo = [i for i, f in enumerate(flags) if not f]  # flagged unattacked: nothing to do (text_grad_.py:192-197)
        first = time.perf_counter() - start
        results: dict[int, AttackResult] = {}
        for i in range(len(prompts)):
            if i not in todo:
                results[i] = AttackResult(prompts[i], seeds[i], "", [], [], images[i], True, False, [],
                                          first / len(prompts), evals[i])
        if todo:
            # The target: the base model's (no params) latent of each prompt and seed. Deviation: the official target
            # is the dataset's image (made by the base model) encoded again, VAE latent mean x 0.18215
            # (classifier_.py:95-100); we take the sampler's final latent directly, without the decode-encode trip.
            targets = generate(models, [prompts[i] for i in todo], sampler, seeds=[seeds[i] for i in todo],
                               guidance=guidance, output="latent")
            for i in todo:
                evals[i] += per_image
            last: dict[int, tuple] = {}

            def check(indices, texts):
                real = [todo[j] for j in indices]
                img, fl = images_of(real, texts)
                for r, text, im, f in zip(real, texts, img, fl):
                    last[r] = (text, im, f)
                return [bool(f) for f in fl]

            found = attack_prompts(models, [prompts[i] for i in todo], [seeds[i] for i in todo], targets, self.cfg,
                                   params=params, check=check if detector is not None else None)
            stale = [(i, f) for i, f in zip(todo, found) if last.get(i, ("",))[0] != f.text]
            if stale:
                img, fl = images_of([i for i, _ in stale], [f.text for _, f in stale])
                for (i, f), im, flag in zip(stale, img, fl):
                    last[i] = (f.text, im, flag)
            rest = (time.perf_counter() - start - first) / len(todo)
            for i, f in zip(todo, found):
                text, im, flag = last[i]
                results[i] = AttackResult(prompts[i], seeds[i], f.text, f.token_ids, f.input_ids, im, flag, True,
                                          f.losses, first / len(prompts) + rest, evals[i] + f.unet_evals,
                                          extra={"timesteps": len(f.timesteps)})
        return [results[i] for i in range(len(prompts))]
