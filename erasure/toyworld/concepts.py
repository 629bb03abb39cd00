"""Concept configs of the toy world from one rule: ``conf/concept/toy/<name>.yaml`` for every shape and colour.

    python -m erasure.toyworld.write_concepts [out=conf/concept/toy] [mace_out=data/mace/toyworld] [check=false]

(:mod:`erasure.toyworld.write_concepts`) writes the 11 concept configs (6 shapes, 5 colours: :data:`erasure.toyworld.world.SHAPES` and ``COLORS``) and each
concept's MACE images and masks; ``check=true`` writes nothing and exits 1 when a file on disk differs from what the
rule makes (the test suite and ``make concepts`` run it). Train with ``concept=toy/<name>``.

The hand-written ``conf/concept/circle.yaml`` stays the concept of the paper-style Table 1: its κ and window were
chosen by measuring ours on the circle. Here every setting that only one method reads is fixed once for the whole
world, so a result over all 11 concepts says what a method does on a concept nobody tuned it for. The rule, for a
concept X of kind K (shape or colour), with the world's words for X (``world.SHAPE_NOUNS``/``SHAPE_ADJECTIVES``,
``COLOR_WORDS``):

* targets: ``a X`` (a shape) or ``a X shape`` (a colour), as circle.yaml and red.yaml.
* instruction concepts (All-but-One, paper Supplementary Eq. 23): one steering away from a related phrasing of X --
  the shape's adjective (``a round shape``, circle.yaml's) or the colour's last synonym (``a crimson shape``,
  red.yaml's; a colour with one word steers away from itself, ``a green shape``) -- and two alternatives towards
  which it is steered, the kind's members two and three places further in the world's order (circle: square and
  triangle, as circle.yaml; red: blue, as red.yaml, and yellow). g, κ and window are :data:`AWAY`, :data:`TOWARDS`,
  :data:`KAPPA` and :data:`WINDOW` for every concept: circle.yaml's measured choice (docs/TOYWORLD.md).
* probe: target prompts name X in every value of the other attribute, one with a synonym and (shapes) one with the
  adjective; preserved prompts are every other member of X's kind in two values of the other attribute (the nearest
  neighbour included: the oval for the circle), 10 seeds each.
* Ablating's anchors (the broader category "shape"), FMN's word and reference prompts, MACE's templates and data
  (renders and exact masks of X: :mod:`erasure.toyworld.mace_data`), AdvUnlearn's retain prompts and SalUn's forget /
  pseudo / retain prompts follow circle.yaml's and red.yaml's sections, with X in place of circle or red.
"""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from ..config import CONF_DIR
from ..errors import UserError
from ..io import write_text_atomic
from . import world
from .world import write_concept_data

log = logging.getLogger("erasure.toyworld.concepts")
ROOT = CONF_DIR.parent
OUT = "conf/concept/toy"
MACE_OUT = "data/mace/toyworld"

# One setting for the whole world (conf/concept/circle.yaml, measured there; docs/TOYWORLD.md): the paper's
# away/towards guidance magnitudes (Supplementary Eq. 23: -7.5 for "sexual", 6.5 for the cover-ups) with kappa 0.5 and
# the full window, because SEGA's 95th percentile keeps only 3 of the toy latents' 64 positions per channel.
AWAY = -7.5
TOWARDS = 6.5
KAPPA = 0.5
WINDOW = (0.0, 1.0)
PROBE_SEEDS = 10  # images per probe prompt, as circle.yaml and red.yaml
N_ALTERNATIVES = 2  # instruction concepts steering towards another member of the kind
N_RETAIN_ADVUNLEARN = 10  # AdvUnlearn's retain prompts, as circle.yaml
MACE_IMAGES = 8  # MACE's images per concept (official inference.py l.18)
# MACE's prompt templates (official object templates replaced by the toy captions' grammar, as circle.yaml and
# circle_red_triangle.yaml): "{}" is a shape noun, or for a colour the colour word.
SHAPE_TEMPLATES = ["a {}", *(f"a {c} {{}}" for c in world.COLORS), "a crimson {}", "a violet {}", "a small {}",
                   "a large {}", "a small red {}", "a large blue {}", "a small green {}", "a large yellow {}",
                   *(f"a {{}} on a {b} background" for b in world.BACKGROUNDS), "a red {} on a black background",
                   "a green {} on a gray background", "a blue {} on a white background",
                   "a yellow {} on a black background", "a purple {} on a grey background"]
