"""Trainable-parameter subsets, selected by name (``params=<subset>``; definitions in ``conf/params/``).

A subset is a list of regular expressions matched (``re.search``) against the UNet's parameter names
(diffusers naming), minus an exclusion list. ``params=none`` (no pattern) selects nothing: for an adapter method,
which trains only its adapters (:mod:`erasure.adapters`). Self-attention is ``attn1``, cross-attention ``attn2``.

A subset may also name text-encoder parameters: its optional ``text_encoder:`` list of patterns is matched against
the CLIP text encoder's own parameter names (transformers naming, e.g. ``encoder.layers.0.mlp.fc1.weight``; ``text_model.`` before it in transformers 4),
minus ``text_encoder_exclude``. Those parameters are keyed ``text_encoder.<name>`` everywhere a trained tensor is
named (the trainable dict, the frozen teacher, checkpoints, the delta), so UNet names stay as they are and the two
never collide; :func:`split_params` separates them again and :func:`erasure.teacher.swapped_weights` swaps both in.
"""
from __future__ import annotations

import re

import torch

from .errors import UserError

TEXT_ENCODER_PREFIX = "text_encoder."


def select_params(unet: torch.nn.Module, subset, text_encoder: torch.nn.Module | None = None) -> dict[str, torch.nn.Parameter]:
    """Parameters of ``unet`` in the subset ``subset`` (a ``conf/params/*.yaml`` node), by name, in module order;
    then the text encoder's parameters the subset's ``text_encoder`` patterns select, keyed ``text_encoder.<name>``."""
    include = [re.compile(p) for p in subset.include]
    exclude = [re.compile(p) for p in subset.get("exclude", [])]
    chosen = {
        name: p for name, p in unet.named_parameters()
        if any(r.search(name) for r in include) and not any(r.search(name) for r in exclude)
    }
    if not chosen and list(subset.include):  # params=none (no pattern) selects nothing on purpose: adapter methods
        raise UserError(f"parameter subset '{subset.name}' matches no parameter of this UNet: check its include patterns in conf/params/{subset.name}.yaml")
    text_include = [re.compile(p) for p in (subset.get("text_encoder") or [])]
    if text_include:
        if text_encoder is None:
            raise ValueError(f"parameter subset '{subset.name}' names text-encoder parameters: pass the text encoder")
        text_exclude = [re.compile(p) for p in (subset.get("text_encoder_exclude") or [])]
        text = {TEXT_ENCODER_PREFIX + name: p for name, p in text_encoder.named_parameters()
                if any(r.search(name) for r in text_include) and not any(r.search(name) for r in text_exclude)}
        if not text:
            raise UserError(f"parameter subset '{subset.name}' matches no parameter of this text encoder: check its "
                            f"text_encoder patterns in conf/params/{subset.name}.yaml")
        chosen.update(text)
    return chosen


def split_params(values: dict) -> tuple[dict, dict]:
    """(UNet entries, text-encoder entries with the ``text_encoder.`` prefix removed) of a dict keyed as above."""
    unet = {k: v for k, v in values.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
    text = {k[len(TEXT_ENCODER_PREFIX):]: v for k, v in values.items() if k.startswith(TEXT_ENCODER_PREFIX)}
    return unet, text


def named_model_parameters(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, torch.nn.Parameter]:
    """Every parameter a delta may name: the UNet's, then the text encoder's as ``text_encoder.<name>``."""
    named = dict(unet.named_parameters())
    if text_encoder is not None:
        named.update({TEXT_ENCODER_PREFIX + n: p for n, p in text_encoder.named_parameters()})
    return named


def count(params: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())
