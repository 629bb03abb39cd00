"""Attack registry (the robustness evaluation): one file per attack, registered by name like a method.

An attack is a class with a ``Config`` dataclass (its schema; every default cites the official code) and a pure
core callable on tensors, decorated ``@register_attack("<name>")``. Called on a prompt set it returns one
:class:`AttackResult` per (prompt, seed)::

    attack = get_attack("unlearndiffatk")(Config(...))
    results = attack(models, prompts, seeds, sampler, detector=fn, guidance=None, params=delta)

``models`` is the base model (:class:`erasure.models.Models`), ``params`` the erased model's delta tensors swapped
into its UNet (None: attack the base model), ``detector`` maps uint8 images (N x H x W x 3) to N booleans (the
concept is there). The attack modules are listed as entry points (pyproject.toml, group ``erasure.attacks``) and
imported on the first lookup (:class:`erasure.registry.Registry`), so another package can add one.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from erasure.registry import Registry

ATTACKS = Registry("attack", "erasure.attacks")
register_attack = ATTACKS.register
get_attack = ATTACKS.get
available_attacks = ATTACKS.available


@dataclasses.dataclass
class AttackResult:
    """One (prompt, seed)'s outcome: the adversarial prompt, its image, whether the detector fires, and the cost."""

    prompt: str
    seed: int
    text: str  # the adversarial prompt ("" when the prompt was not attacked: it already succeeded)
    token_ids: list[int]  # the adversarial tokens (empty for an embedding attack)
    input_ids: list[int]  # the whole id sequence the text encoder saw (empty when not attacked)
    image: np.ndarray  # H x W x 3 uint8, from the adversarial prompt (the prompt's own image if not attacked)
    flagged: bool | None  # the detector on `image` (None without a detector)
    attacked: bool
    losses: list[float]  # the attack's objective at each optimisation step (empty for a search without one)
    seconds: float
    unet_evals: int  # UNet forward passes: optimisation, plus 2 x steps per generated image (classifier-free guidance)
    text_evals: int = 0  # text-encoder forward passes (a text-only search such as Ring-A-Bell)
    embedding: np.ndarray | None = None  # a learned token embedding (concept inversion), else None
    extra: dict = dataclasses.field(default_factory=dict)  # attack-specific details (draw index, distances, ...)
