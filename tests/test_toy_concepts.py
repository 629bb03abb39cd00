"""The toy world's concepts from one rule (erasure/toyworld/concepts.py, issue 19): the committed files are what the rule
makes, the rule reproduces the hand-written circle and red configs where it should, and every concept's prompts keep
the probe honest (preserved prompts never show the concept; every other member of the kind is preserved)."""
from __future__ import annotations

import pytest
import yaml

from erasure.config import CONF_DIR, compose, group_options, validate
from erasure.toyworld import concepts as toy
from erasure.toyworld import world

HAND = {name: yaml.safe_load((CONF_DIR / "concept" / f"{name}.yaml").read_text()) for name in ("circle", "red")}


def test_committed_files_are_what_the_rule_makes():
    assert toy.write(toy.ROOT / toy.OUT, toy.ROOT / toy.MACE_OUT, check=True) == []
    for name in toy.names():
        assert yaml.safe_load((CONF_DIR / "concept" / "toy" / f"{name}.yaml").read_text()) == toy.concept_config(name)
    assert [o for o in group_options("concept") if o.startswith("toy/")] == sorted(f"toy/{n}" for n in toy.names())


def test_check_reports_an_edited_file(tmp_path):
    out, mace = tmp_path / "conf", tmp_path / "mace"
    assert len(toy.write(out, mace)) == 2 * len(toy.names())  # every yaml and every MACE folder written
    assert toy.write(out, mace, check=True) == []
    (out / "oval.yaml").write_text((out / "oval.yaml").read_text().replace("kappa: 0.5", "kappa: 0.6", 1))
    (mace / "red mask" / "3_mask.png").write_bytes(b"")
    assert sorted(toy.write(out, mace, check=True)) == sorted([str(out / "oval.yaml"), str(mace / "red mask" / "3_mask.png")])


def test_generated_circle_against_the_hand_written_one():
    """Same targets, instruction concepts (text, g, κ, window), probe targets, Ablating, FMN, MACE and SalUn's forget and
    pseudo prompts as circle.yaml; the preserved prompts differ: every other shape twice instead of circle.yaml's 7
    picks, so the retain sets (all other prompts less the preserved ones) differ with them."""
    gen, hand = toy.concept_config("circle"), HAND["circle"]
    same = ["name", "targets", "instructions", "ablating", "fmn"]
    assert {k: gen[k] for k in same} == {k: hand[k] for k in same}
    assert gen["probe"]["target_prompts"] == hand["probe"]["target_prompts"]
    assert {k: v for k, v in gen["probe"].items() if k not in ("target_prompts", "preserve_prompts")} == \
        {k: v for k, v in hand["probe"].items() if k not in ("target_prompts", "preserve_prompts")}
    assert {k: v for k, v in gen["mace"].items()} == hand["mace"]
    assert gen["salun"]["forget_prompts"] == hand["salun"]["forget_prompts"]
    assert gen["salun"]["pseudo_prompts"] == hand["salun"]["pseudo_prompts"]
    hand_preserved = {p["prompt"] for p in hand["probe"]["preserve_prompts"]}
    gen_preserved = {p["prompt"] for p in gen["probe"]["preserve_prompts"]}
    assert len(gen_preserved) == 10 and len(hand_preserved) == 7
    assert hand_preserved & gen_preserved == {"a blue triangle", "a blue oval"}
    # the rule's retain set is circle.yaml's construction (every other prompt less the preserved) on its own preserved set
    others = {world.prompt(s, c) for s in world.SHAPES for c in world.COLORS if s != "circle"}
    assert set(hand["salun"]["retain_prompts"]) == others - hand_preserved
    assert set(gen["salun"]["retain_prompts"]) == others - gen_preserved


def test_generated_red_against_the_hand_written_one():
    gen, hand = toy.concept_config("red"), HAND["red"]
    assert gen["targets"] == hand["targets"] == ["a red shape"]
    assert gen["instructions"][:2] == hand["instructions"]  # away from "crimson", towards blue; the rule adds yellow
    assert gen["instructions"][2]["text"] == "a yellow shape"
    assert gen["ablating"] == hand["ablating"]
    assert sorted(gen["fmn"]["reference_prompts"]) == sorted(hand["fmn"]["reference_prompts"])


