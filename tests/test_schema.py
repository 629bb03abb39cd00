"""Every numeric config key has a range (erasure/schema.py), checked before anything loads (issue 20): a table check
that no shipped schema field falls back to the default rule, hand-picked bad values with their sentences, and a
property-based fuzz over every key of every method, the trainer and the model."""
from __future__ import annotations


import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erasure import registry, schema
from erasure.cli import precheck_train_args
from erasure.config import ModelConfig, TrainerConfig
from erasure.errors import UserError

SCHEMAS = {"trainer": TrainerConfig, "model": ModelConfig, **{m: registry.get_method(m).Config for m in registry.available()}}
# every (group, method, key) with a rule: the trainer's and model's keys with method=ours, each method's own with it
KEYS = [(g if g in ("trainer", "model") else "method", "ours" if g in ("trainer", "model") else g, name, f, tp)
        for g, cls in SCHEMAS.items() for name, f, tp in schema.fields(cls) if schema.rule_for(f, tp) is not None]


def _entry_point_options() -> dict:
    from erasure.bench import BenchOptions
    from erasure.purify import PurifyOptions

    return {"bench": BenchOptions, "purify": PurifyOptions}


def test_every_numeric_field_of_every_schema_has_a_named_range():
    unnamed = [f"{g}.{name}" for g, cls in {**SCHEMAS, **_entry_point_options()}.items()
               for name, f, tp in schema.fields(cls)
               if schema.kind(tp) in ("int", "float", "pair", "list") and not schema.named_rule(f, tp)]
    assert unnamed == []
    assert len(KEYS) >= 140  # the fuzz below draws from all of them


@pytest.mark.parametrize("argv, words", [
    (["method.adam_eps=0"], "method.adam_eps must be a positive finite number, got 0.0"),
    (["method.weight_decay=-0.1"], "method.weight_decay must be a finite number >= 0, got -0.1"),
    (["method.adam_betas=[0.9,1.5]"], "method.adam_betas must be two numbers in [0, 1)"),
    (["method.lr=nan"], "method.lr must be a positive finite number, got nan"),
    (["method.grad_clip=-1"], "method.grad_clip must be a positive finite number"),
    (["method.implicit.window=[0.8,0.2]"], "0 <= low <= high <= 1"),
    (["method.implicit.window=[0.1]"], "method.implicit.window"),
    (["trainer.device=tpu"], "trainer.device must be auto, cpu, cuda, cuda:<n> or mps, got 'tpu'"),
    (["trainer.preview_seeds=[]"], "trainer.preview_seeds must be a non-empty list of whole numbers >= 0, got []"),
    (["trainer.probe_points=-1"], "trainer.probe_points must be at least 0 (a whole number), got -1"),
    (["model.resolution=0"], "model.resolution must be a positive multiple of 8"),
    (["model.resolution=30"], "model.resolution must be a positive multiple of 8"),
    (["method=sdd", "method.ema_decay=1.5"], "method.ema_decay must be a number in [0, 1), got 1.5"),
    (["method=salun", "method.mask_threshold=0"], "method.mask_threshold must be a number in (0, 1], got 0.0"),
    (["method=spm", "method.anchor_scale=[1.2,0.8]"],
     "method.anchor_scale must be two positive numbers [low, high] with low <= high"),
    (["method=spm", "method.transport_power=0"], "method.transport_power must be a positive finite number, got 0.0"),
    (["method=uce", "method.erase_scale=-1"], "method.erase_scale must be > 0, got -1.0"),
    (["method=advunlearn", "method.attack_step=0"], "method.attack_step must be at least 1, got 0"),
    (["method=esd", "method.ddim_steps=-3"], "method.ddim_steps must be at least 2, got -3"),
])
def test_a_value_out_of_range_is_one_sentence_naming_key_value_and_range(argv, words):
    with pytest.raises(UserError) as err:
        precheck_train_args(["model=tiny", "concept=nudity", *argv])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_values_on_the_edge_of_their_range_pass():
    precheck_train_args(["model=tiny", "concept=nudity", "method.weight_decay=0", "trainer.probe_points=0",
                         "trainer.device=cuda:1", "model.resolution=64", "method.grad_clip=null",
                         "method.implicit.window=[0.3,0.3]"])
    precheck_train_args(["model=tiny", "concept=nudity", "method=sdd", "method.ema_decay=0"])