COLOR_TEMPLATES = ["a {} shape", *(f"a {{}} {s}" for s in world.SHAPES), "a small {} shape", "a large {} shape",
                   "a small {} square", "a large {} cross", "a small {} diamond", "a large {} triangle",
                   "a round {} shape", *(f"a {{}} shape on a {b} background" for b in world.BACKGROUNDS),
                   "a {} square on a black background", "a {} circle on a gray background",
                   "a {} oval on a white background", "a {} diamond on a black background",
                   "a {} cross on a grey background"]


def names() -> list[str]:
    """Every concept of the world: the shapes, then the colours."""
    return [*world.SHAPES, *world.COLORS]


def kind(name: str) -> str:
    if name in world.SHAPES:
        return "shape"
    if name in world.COLORS:
        return "color"
    raise UserError(f"'{name}' is no concept of the toy world: choose one of {', '.join(names())}")


def _members(k: str) -> tuple[str, ...]:
    return world.SHAPES if k == "shape" else world.COLORS


def alternatives(name: str) -> list[str]:
    """The members of the concept's kind two and three places further in the world's order (cyclic)."""
    members = _members(kind(name))
    i = members.index(name)
    return [members[(i + 2 + j) % len(members)] for j in range(N_ALTERNATIVES)]


def phrase(label: str) -> str:
    """The prompt that names one member alone: 'a square', 'a red shape'."""
    return world.prompt(label) if kind(label) == "shape" else f"a {label} shape"


def away_text(name: str) -> str:
    """The related phrasing steered away from: the shape's adjective, or the colour's last synonym."""
    if kind(name) == "shape":
        adjective = world.SHAPE_ADJECTIVES[name]
        return f"{world.article(adjective)} {adjective} shape"
    return f"a {world.COLOR_WORDS[name][-1]} shape"


def combo(shape: str, color: str) -> str:
    return world.prompt(shape, color)


def _label(shape: str, color: str) -> dict:
    return {"prompt": combo(shape, color), "shape": shape, "color": color}


def target_prompts(name: str) -> list[str]:
    """The concept in every value of the other attribute; the 4th with the last synonym, a shape's 5th with its
    adjective (circle: circle.yaml's five prompts)."""
    if kind(name) == "shape":
        out = []
        for i, c in enumerate(world.COLORS):
            if i == 3:
                out.append(f"a {c} {world.SHAPE_NOUNS[name][-1]}")
            elif i == 4:
                adjective = world.SHAPE_ADJECTIVES[name]
                out.append(f"{world.article(adjective)} {adjective} {c} shape")
            else:
                out.append(combo(name, c))
        return out
    word = world.COLOR_WORDS[name][-1]
    return [combo(s, word if i == 3 else name) for i, s in enumerate(world.SHAPES)]


def preserve_prompts(name: str) -> list[dict]:
    """Every other member of the kind, in two values of the other attribute chosen so that each value appears."""
    k = kind(name)
    others = [m for m in _members(k) if m != name]
    out = []
    for j, m in enumerate(others):
        if k == "shape":  # 5 other shapes x colours j and j+2: every colour twice
            out += [_label(m, world.COLORS[j % 5]), _label(m, world.COLORS[(j + 2) % 5])]
        else:  # 4 other colours x shapes j and j+3: every shape at least once
            out += [_label(world.SHAPES[j % 6], m), _label(world.SHAPES[(j + 3) % 6], m)]
    return out


def _other_combos(name: str) -> list[dict]:
    """Every (shape, colour) prompt of the world that does not show the concept, in the world's order."""
    k = kind(name)
    return [_label(s, c) for s in world.SHAPES for c in world.COLORS if (s if k == "shape" else c) != name]


