"""Erased weights as a delta: only the trained tensors, in safetensors, with metadata naming the base.

Metadata: ``base_model``, ``base_fingerprint`` (see :attr:`Models.fingerprint`), ``text_encoder_fingerprint``
(:attr:`Models.text_encoder_fingerprint`; deltas written before text encoders could be trained lack it), ``method``,
``params``, ``iterations`` and ``format``. A delta applied to a base whose fingerprint differs is refused; so is one
whose text-encoder fingerprint differs, when it records one.

A delta holds edited UNet tensors (``erasure-delta/1``: the loss and closed-form shapes), adapter weights (an
adapter method, :mod:`erasure.adapters`), or both. When it holds adapter weights, its metadata key ``adapters`` lists
each adapter set's placement (layers), rank, alpha and gate, and its format is ``erasure-delta/2``, so that a checkout
that predates adapters refuses it in words instead of failing on unknown parameter names. :func:`load_delta` attaches
the described sets to the base UNet (as the identity) before anyone swaps or copies the weights in.

A delta may also hold text-encoder tensors, named ``text_encoder.<name>`` (:mod:`erasure.params`; e.g. AdvUnlearn's
trained encoder layers); its format is then ``erasure-delta/3``, which older checkouts refuse in words, and it must
record the base text encoder's fingerprint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .adapters import attach_described
from .errors import UserError
from .io import atomic_write
from .params import TEXT_ENCODER_PREFIX, named_model_parameters


log = logging.getLogger(__name__)

FORMAT = "erasure-delta/1"
FORMAT_ADAPTERS = "erasure-delta/2"  # a delta with adapter weights (metadata ``adapters``)
FORMAT_TEXT_ENCODER = "erasure-delta/3"  # a delta with text-encoder tensors (``text_encoder.<name>``)
FORMATS = (FORMAT, FORMAT_ADAPTERS, FORMAT_TEXT_ENCODER)
META_KEY = "erasure"


def save_delta(path: str | Path, params: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write ``params`` (float32, CPU) with ``metadata``: scalars as strings, lists and dicts (e.g. ``adapters``) as
    JSON."""
    path = Path(path)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in params.items()}
    has_text = any(name.startswith(TEXT_ENCODER_PREFIX) for name in tensors)
    if has_text and not metadata.get("text_encoder_fingerprint"):
        raise ValueError("a delta with text-encoder tensors must record text_encoder_fingerprint in its metadata")
    fmt = FORMAT_TEXT_ENCODER if has_text else FORMAT_ADAPTERS if metadata.get("adapters") else FORMAT
    meta = {"format": fmt, **{k: v if isinstance(v, (list, dict)) else str(v) for k, v in metadata.items()}}
    # one metadata key holding sorted JSON: safetensors writes several keys in hash order, which would make
    # the bytes of two identical deltas differ (and so their sha256, the evaluation cache's key)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)}))
    return path


def read_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "delta.safetensors"
    if not path.is_file():
        raise UserError(f"no delta at '{path}': pass a run folder that holds delta.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
        meta = json.loads(raw[META_KEY]) if META_KEY in raw else raw
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"'{path}' is not a readable safetensors delta ({exc}): re-run training or copy the file again") from None
    if meta.get("format") not in FORMATS:
        raise UserError(f"'{path}' is not an erasure delta (format {meta.get('format')!r}, expected one of {', '.join(FORMATS)})")
    if not tensors:
        raise UserError(f"delta '{path}' holds no tensors: it erases nothing; re-run training")
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"delta '{path}' has non-finite values in {len(bad)} tensor(s) ({bad[0]}, ...): its images would "
                        "be noise; re-run training with a lower learning rate")
    return tensors, meta


def load_delta(models, path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A delta's tensors and metadata, after checking it was trained on this base model (``models``: the loaded
    :class:`erasure.models.Models`), attaching the adapter sets it describes (identity: the UNet still computes the base
    model) and checking every tensor fits the UNet or, for ``text_encoder.<name>``, the text encoder.
    Nothing is copied: swap the tensors in (``erasure.generation.generate(params=...)``) or :func:`apply_delta`."""
    tensors, meta = read_delta(path)
    if meta.get("base_fingerprint") != models.fingerprint:
        raise UserError(
            f"delta '{path}' was trained on base model {meta.get('base_model')!r} (fingerprint {meta.get('base_fingerprint')}), "
            f"but the loaded base has fingerprint {models.fingerprint}: load the same base model the delta was trained on")
    recorded = meta.get("text_encoder_fingerprint")
    if recorded is not None and recorded != models.text_encoder_fingerprint:
        raise UserError(
            f"delta '{path}' was trained with text encoder fingerprint {recorded}, but the loaded base's text encoder has "
            f"{models.text_encoder_fingerprint}: load the same base model (text encoder included) the delta was trained on")
    if any(name.startswith(TEXT_ENCODER_PREFIX) for name in tensors) and recorded is None:
        raise UserError(f"delta '{path}' holds text-encoder tensors but records no text_encoder_fingerprint: it was not "
                        "written by erasure.train; re-run training")
    if meta.get("adapters"):
        for s in attach_described(models.unet, meta["adapters"]):
            log.info("delta '%s': adapter set '%s' on %d layers (rank %d)%s", path, s.name, len(s.targets), s.rank,
                     f", gated per prompt by method '{s.gate['method']}'" if s.gate else "")
    named = named_model_parameters(models.unet, models.text_encoder)
    for name, value in tensors.items():
        if name not in named or named[name].shape != value.shape:
            where = "text encoder" if name.startswith(TEXT_ENCODER_PREFIX) else "UNet"
            raise UserError(f"delta '{path}' has parameter '{name}' that does not fit this {where}: it belongs to another architecture")
    return tensors, meta


def apply_delta(models, path: str | Path) -> dict:
    """Copy a delta's tensors into the base model (its adapters attached first) after checking it was trained on it."""
    tensors, meta = load_delta(models, path)
    named = named_model_parameters(models.unet, models.text_encoder)
    with torch.no_grad():
        for name, value in tensors.items():
            named[name].copy_(value.to(named[name].device, named[name].dtype))
    return meta


def load_run(run: str | Path, device: str = "auto", base: bool = False):
    """The models of a finished run with its delta applied (or the bare base model with base=True)."""
    run = Path(run)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"'{run}' is not a run folder (no config.yaml): pass the folder that erasure.train wrote")
    from omegaconf import OmegaConf

    from .models import load_models

    cfg = OmegaConf.load(cfg_path)
    models = load_models(cfg.model, device)
    if not base:
        apply_delta(models, run / "delta.safetensors")
    return cfg, models


def check_run_folder(run: str | Path, base: bool):
    """The run's config, after checking the folder has what purification needs (before any model loads)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder '{run}' does not exist: pass run=<a folder written by erasure.train>")
    if not (run / "config.yaml").is_file():
        raise UserError(f"'{run}' is not a run folder (no config.yaml): pass the folder that erasure.train wrote")
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run / "config.yaml")
    except Exception as exc:  # noqa: BLE001 -- any YAML/OmegaConf failure is a broken run folder
        raise UserError(f"'{run / 'config.yaml'}' is not a readable config ({type(exc).__name__}): re-run training") from None
    if not OmegaConf.is_dict(cfg) or "model" not in cfg:
        raise UserError(f"'{run / 'config.yaml'}' has no `model` section: pass a folder written by erasure.train")
    if not base and not (run / "delta.safetensors").is_file():
        raise UserError(f"run folder '{run}' has no delta.safetensors: training did not finish there (base=true purifies with the base model)")
    return cfg
