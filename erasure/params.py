"""Trainable-parameter subsets, selected by name (``params=<subset>``; definitions in ``conf/params/``).

A subset is a list of regular expressions matched (``re.search``) against the UNet's parameter names
(diffusers naming), minus an exclusion list. ``params=none`` (no pattern) selects nothing: for an adapter method,
which trains only its adapters (:mod:`erasure.adapters`). Self-attention is ``attn1``, cross-attention ``attn2``.
"""
from __future__ import annotations

import re

import torch

from .errors import UserError


def select_params(unet: torch.nn.Module, subset) -> dict[str, torch.nn.Parameter]:
    """Parameters of ``unet`` in the subset ``subset`` (a ``conf/params/*.yaml`` node), by name, in module order."""
    include = [re.compile(p) for p in subset.include]
    exclude = [re.compile(p) for p in subset.get("exclude", [])]
    chosen = {
        name: p for name, p in unet.named_parameters()
        if any(r.search(name) for r in include) and not any(r.search(name) for r in exclude)
    }
    if not chosen and list(subset.include):  # params=none (no pattern) selects nothing on purpose: adapter methods
        raise UserError(f"parameter subset '{subset.name}' matches no parameter of this UNet: check its include patterns in conf/params/{subset.name}.yaml")
    return chosen


def count(params: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())
