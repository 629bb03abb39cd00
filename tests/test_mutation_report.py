"""make mutation's report (tests/mutation_report.py): which surviving mutants it sets apart as equivalent or as
message-only, on original/mutant pairs written out here."""
from __future__ import annotations

import ast

import pytest

from tests.mutation_report import changed, score


def pair(original: str, mutant: str):
    return (ast.parse(f"def f(x, ctx, n):\n    {original}\n").body[0],
            ast.parse(f"def f(x, ctx, n):\n    {mutant}\n").body[0])


@pytest.mark.parametrize("original, mutant, kind", [
    ("return torch.ones(3, device=ctx.device)", "return torch.ones(3, device=None)", "device"),
    ("return torch.ones(3, device=ctx.device)", "return torch.ones(3, )", "device"),
    ("return x.to(ctx.device)", "return x.to(None)", "device"),
    ("return x.to(ctx.device, x.dtype)", "return x.to(x.dtype)", "device"),
    ("return torch.randint(0, n, (1,))", "return torch.randint(n, (1,))", "randint"),
    # not equivalent: a dtype, a size, another low end, another argument of the call
    ("return x.to(ctx.device, x.dtype)", "return x.to(ctx.device, None)", None),
    ("return x.to(ctx.device, x.dtype)", "return x.to(ctx.device)", None),
    ("return torch.ones(3, device=ctx.device)", "return torch.ones(4, device=ctx.device)", None),
    ("return torch.randint(0, n, (1,))", "return torch.randint(1, n, (1,))", None),
    ("return torch.randint(0, n, (1,))", "return torch.randint(0, (1,))", None),
    ("return torch.randint(1, n, (1,))", "return torch.randint(n, (1,))", None),
    ("return torch.ones(3, device=ctx.device, dtype=x.dtype)", "return torch.ones(3, device=ctx.device)", None),
    # one equivalent change beside one that is not: not equivalent
    ("return torch.ones(n, device=ctx.device) + x", "return torch.ones(n, device=None) - x", None),
])
def test_equivalent_classes(original, mutant, kind):
    *_, message, got = changed(*pair(original, mutant))
    assert got == kind and not message


def test_message_mutants_and_the_line_of_the_change():
    orig = ast.parse("def f(x):\n    y = x + 1\n    raise ValueError(f'bad {y}')\n").body[0]
    mut = ast.parse("def f(x):\n    y = x + 1\n    raise ValueError(f'XXbad {y}XX')\n").body[0]
    assert changed(orig, mut) == (3, 3, True, None)
    mut = ast.parse("def f(x):\n    y = x - 1\n    raise ValueError(f'bad {y}')\n").body[0]
    assert changed(orig, mut) == (2, 2, False, None)


def test_score_sets_message_and_equivalent_mutants_aside():
    row = dict(checked=10, killed=6, message=[1], equivalent=[1, 2], survived=[1])
    assert score(row) == pytest.approx(6 / 7)
    assert score(dict(checked=2, killed=0, message=[1], equivalent=[1], survived=[])) is None


def test_the_verdicts_travel_through_the_committed_state(tmp_path):
    """--save copies every listed module's verdicts out of mutants/; --restore copies them back only where mutants/
    has none (a run in progress keeps its own), and never a torn file or a module outside [tool.mutmut]."""
    import json

    from tests import mutation_report as mr

    mutants, state = tmp_path / "mutants", tmp_path / "state"
    verdicts = {"exit_code_by_key": {"baselines.esd.x__mutmut_1": 1}, "hash_by_function_name": {"x": "h"}}
    for rel in ("baselines/esd.py", "baselines/uce.py", "tests/conftest.py"):
        (state / rel).parent.mkdir(parents=True, exist_ok=True)
        (state / f"{rel}.meta").write_text(json.dumps(verdicts))
    (mutants / "baselines").mkdir(parents=True)
    (mutants / "baselines" / "uce.py.meta").write_text('{"exit_code_by_key": {}}')  # this run's own: kept
    (state / "baselines" / "fmn.py.meta").write_text('{"exit_code_by_key": {')  # torn: refused
    with pytest.raises(json.JSONDecodeError):
        mr._copy_meta(state, mutants, keep_existing=True)
    (state / "baselines" / "fmn.py.meta").unlink()
    assert mr._copy_meta(state, mutants, keep_existing=True) == ["baselines/esd.py"]
    assert json.loads((mutants / "baselines" / "esd.py.meta").read_text()) == verdicts
    assert (mutants / "baselines" / "uce.py.meta").read_text() == '{"exit_code_by_key": {}}'
    assert not (mutants / "tests").exists()
    assert mr._copy_meta(mutants, state, keep_existing=False) == ["baselines/esd.py", "baselines/uce.py"]
    assert (state / "baselines" / "uce.py.meta").read_text() == '{"exit_code_by_key": {}}'