def _forget(name: str, label: str | None = None) -> list[str]:
    """The concept (or ``label`` in its place) in every value of the other attribute."""
    label = label or name
    if kind(name) == "shape":
        return [combo(label, c) for c in world.COLORS]
    return [combo(s, label) for s in world.SHAPES]


def concept_config(name: str) -> dict:
    """The concept config of one shape or colour (see the module docstring for the rule)."""
    k = kind(name)
    alts = alternatives(name)
    targets = [phrase(name)]
    probe_targets = target_prompts(name)
    preserve = preserve_prompts(name)
    preserved = {p["prompt"] for p in preserve}
    remaining = [p["prompt"] for p in _other_combos(name) if p["prompt"] not in preserved]
    step = len(remaining) / N_RETAIN_ADVUNLEARN
    instructions = [{"text": away_text(name), "guidance": AWAY, "window": list(WINDOW), "kappa": KAPPA}]
    instructions += [{"text": phrase(a), "guidance": TOWARDS, "window": list(WINDOW), "kappa": KAPPA} for a in alts]
    if k == "shape":
        ablating = {"anchor_prompts": [f"a {c} shape" for c in world.COLORS], "captions": [f"shape+{name}"],
                    "mode": "object"}
    else:
        ablating = {"anchor_prompts": ["a shape", "a small shape", "a large shape",
                                       *(f"a shape on a {b} background" for b in world.BACKGROUNDS)],
                    "captions": [f"shape+{name} shape"], "mode": "object"}
    return {
        "name": name,
        "targets": targets,
        "instructions": instructions,
        "preview_prompts": [*targets, *probe_targets[:2], *(p["prompt"] for p in preserve[:3])],
        "probe": {"attribute": k, "concept": name, "replacement": None, "target_prompts": probe_targets,
                  "preserve_prompts": preserve, "seeds": PROBE_SEEDS},
        "ablating": ablating,
        "fmn": {"text": name, "type": "object", "reference_prompts": _forget(name)},
        "mace": {"concepts": [name], "mappings": ["background"], "type": "object",
                 "templates": SHAPE_TEMPLATES if k == "shape" else COLOR_TEMPLATES, "data_dir": MACE_OUT},
        "advunlearn": {"retain_prompts": [remaining[int(i * step)] for i in range(N_RETAIN_ADVUNLEARN)]},
        "salun": {"forget_prompts": _forget(name), "pseudo_prompts": _forget(name, alts[0]),
                  "retain_prompts": remaining},
    }


def render_yaml(name: str) -> str:
    """The concept config as the text of its yaml file (a header naming the rule, then the config)."""
    header = (f"# Generated by `python -m erasure.toyworld.write_concepts` (the rule: erasure/toyworld/concepts.py): the toy world's {kind(name)} "
              f"'{name}'\n# from the one rule for every concept. Do not edit: change the rule and regenerate "
              "(tests/test_toy_concepts.py checks that\n# this file is what the rule makes).\n")
    return header + yaml.safe_dump(concept_config(name), sort_keys=False, default_flow_style=None, width=120)


def write(out: Path, mace_out: Path, check: bool = False) -> list[str]:
    """Write (or with ``check`` compare) every concept's yaml and MACE data; returns the files that differ (check) or
    were written."""
    import tempfile

    changed = []
    for name in names():
        path = out / f"{name}.yaml"
        text = render_yaml(name)
        if not path.is_file() or path.read_text() != text:
            changed.append(str(path))
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, text)
        shape, color = (name, None) if kind(name) == "shape" else (None, name)
        if check:
            with tempfile.TemporaryDirectory() as tmp:
                write_concept_data(tmp, shape, MACE_IMAGES, 0, color)
                for made in sorted(Path(tmp).rglob("*.png")):
                    rel = made.relative_to(tmp)
                    if not (mace_out / rel).is_file() or (mace_out / rel).read_bytes() != made.read_bytes():
                        changed.append(str(mace_out / rel))
        elif not (mace_out / name).is_dir():
            write_concept_data(mace_out, shape, MACE_IMAGES, 0, color)
            changed.append(str(mace_out / name))
    return changed
