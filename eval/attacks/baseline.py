"""The floors every attack is compared against: ``no_attack`` (the prompt as it is) and ``random`` (k random tokens
prepended, several draws, the first flagged one counts).

Official code: OPTML-Group/Diffusion-MU-Attack at commit 5a3e5d37fb8787113e5d479204ab593a60e303e0,
``src/attackers/no_attack_.py`` and ``src/attackers/random_.py`` with ``configs/nudity/random_esd_nudity.json``
(cited as ``random_.py`` and ``random.json``). Our own code.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import torch

from erasure.errors import UserError
from erasure.generation import Sampler, generate

from . import AttackResult, register_attack
from .unlearndiffatk import insert_prefix, prompt_ids


def render(models, texts: Sequence[str], seeds: Sequence[int], sampler: Sampler, detector, guidance, params):
    """Images of ``texts`` (one seed each, the sampler's batches) and the detector's verdicts (None without one)."""
    images = generate(models, list(texts), sampler, seeds=list(seeds), guidance=guidance, params=params)
    flags = [None] * len(texts) if detector is None else [bool(f) for f in np.asarray(detector(images))]
    return images, flags


@dataclasses.dataclass
class NoAttackConfig:
    """No settings: the prompt, its seed, the evaluation's sampler and guidance (no_attack_.py:15-29)."""


@register_attack("no_attack")
class NoAttack:
    """The prompt as it is: its image and the detector's verdict (no_attack_.py:23-29). Its success rate is the
    concept rate of the prompt set, the ``asr_pre`` of every attack."""

    Config = NoAttackConfig

    def __init__(self, cfg: NoAttackConfig | None = None):
        self.cfg = cfg or NoAttackConfig()

    def __call__(self, models, prompts, seeds, sampler: Sampler, *, detector=None, guidance=None,
                 params=None) -> list[AttackResult]:
        start = time.perf_counter()
        images, flags = render(models, prompts, seeds, sampler, detector, guidance, params)
        each = (time.perf_counter() - start) / max(1, len(prompts))
        return [AttackResult(str(p), int(s), "", [], [], im, f, False, [], each, 2 * int(sampler.steps))
                for p, s, im, f in zip(prompts, seeds, images, flags)]


@dataclasses.dataclass
class RandomConfig:
    """Random prefix tokens; defaults from random.json (the official random attack on ESD nudity)."""

    k: int = 5  # tokens per draw; random.json "attacker.k": 5, prepended (insertion_location "prefix_k")
    draws: int = 40  # draws per prompt; random.json "attacker.iteration": 40, one image each (random_.py:64-76)
    seed: int = 0  # added to the prompt's seed for the token draws
    # Tokens: uniform over the whole vocabulary, torch.randint(0, len(tokenizer)) (random_.py:14-15), special ids
    # included. The unattacked prompt is tried first and a prompt it flags is not attacked (random_.py:57-62);
    # the draws stop at the first flagged image (random_.py:75-76).

    def __post_init__(self):
        for key in ("k", "draws"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"random.{key} must be a positive integer, got {getattr(self, key)!r}")


@register_attack("random")
class RandomAttack:
    """k random tokens before the prompt, up to ``draws`` times; success when any draw's image is flagged."""

    Config = RandomConfig

    def __init__(self, cfg: RandomConfig | None = None):
        self.cfg = cfg or RandomConfig()

    def draw_ids(self, tokenizer, prompt: str, seed: int) -> list[list[int]]:
        """The ``draws`` id sequences tried for ``prompt`` (the same for every erased model)."""
        ids, n = prompt_ids(tokenizer, prompt, self.cfg.k)
        gen = torch.Generator("cpu").manual_seed(int(seed) + int(self.cfg.seed))
        tokens = torch.randint(0, len(tokenizer), (self.cfg.draws, self.cfg.k), generator=gen)  # random_.py:15
        return [insert_prefix(ids, t[None], n)[0].tolist() for t in tokens]

    def __call__(self, models, prompts, seeds, sampler: Sampler, *, detector=None, guidance=None,
                 params=None) -> list[AttackResult]:
        start = time.perf_counter()
        prompts, seeds = [str(p) for p in prompts], [int(s) for s in seeds]
        tok = models.tokenizer
        per_image = 2 * int(sampler.steps)
        images, flags = render(models, prompts, seeds, sampler, detector, guidance, params)
        state = {i: dict(text="", token_ids=[], input_ids=[], image=images[i], flagged=flags[i], attacked=False,
                         evals=per_image, draw=None) for i in range(len(prompts))}
        todo = [i for i, f in enumerate(flags) if not f] if detector is not None else list(range(len(prompts)))
        draws = {i: self.draw_ids(tok, prompts[i], seeds[i]) for i in todo}
        for d in range(self.cfg.draws):
            if not todo:
                break
            seqs = [draws[i][d] for i in todo]
            texts = [tok.decode([t for t in s[1:] if t != tok.eos_token_id]) for s in seqs]  # random_.py:67-69
            imgs, fl = render(models, texts, [seeds[i] for i in todo], sampler, detector, guidance, params)
            for i, s, text, im, f in zip(todo, seqs, texts, imgs, fl):
                state[i].update(text=text, token_ids=s[1:1 + self.cfg.k], input_ids=s, image=im, flagged=f,
                                attacked=True, draw=d)
                state[i]["evals"] += per_image
            todo = [i for i, f in zip(todo, fl) if not f]
        each = (time.perf_counter() - start) / max(1, len(prompts))
        return [AttackResult(prompts[i], seeds[i], st["text"], st["token_ids"], st["input_ids"], st["image"],
                             st["flagged"], st["attacked"], [], each, st["evals"], extra={"draw": st["draw"]})
                for i, st in state.items()]
