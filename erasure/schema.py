"""The range of every numeric config key, in one table: what each schema field (``trainer``, ``model`` and every
method's ``Config``) may hold, checked by :func:`check` before anything loads (issue 20, "validation from the schema").

A field's rule is its ``dataclasses.field(metadata={"rule": ...})`` if it declares one, else the first rule of
:data:`RULES` whose pattern matches its name and whose kind matches its type. ``tests/test_schema.py`` checks that every
numeric field of every registered schema has a rule here (a new field without one fails there), and fuzzes every key
with wrong types, NaN/inf, out-of-range, empty and huge values: each is refused in one sentence naming the key, the
value and the allowed range, or accepted and within that range.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Callable

from .errors import UserError


@dataclasses.dataclass(frozen=True)
class Rule:
    describe: str  # completes "<key> must be ...": "a positive finite number"
    ok: Callable[[Any], bool]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    return _num(v) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE = Rule("a positive finite number", lambda v: _finite(v) and v > 0)
NONNEG = Rule("a finite number >= 0", lambda v: _finite(v) and v >= 0)
FINITE = Rule("a finite number", _finite)
BELOW_ONE = Rule("a number in [0, 1)", lambda v: _finite(v) and 0 <= v < 1)
OPEN_FRACTION = Rule("a number in (0, 1]", lambda v: _finite(v) and 0 < v <= 1)
POSITIVE_OR_NULL = Rule("a positive finite number or null", lambda v: v is None or (_finite(v) and v > 0))
NONNEG_OR_NULL = Rule("a finite number >= 0 or null", lambda v: v is None or (_finite(v) and v >= 0))


def at_least(low: int) -> Rule:
    return Rule(f"at least {low} (a whole number)", lambda v: _int(v) and v >= low)


def or_null(rule: Rule) -> Rule:
    return Rule(f"{rule.describe} or null", lambda v: v is None or rule.ok(v))


_ABSENT = object()


def check_keys(node, rules: dict[str, Rule], group: str) -> None:
    """Check the dotted keys of a config node (DictConfig or dict; an absent key is skipped) against ``rules``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    for key, rule in rules.items():
        value = OmegaConf.select(node, key, default=_ABSENT) if isinstance(node, DictConfig) else node.get(key, _ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, (ListConfig, tuple)):
            value = list(value)
        if not rule.ok(value):
            raise UserError(f"{group}.{key} must be {rule.describe}, got {value!r}")


def pair(describe: str, each: Callable[[Any], bool], ordered: bool = True) -> Rule:
    """Two values, each passing ``each`` (and low <= high with ``ordered``)."""
    def ok(v):
        v = list(v) if isinstance(v, (list, tuple)) else None
        return v is not None and len(v) == 2 and all(each(x) for x in v) and (not ordered or v[0] <= v[1])
    return Rule(describe, ok)


WINDOW = pair("two fractions [low, high] with 0 <= low <= high <= 1", lambda x: _finite(x) and 0 <= x <= 1)
BETAS = pair("two numbers in [0, 1) (Adam's beta1, beta2)", lambda x: _finite(x) and 0 <= x < 1, ordered=False)
SCALE_RANGE = pair("two positive numbers [low, high] with low <= high", lambda x: _finite(x) and x > 0)
SEEDS = Rule("a non-empty list of whole numbers >= 0", lambda v: isinstance(v, (list, tuple)) and len(v) > 0
             and all(_int(x) and x >= 0 for x in v))
RESOLUTION = Rule("a positive multiple of 8 (the VAE's downsampling factor) or null",
                  lambda v: v is None or (_int(v) and v > 0 and v % 8 == 0))
DEVICE = Rule("auto, cpu, cuda, cuda:<n> or mps",
              lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None)

