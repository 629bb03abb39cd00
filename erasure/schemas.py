"""Typed schemas of the config groups (the method's lives in its own file), checked before any model loads."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError


@dataclasses.dataclass
class TrainerConfig:
    iterations: int = 200
    seed: int = 0
    device: str = "auto"
    teacher_batch: int = 32
    preview_every: int = 50
    preview_seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1])
    precision: str = "auto"
    teacher_precision: str = "autocast"
    compile: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    probe_points: int = 0
    probe_seeds: int = 4


@dataclasses.dataclass
class ModelConfig:
    name: str = "???"
    kind: str = "???"
    resolution: Optional[int] = None
    dtype: str = "float32"
    sample_steps: int = 50
    guidance: float = 7.5
    path: Optional[str] = None
    revision: Optional[str] = None
    seed: int = 0
    width: int = 32
    probe: Optional[str] = None
    probe_point: Optional[str] = None
    lr_scale: float = 1.0


@dataclasses.dataclass
class Instruction:
    text: str = "???"
    guidance: float = "???"  # type: ignore[assignment]
    window: list[float] = dataclasses.field(default_factory=lambda: [0.0, 1.0])
    kappa: float = "???"  # type: ignore[assignment]


@dataclasses.dataclass
class ConceptConfig:
    name: str = "???"
    targets: list[str] = dataclasses.field(default_factory=list)
    instructions: list[Instruction] = dataclasses.field(default_factory=list)
    preview_prompts: list[str] = dataclasses.field(default_factory=list)


def check(group: str, node: Any, schema: type, extra_ok: bool) -> Any:
    """Type-check ``node`` against ``schema``; unknown keys are refused unless ``extra_ok`` (then passed over)."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    fields = {f.name for f in dataclasses.fields(schema)}
    if extra_ok:
        data = {k: v for k, v in data.items() if k in fields}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    except OmegaConfBaseException as exc:
        msg = str(exc).strip().splitlines()[0].rstrip(".")
        key = getattr(exc, "full_key", None)
        raise UserError(f"invalid {group} config{f' at {group}.{key}' if key else ''}: {msg}") from None


def check_all(cfg: DictConfig) -> None:
    check("trainer", cfg.trainer, TrainerConfig, extra_ok=False)
    check("model", cfg.model, ModelConfig, extra_ok=True)  # tiers add their own keys
    check("concept", cfg.concept, ConceptConfig, extra_ok=True)  # methods add per-concept data (ablating:, fmn:)
