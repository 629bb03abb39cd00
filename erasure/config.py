"""The run config in one place: the core's schemas, the methods' schemas in Hydra's ConfigStore, composition,
and validation (run once per job, before any model loads).

Each method's defaults live once, in its ``Config`` dataclass (the method's file, each default citing its source);
:func:`register_method_schemas` stores those dataclasses in Hydra's ConfigStore as ``method/<name>_schema``, and
``conf/method/<name>.yaml`` only names that schema and its parameter subset. Per-concept settings that only one
method reads (All but One's instruction concepts, Ablating's anchors, FMN's reference prompts) are checked by that
method (:meth:`erasure.method.ErasureMethod.validate_concept`), not here.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import registry
from . import schema
from .errors import UserError
from .models import DTYPES

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Top-level keys of conf/train.yaml that stand for a field of one method's config (``lambda=5`` rather than
# ``method.lam=5``, as the paper writes it). A method claims a shortcut in ``ErasureMethod.shortcuts``; given to a
# method that does not claim it, the key is refused (it would otherwise be silently ignored).
SHORTCUTS = ("lambda",)


@dataclasses.dataclass
class TrainerConfig:
    """``trainer:`` (conf/trainer/default.yaml starts from this schema, stored as ``trainer/schema``)."""

    iterations: int = 200  # optimizer steps; conf/trainer/default.yaml sets ${method.iterations} (the method's own)
    seed: int = 0  # seeds torch/numpy/python and the method's sampling generator
    device: str = "auto"  # auto = cuda when available, else cpu
    # iterations whose teacher work (z_t sampling, targets) runs in one batch; 1 = one at a time (only for methods
    # whose teacher work uses frozen weights; others always run one at a time)
    teacher_batch: int = 32
    preview_every: int = 50  # iterations between preview grids (0 = none); start and end are always drawn when > 0
    preview_seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1])  # seeds of the preview images
    precision: str = "auto"  # auto = bfloat16 autocast on CUDA (trained params/optimizer fp32), float32 on CPU
    # GPU: autocast = per-op casts (norms in fp32); pure = the frozen teacher's weights, inputs and every op in
    # `precision`, as diffusers' half-precision inference (faster; CPU ignores it)
    teacher_precision: str = "autocast"
    compile: bool = False  # torch.compile the UNet (nn.Module.compile; GPU, experimental)
    # How, not what (docs/PERFORMANCE.md measures both on a GPU): the kernels torch's scaled_dot_product_attention
    # may pick during training, "auto" (PyTorch's own order; cuDNN's first on Hopper) or a "+"-joined subset of
    # flash, efficient, cudnn, math (torch.nn.attention.SDPBackend), e.g. flash+efficient
    sdpa_backends: str = "auto"
    channels_last: bool = False  # the UNet's 4-D weights, and so its convolutions' activations, in NHWC memory format
    checkpoint_every: int = 0  # save a checkpoint every n iterations (0 = never); resume with `resume=<run folder>`
    keep_checkpoints: int = 2  # checkpoints kept (older ones are pruned)
    # erasure curve: the model's probe at n evenly spaced iterations (+ iteration 0) -> probe.jsonl (models with a
    # `probe`, e.g. the toy world's detector; the paper's Fig. 4); 0 = off
    probe_points: int = 0
    probe_seeds: int = 4  # images per probe prompt at each curve point


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
    probe: Optional[str] = None  # a registered probe (erasure.registry.PROBES), e.g. toyworld
    lr_scale: float = 1.0


@dataclasses.dataclass
class ConceptConfig:
    name: str = "???"
    targets: list[str] = dataclasses.field(default_factory=list)
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


def concept_section(concept: Any, key: str, schema: type) -> Any:
    """A method's per-concept data: the concept yaml's optional ``<key>:`` section checked against ``schema`` (unknown
    keys refused; absent = the schema's defaults)."""
    return check(f"concept.{key}", concept.get(key) or {}, schema, extra_ok=False)


def group_options(group: str) -> list[str]:
    """The options of a config group: the yaml files of ``conf/<group>/`` and its subfolders (``toy/circle``)."""
    folder = CONF_DIR / group
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def register_method_schemas() -> None:
    """Store every registered method's ``Config`` in Hydra's ConfigStore as ``method/<name>_schema`` (the defaults
    list of ``conf/method/<name>.yaml`` starts from it), and the trainer's as ``trainer/schema``. Idempotent; needed
    before composing ``conf/train.yaml``: Hydra calls it through the plugin in ``hydra_plugins/erasure_schemas``."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="trainer", name="schema", node=TrainerConfig)
    for name in registry.available():
        store.store(group="method", name=f"{name}_schema", node=registry.get_method(name).Config)


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """The config ``python -m erasure.train <overrides>`` would see (without Hydra's runtime keys)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_method_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def apply_shortcuts(cfg: DictConfig, method_cls) -> None:
    """Copy each top-level shortcut that is set (``lambda``) into the method field that claims it; refuse it for a
    method that does not."""
    for key in SHORTCUTS:
        value = cfg.get(key)
        if value is None:
            continue
        field = method_cls.shortcuts.get(key)
        if field is None:
            owners = [m for m in registry.available() if key in registry.get_method(m).shortcuts]
            raise UserError(f"{key}={value} does not apply to method '{method_cls.name}': it is a setting of "
                            f"method={'/'.join(owners) or '(none)'}; remove {key}= from the command line")
        try:
            cfg.method[field] = value
        except OmegaConfBaseException as exc:
            raise UserError(f"{key}={value} is not a valid method.{field}: {str(exc).splitlines()[0]}") from None


_validated: dict[str, tuple] = {}  # configs (as YAML) this process has validated -> (method class, method config)


SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")  # trainer.sdpa_backends' names, torch's SDPBackend order


def sdpa_names(spec: str) -> list[str]:
    """``trainer.sdpa_backends``: [] for "auto" (PyTorch's choice), else the named kernels."""
    if spec == "auto":
        return []
    names = spec.split("+")
    bad = [n for n in names if n not in SDPA_BACKENDS]
    if bad or not names:
        raise UserError(f"trainer.sdpa_backends={spec} is not valid: use auto or a '+'-joined subset of "
                        f"{', '.join(SDPA_BACKENDS)} (e.g. flash+efficient)")
    return names


def validate(cfg: DictConfig):
    """Check the whole config before any model loads; returns (method class, typed method config).

    Shortcuts (``lambda``) are written into the method's config here, so the config saved with the run shows them.
    A config this process has already validated (the command line checks it before Hydra starts the job) is not
    checked again.
    """
    key = OmegaConf.to_yaml(cfg)
    if key in _validated:
        method_cls, method_cfg = _validated[key]
        apply_shortcuts(cfg, method_cls)
        return method_cls, method_cfg
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # an interpolation that does not resolve
        raise UserError(f"the config does not resolve: {str(exc).strip().splitlines()[0]}") from None
    tr = check("trainer", cfg.trainer, TrainerConfig, extra_ok=False)
    model = check("model", cfg.model, ModelConfig, extra_ok=True)  # tiers add their own keys
    check("concept", cfg.concept, ConceptConfig, extra_ok=True)  # methods add per-concept data (ablating:, fmn:)
    method_cls = registry.get_method(str(cfg.method.name))
    apply_shortcuts(cfg, method_cls)
    method_cfg = method_cls.parse_config(cfg.method)
    for group, typed in (("trainer", tr), ("model", model), ("method", method_cfg)):
        schema.check(typed, group)  # every numeric key within its range (erasure/schema.py)
    method_cls.validate_concept(cfg.concept)
    if tr.iterations < 1:
        raise UserError(f"trainer.iterations must be at least 1, got {tr.iterations}")
    if method_cls.shape != "adapter" and not list(cfg.params.get("include") or []) \
            and not list(cfg.params.get("text_encoder") or []):
        raise UserError(f"params={cfg.params.get('name')} selects no UNet parameter (nor a text-encoder one), and method '{method_cls.name}' "
                        f"trains model weights: choose a subset (its default: params={method_cls.default_params})")
    for key in ("include", "exclude", "text_encoder", "text_encoder_exclude"):
        for pattern in list(cfg.params.get(key) or []):
            try:
                re.compile(str(pattern))
            except re.error as exc:
                raise UserError(f"params.{key} pattern '{pattern}' is not a valid regular expression ({exc}): fix it in "
                                f"conf/params/{cfg.params.get('name')}.yaml or on the command line") from None
    if method_cls.shape == "closed_form" and tr.iterations != 1:
        raise UserError(f"method '{method_cls.name}' is a closed-form edit (one step): trainer.iterations must be 1, "
                        f"got {tr.iterations}")
    for key, low in (("teacher_batch", 1), ("keep_checkpoints", 1), ("preview_every", 0), ("checkpoint_every", 0),
                     ("probe_points", 0), ("probe_seeds", 1)):
        if getattr(tr, key) < low:
            raise UserError(f"trainer.{key} must be at least {low}, got {getattr(tr, key)}")
    if tr.precision not in ("auto", *DTYPES):
        raise UserError(f"unknown trainer.precision '{tr.precision}': choose auto, float32 or bfloat16")
    if tr.teacher_precision not in ("autocast", "pure"):
        raise UserError(f"trainer.teacher_precision={tr.teacher_precision} is not valid: use autocast or pure")
    sdpa_names(str(tr.sdpa_backends))  # an unknown kernel name fails here
    if not model.lr_scale > 0:
        raise UserError(f"model.lr_scale must be > 0, got {model.lr_scale}")
    if model.probe:
        registry.get_probe(model.probe)  # an unknown probe name fails here, not after training
    if (cfg.get("logger") or {}).get("name") == "wandb":
        from .loggers import check_wandb_env

        check_wandb_env()
    targets = list(cfg.concept.get("targets") or [])
    if not targets or any(not str(t).strip() for t in targets):
        raise UserError(f"concept '{cfg.concept.get('name')}' has no target text: set concept.targets to a list of prompts")
    _validated[key] = (method_cls, method_cfg)
    return method_cls, method_cfg
