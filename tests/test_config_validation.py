"""Bad configs end in one clean UserError before any model loads; random override mixes never crash."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erasure.cli import precheck_train_args
from erasure.errors import UserError

BAD = [
    (["lambda=-0.5"], "lambda must be >= 0"),
    (["concept.instructions.0.kappa=0"], "kappa must be in (0, 1]"),
    (["concept.instructions.0.kappa=1.01"], "kappa must be in (0, 1]"),
    (["concept.instructions.1.window=[0.8,0.3]"], "0 <= low <= high <= 1"),
    (["concept.instructions.1.window=[0.2,1.5]"], "0 <= low <= high <= 1"),
    (["concept.targets=[]"], "has no target text"),
    (["concept.targets=['  ']"], "has no target text"),
    (["trainer.iterations=0"], "iterations must be at least 1"),
    (["trainer.iterations=abc"], "could not be converted to Integer"),
    (["trainer.teacher_batch=0"], "teacher_batch must be at least 1"),
    (["trainer.keep_checkpoints=0"], "keep_checkpoints must be at least 1"),
    (["trainer.precision=int8"], "unknown trainer.precision"),
    (["method=nosuch"], "unknown method 'nosuch'"),
    (["params=nosuch"], "unknown parameter subset 'nosuch'"),
    (["concept=nosuch"], "unknown concept 'nosuch'"),
    (["model=nosuch"], "unknown model 'nosuch'"),
    (["logger=nosuch"], "unknown logger 'nosuch'"),
    (["method.T=1"], "method.T (DDIM steps) must be at least 2"),
    (["method.lr=0"], "method.lr must be a positive finite number"),
    (["method.signal=magic"], "method.signal must be"),
    (["method.gamma1=high"], "method.gamma1=high (Value 'high' of type 'str' could not be converted to Float)"),
    (["method=esd", "lambda=3"], "lambda=3 does not apply to method 'esd': it is a setting of method=ours"),
    (["-m", "method=ours,sdd", "lambda=1"], "lambda=1 does not apply to method 'sdd'"),
    (["lamda=3"], "Could not override 'lamda'"),
    (["method=sdd", "method.T=6"], "Could not override 'method.T' (Key 'T' not in 'SDDConfig')"),
    (["-m", "lambda=0,1,-1"], "lambda must be >= 0"),
    (["-m", "method=ours,nosuch"], "unknown method 'nosuch'"),
    (["model.resolution=big"], "could not be converted to Integer"),
    # a method's per-concept settings are checked by the method before any model loads (validate_concept)
    (["method=ablating", "~concept.ablating"], "concept 'nudity' has no Ablating Concepts data"),
    (["method=ablating", "concept.ablating.mode=poem"], "concept.ablating.mode must be one of caption, style, object"),
    (["method=fmn", "concept.fmn.type=poem"], "concept.fmn.type must be one of object, style"),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_clear_user_error(argv, words):
    with pytest.raises(UserError) as err:
        precheck_train_args(["model=tiny", "concept=nudity", *argv])
    message = str(err.value)
    assert words in message and "\n" not in message


def test_good_input_passes():
    precheck_train_args(["model=tiny", "method=ours", "lambda=0", "params=xattn", "trainer.iterations=3"])
    precheck_train_args(["-m", "model=tiny", "lambda=0,0.5,1,1.5,5"])


KEYS = {
    "lambda": st.one_of(st.floats(-10, 10, allow_nan=False), st.just("x")),
    "trainer.iterations": st.one_of(st.integers(-3, 300), st.just("many")),
    "trainer.teacher_batch": st.integers(-2, 64),
    "method": st.sampled_from(["ours", "esd", "sdd", "ablating", "fmn", "bogus"]),
    "params": st.sampled_from(["to_out", "xattn", "xattn_kv", "noxattn", "full", "bogus"]),
    "concept.instructions.0.kappa": st.one_of(st.floats(-1, 2, allow_nan=False), st.just("k")),
    "concept.instructions.0.window": st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=2, max_size=2)
        .map(lambda w: f"[{w[0]},{w[1]}]"),
    "trainer.seed": st.integers(0, 2**31),
    "method.lr": st.floats(-1e-3, 1e-3, allow_nan=False),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(KEYS)), st.none(), min_size=1, max_size=4).flatmap(
    lambda d: st.fixed_dictionaries({k: KEYS[k] for k in d})))
def test_random_overrides_compose_and_validate_or_fail_cleanly(overrides):
    argv = ["model=tiny", "concept=nudity"] + [f"{k}={v}" for k, v in overrides.items()]
    try:
        precheck_train_args(argv)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("override,match", [
    ("method.lr=inf", "method.lr must be a positive finite number, got inf"),
    ("method.lr=nan", "method.lr must be a positive finite number, got nan"),
    ("method.grad_clip=-1", "method.grad_clip must be a positive finite number or null"),
    ("method.grad_clip=inf", "method.grad_clip must be a positive finite number or null"),
])
def test_non_finite_or_negative_optimizer_settings_are_refused(override, match):
    """A negative grad_clip would turn clipping into gradient ascent; an infinite lr makes a NaN delta (issue 20)."""
    from tests.conftest import assert_refused_in_one_sentence

    assert_refused_in_one_sentence(["model=tiny", "concept=nudity", override], match)