# ------------------------------------------------------------------------------------------------------ fuzz
TEXTS = ["nan", "inf", "-inf", "-1", "0", "1", "2", "0.5", "-0.5", "1e30", "1e400", "3.7", "x", "''", "[]", "[0.5]",
         "[0.2,0.9]", "[0.9,0.2]", "[1,2,3]", "null", "true", str(2 ** 70)]
WRONG = object()  # a value the key's type cannot hold


def parsed(text: str):
    """The value Hydra's override grammar gives the text (numbers as Hydra reads them: 1e30 is a float)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def as_kind(value, kind: str, nullable: bool):
    """The value the config would hold after type conversion, or WRONG where the conversion must fail."""
    if value is None:
        return None if nullable else WRONG
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        return value if number and isinstance(value, int) else WRONG
    if kind == "float":
        return float(value) if number else WRONG
    if kind in ("pair", "list"):
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return WRONG
        return value if kind == "list" or len(value) == 2 else WRONG
    return value if isinstance(value, str) else WRONG


FUZZ_ARGS = (st.sampled_from(range(len(KEYS))), st.sampled_from(TEXTS))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(*FUZZ_ARGS)
def test_every_key_refuses_what_its_range_refuses_in_one_sentence(index, text):
    _refused_or_in_range(index, text)


@pytest.mark.slow
def test_every_key_refuses_what_its_range_refuses_in_one_sentence_more():
    """make test-slow: 600 (key, text) pairs instead of 60."""
    settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])(
        given(*FUZZ_ARGS)(_refused_or_in_range))()


def _refused_or_in_range(index, text):
    group, method, name, field, tp = KEYS[index]
    rule = schema.rule_for(field, tp)
    nullable = "None" in str(tp) or "Optional" in str(tp)
    value = as_kind(parsed(text), schema.kind(tp), nullable)
    argv = ["model=tiny", "concept=nudity", f"method={method}", f"{group}.{name}={text}"]
    try:
        precheck_train_args(argv)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)  # refused in one sentence (any reason)
    else:  # accepted: then the value is what its range allows
        assert value is not WRONG and rule.ok(value), f"{' '.join(argv)} was accepted"
        return
    if value is not WRONG and rule.ok(value):
        return  # within the range, refused for another reason (e.g. a closed-form method's one iteration)


@pytest.mark.parametrize("args, words", [
    (["-m", "erasure.bench", "--model", "tiny", "--iterations", "-3"], "bench.iterations must be at least 1"),
    (["-m", "erasure.bench", "--model", "tiny", "--reference-iterations", "-1"], "bench.reference_iterations must be at least 0"),
    (["-m", "erasure.bench", "--model", "tiny", "--device", "tpu"], "bench.device must be auto, cpu, cuda"),
    (["-m", "erasure.bench", "--model", "tiny", "--variant", "channels_last"], "--variant 'channels_last' is not NAME=OVERRIDES"),
    (["-m", "erasure.bench", "--model", "tiny", "--generation-sdpa", "auto,fast"], "trainer.sdpa_backends=fast is not valid"),
    (["-m", "erasure.purify", "run=nosuch", "image=nosuch", "guidance=nan"], "purify.guidance must be a finite number, got nan"),
    (["-m", "erasure.purify", "run=nosuch", "image=nosuch", "regen_guidance=inf"], "purify.regen_guidance must be a finite"),
    (["-m", "erasure.purify", "run=nosuch", "image=nosuch", "device=gpu"], "purify.device must be auto, cpu"),
])
def test_bench_and_purify_check_their_numbers_before_loading_anything(args, words):
    """Issue 20: `erasure.bench --iterations -3` and `erasure.purify guidance=nan` used to run (or fail deep inside);
    their numbers now have ranges in erasure/schema.py, checked first: one line, exit 2."""
    from tests.conftest import run_cli

    proc = run_cli(args)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr[-1500:]
