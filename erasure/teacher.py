"""The frozen teacher theta*, sharing every non-trainable weight with the student.

Instead of deep-copying the UNet (859.5M parameters on SD v1.4), we keep a frozen copy of only the
trainable subset and evaluate the teacher by calling the *same* module with those tensors swapped in
through ``torch.func.functional_call``. With ``params=to_out`` on SD v1.4 the teacher costs 24.8M
extra parameters (99 MB in fp32) instead of 859.5M (3.4 GB).

Trained text-encoder parameters (``text_encoder.<name>``, :mod:`erasure.params`) get the same treatment: the teacher
keeps frozen copies of them and :meth:`Teacher.encode` runs the shared text encoder with those copies swapped in.
"""
from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call

from .params import TEXT_ENCODER_PREFIX, split_params


class Teacher:
    """``dtype=None``: the frozen copy keeps the trained parameters' dtype and the caller's autocast (if any) decides
    each op's precision. ``dtype=torch.bfloat16`` (or float16): the copy, the inputs and every op run in that dtype
    with autocast off, the way diffusers runs a half-precision pipeline; the result is returned in float32
    (``trainer.teacher_precision=pure``, GPU only; the UNet's frozen weights must already be in ``dtype``)."""

    def __init__(self, unet: torch.nn.Module, trainable: dict[str, torch.nn.Parameter], dtype: torch.dtype | None = None,
                 text_encoder: torch.nn.Module | None = None):
        self.unet = unet
        self.text_encoder = text_encoder
        self.dtype = dtype
        frozen = {name: p.detach().clone().to(dtype or p.dtype) for name, p in trainable.items()}
        self.params, self.text_params = split_params(frozen)  # UNet tensors; text-encoder tensors (prefix removed)
        if self.text_params and text_encoder is None:
            raise ValueError("trained text-encoder parameters need the text encoder: Teacher(..., text_encoder=...)")

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return functional_call(self.unet, self.params, (sample, timestep),
                                   {"encoder_hidden_states": encoder_hidden_states}).sample
        with torch.autocast(sample.device.type, enabled=False):
            out = functional_call(self.unet, self.params, (sample.to(self.dtype), timestep),
                                  {"encoder_hidden_states": encoder_hidden_states.to(self.dtype)}).sample
        return out.float()

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The frozen text encoder's last hidden state (float32) for token ids (B x 77): the base encoder, with the
        frozen copies of any trained text-encoder parameters swapped in."""
        if self.text_encoder is None:
            raise ValueError("this teacher has no text encoder: Teacher(..., text_encoder=...)")
        return functional_call(self.text_encoder, self.text_params, (input_ids,))[0].float()

    @property
    def base_params(self) -> dict[str, torch.Tensor]:
        """The frozen copies keyed as the trained parameters are (text-encoder ones as ``text_encoder.<name>``): what
        :func:`erasure.generation.generate` swaps in to draw the base model's images while the trained weights, UNet
        and text encoder alike, are held in place."""
        return {**self.params, **{TEXT_ENCODER_PREFIX + n: v for n, v in self.text_params.items()}}

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values()) + sum(p.numel() for p in self.text_params.values())


def student_eps(unet: torch.nn.Module, sample, timestep, encoder_hidden_states) -> torch.Tensor:
    """epsilon prediction of the trained UNet (gradients flow to its trainable parameters)."""
    return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


@contextlib.contextmanager
def swapped_weights(models, values: dict[str, torch.Tensor]):
    """:func:`swapped_params` for a dict that may also hold text-encoder tensors (``text_encoder.<name>``): each part
    swapped into its module (``models.unet``, ``models.text_encoder``) for the duration."""
    unet_values, text_values = split_params(values or {})
    with swapped_params(models.unet, unet_values), swapped_params(models.text_encoder, text_values):
        yield models


@contextlib.contextmanager
def swapped_params(module: torch.nn.Module, values: dict[str, torch.Tensor]):
    """Temporarily copy ``values`` into ``module``'s parameters of the same names (for previews/export)."""
    named = dict(module.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, value in values.items():
            if named[name] is value:
                continue
            saved[name] = named[name].detach().clone()
            named[name].copy_(value)
    try:
        yield module
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                named[name].copy_(value)