# (name pattern, kinds it applies to, rule). Kinds: "int", "float", "pair", "list", "str". First match wins.
RULES: list[tuple[str, tuple[str, ...], Rule]] = [
    # optimisation
    (r"(.*_)?lr", ("float",), POSITIVE),
    (r"adam_eps", ("float",), POSITIVE),
    (r"adam_betas", ("pair",), BETAS),
    (r"weight_decay", ("float",), NONNEG),
    (r"grad_clip", ("float",), POSITIVE_OR_NULL),
    (r"lr_scale", ("float",), POSITIVE),
    (r"ema_decay", ("float",), BELOW_ONE),  # SDD's EMA: 1 would freeze the teacher
    # loss weights, strengths and regularisers: >= 0
    (r"lam|lamb|uce_lamb|alpha|la_strength|adv_weight|retain_loss_w|prior_loss_weight", ("float",), NONNEG),
    (r"erase_scale|uce_erase_scale", ("float",), POSITIVE),  # UCE/RECE: the erased concept's weight (0 erases nothing)
    (r".*_scale", ("float",), NONNEG_OR_NULL),  # erase/preserve/regular scales (RECE's uce_preserve_scale: null = auto)
    (r"transport_power", ("float",), POSITIVE),
    (r"mask_threshold", ("float",), OPEN_FRACTION),
    # guidance scales and signed coefficients: any finite value (negative guidance steers away)
    (r".*guidance|eta|gamma\d|reweight", ("float",), FINITE),
    # windows and ranges
    (r"window", ("list", "pair"), WINDOW),
    (r"anchor_scale", ("pair",), SCALE_RANGE),
    # counts and offsets that may be 0 (0 = none / never)
    (r"lr_warmup_steps|warmup|warmup_iter|adv_warmup|preview_every|checkpoint_every|probe_points|seed|image_seed",
     ("int",), at_least(0)),
    # counts that must be at least 1
    (r"T", ("int",), at_least(2)),  # DDIM steps of ours' chain (a chain of one step has no z_t to stop at)
    (r"iterations|epochs|rank|anchors|width|keep_checkpoints|probe_seeds|lr_scheduler_num_cycles", ("int",), at_least(1)),
    (r".*_steps?|.*batch(_size)?|num_.*|adv_tokens|adv_prompt_num|adv_every|adv_prompt_update_step", ("int",),
     at_least(1)),
    (r"preview_seeds", ("list",), SEEDS),
    (r"resolution", ("int",), RESOLUTION),
    (r"device", ("str",), DEVICE),
]
# the fallback for a numeric field no rule names (tests/test_schema.py refuses any such field in the shipped schemas)
FALLBACK = {"int": at_least(0), "float": FINITE}


def kind(tp) -> str | None:
    """The rule kind of a type hint: int, float, pair (a 2-tuple of floats), list (of numbers), str; None otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return kind(inner[0]) if len(inner) == 1 else None
    if tp is bool:
        return None
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if tp is str:
        return "str"
    if origin is tuple and len(args) == 2 and all(a in (int, float) for a in args):
        return "pair"
    if origin is list and args and args[0] in (int, float):
        return "list"
    return None


def rule_for(field: dataclasses.Field, tp) -> Rule | None:
    """The field's rule (its metadata, else the table by name and kind, else the numeric fallback); None for fields
    without a range (booleans, strings other than the device, prompt lists)."""
    if "rule" in field.metadata:
        return field.metadata["rule"]
    k = kind(tp)
    for pattern, kinds, rule in RULES:
        if k in kinds and re.fullmatch(pattern, field.name):
            return rule
    return FALLBACK.get(k)


def named_rule(field: dataclasses.Field, tp) -> bool:
    """Whether the field's rule comes from its metadata or the table (not the fallback)."""
    k = kind(tp)
    return "rule" in field.metadata or any(k in kinds and re.fullmatch(p, field.name) for p, kinds, _ in RULES)


def fields(schema) -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, type hint) of every field of a dataclass schema, nested dataclasses flattened."""
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += [(f"{f.name}.{n}", g, t) for n, g, t in fields(tp)]
        else:
            out.append((f.name, f, tp))
    return out


def check(obj, group: str) -> None:
    """Refuse the first field of the dataclass instance ``obj`` outside its range, in one sentence that names the key
    (``<group>.<name>``), the value and the range."""
    for name, f, tp in fields(type(obj)):
        rule = rule_for(f, tp)
        if rule is None:
            continue
        value = obj
        for part in name.split("."):
            value = getattr(value, part)
        if isinstance(value, tuple):
            value = list(value)
        if not rule.ok(value):
            raise UserError(f"{group}.{name} must be {rule.describe}, got {value!r}")