@pytest.mark.parametrize("name", toy.names())
def test_every_concept_follows_the_rule(name):
    cfg = toy.concept_config(name)
    kind = toy.kind(name)
    members = world.SHAPES if kind == "shape" else world.COLORS
    others = [m for m in members if m != name]
    i = members.index(name)
    # one instruction away, two towards the members 2 and 3 places on; one g, κ and window for the world
    texts = [x["text"] for x in cfg["instructions"]]
    expected_away = {"circle": "a round shape", "oval": "an oval shape", "square": "a square shape",
                     "triangle": "a triangular shape", "diamond": "a diamond-shaped shape", "cross": "a cross-shaped shape",
                     "red": "a crimson shape", "green": "a green shape", "blue": "a blue shape", "yellow": "a yellow shape",
                     "purple": "a violet shape"}[name]
    alts = [members[(i + 2) % len(members)], members[(i + 3) % len(members)]]
    word = (lambda m: f"{world.article(m)} {m}") if kind == "shape" else (lambda m: f"a {m} shape")
    assert texts == [expected_away, word(alts[0]), word(alts[1])]
    assert [x["guidance"] for x in cfg["instructions"]] == [-7.5, 6.5, 6.5]
    assert all(x["kappa"] == 0.5 and x["window"] == [0.0, 1.0] for x in cfg["instructions"])
    probe = cfg["probe"]
    assert probe["attribute"] == kind and probe["concept"] == name and probe["seeds"] == 10
    # preserved prompts: every other member twice, none showing the concept, labels matching the prompt's words
    preserved = probe["preserve_prompts"]
    assert sorted(p[kind] for p in preserved) == sorted(others * 2)
    for p in preserved:
        assert p["prompt"] == world.prompt(p["shape"], p["color"]) and name not in p["prompt"].split()
    other_attr = world.COLORS if kind == "shape" else world.SHAPES
    assert {p["color" if kind == "shape" else "shape"] for p in preserved} == set(other_attr)
    # target prompts: one per value of the other attribute, each naming the concept (or its synonym / adjective)
    words = set(world.SHAPE_NOUNS[name]) | {world.SHAPE_ADJECTIVES[name]} if kind == "shape" else set(world.COLOR_WORDS[name])
    assert len(probe["target_prompts"]) == len(other_attr)
    assert all(words & set(t.split()) or any(w in t for w in words) for t in probe["target_prompts"])
    # the retain sets never hold a preserved probe prompt or the concept
    shown = {p["prompt"] for p in preserved}
    for retain in (cfg["advunlearn"]["retain_prompts"], cfg["salun"]["retain_prompts"]):
        assert not set(retain) & shown and all(name not in r.split() for r in retain)
    assert len(cfg["advunlearn"]["retain_prompts"]) == len(set(cfg["advunlearn"]["retain_prompts"])) == 10
    assert len(cfg["salun"]["retain_prompts"]) == len(world.SHAPES) * len(world.COLORS) - \
        len(world.COLORS if kind == "shape" else world.SHAPES) - len(preserved)
    assert len(cfg["salun"]["forget_prompts"]) == len(cfg["salun"]["pseudo_prompts"])
    assert all(alts[0] in p.split() for p in cfg["salun"]["pseudo_prompts"])


@pytest.mark.parametrize("name", ["oval", "yellow"])
@pytest.mark.parametrize("method", ["ours", "ablating", "fmn", "mace", "salun", "advunlearn", "uce"])
def test_generated_concepts_validate_for_every_method_that_reads_them(name, method):
    validate(compose(["model=toyworld", f"concept=toy/{name}", f"method={method}"]))


def test_unknown_concept_is_one_sentence():
    from erasure.errors import UserError

    with pytest.raises(UserError, match="no concept of the toy world"):
        toy.concept_config("hexagon")
