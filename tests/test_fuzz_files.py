"""Property-based fuzz of the files users hand to the evaluation (issue 20): prompt CSVs and eval.json records.

Whatever the bytes, the reader either returns rows that are what a prompt set promises (a non-empty prompt, a seed in
[0, 2^63), a finite guidance or none) or refuses the file in one sentence (a UserError); never a traceback, never a
row that silently holds NaN. eval.json: the report is written, or the file is refused in one sentence. The default
suite draws a bounded number of examples (derandomized in CI); ``make test-slow`` draws many more.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from erasure.errors import UserError
from eval.prompts import load_prompt_set

FAST, MORE = 80, 1500
COLUMNS = ["prompt", "evaluation_seed", "case_number", "guidance", "categories", "", "prompt "]
FIELDS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["0", "1", "42", "-1", "1.5", "nan", "inf", "-inf", "1e400", "1e40\n0", str(2 ** 63), str(2 ** 63 - 1),
                     "", " ", '"', '""', "a,b", "nudity", "sexual", "\x00", "🙂"]),
    st.integers(-2 ** 70, 2 ** 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@st.composite
def csv_bytes(draw) -> bytes:
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=6))
    if draw(st.booleans()):  # most files have the needed columns
        header = ["prompt", "evaluation_seed", *header]
    rows = draw(st.lists(st.lists(FIELDS, min_size=0, max_size=len(header) + 2), max_size=6))
    quote = draw(st.booleans())
    def line(fields):
        return ",".join('"' + f.replace('"', '""') + '"' if quote else f for f in fields)
    text = "\n".join([line(header), *map(line, rows)])
    if draw(st.integers(0, 20)) == 0:
        text += "," + "x" * 131_073  # past csv's field limit
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    data = text.encode(encoding, errors="replace")
    if draw(st.integers(0, 10)) == 0:
        data = data[: draw(st.integers(0, len(data)))]  # torn
    return data


def _check_csv(data: bytes, guidance_col: str | None, category: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.csv"
        path.write_bytes(data)
        spec = OmegaConf.create({"kind": "csv", "path": str(path), "n": None, "guidance_col": guidance_col,
                                 "category": category})
        try:
            rows = load_prompt_set(spec, "fuzz")
        except UserError as exc:
            assert str(exc) and "\n" not in str(exc), repr(str(exc))
            return
    assert rows
    for row in rows:
        assert isinstance(row.prompt, str) and row.prompt.strip() == row.prompt and row.prompt
        assert isinstance(row.seed, int) and 0 <= row.seed < 2 ** 63
        assert isinstance(row.case, int)
        assert row.guidance is None if guidance_col is None else math.isfinite(row.guidance)


CSV_ARGS = (csv_bytes(), st.sampled_from([None, "guidance"]), st.sampled_from([None, "sexual"]))


@settings(max_examples=FAST, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(*CSV_ARGS)
def test_any_prompt_csv_gives_valid_rows_or_one_sentence(data, guidance_col, category):
    _check_csv(data, guidance_col, category)


@pytest.mark.slow
def test_any_prompt_csv_gives_valid_rows_or_one_sentence_more():
    settings(max_examples=MORE, deadline=None, suppress_health_check=[HealthCheck.too_slow])(given(*CSV_ARGS)(_check_csv))()


def test_the_fuzzed_csv_reader_keeps_what_a_good_file_says(tmp_path):
    """The property above would pass for a reader that refuses everything: a well-formed file must give its rows."""
    path = tmp_path / "p.csv"
    path.write_text('case_number,prompt,evaluation_seed,guidance\n7," a red circle ",12,7.5\n8,"x, y",0,3\n')
    rows = load_prompt_set(OmegaConf.create({"kind": "csv", "path": str(path), "guidance_col": "guidance"}))
    assert [(r.case, r.prompt, r.seed, r.guidance) for r in rows] == [(7, "a red circle", 12, 7.5), (8, "x, y", 0, 3.0)]
    path.write_text("prompt,evaluation_seed,guidance\na,1,nan\n")
    with pytest.raises(UserError, match="line 2"):
        load_prompt_set(OmegaConf.create({"kind": "csv", "path": str(path), "guidance_col": "guidance"}))


# ------------------------------------------------------------------------------------------------------ eval.json
METRIC_NAMES = st.sampled_from(["nudenet", "concept_rate", "fid", "kid", "clip", "ssim", "train_time", "iterations",
                                "nosuch", "", "ssim@x"])
NUMBERS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=5))
VALUES = st.one_of(NUMBERS, st.fixed_dictionaries({"value": NUMBERS}, optional={"std": NUMBERS, "n": NUMBERS}),
                   st.lists(NUMBERS, max_size=2), st.dictionaries(st.text(max_size=3), NUMBERS, max_size=2))
JSON_ANY = st.recursive(NUMBERS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                             max_size=3), max_leaves=8)
RECORDS = st.fixed_dictionaries(
    {"metrics": st.one_of(st.dictionaries(METRIC_NAMES, VALUES, max_size=4), JSON_ANY)},
    optional={"kind": st.one_of(st.sampled_from(["base", "run", "reference"]), JSON_ANY),
              "system": st.one_of(st.text(max_size=8), JSON_ANY), "name": st.one_of(st.text(max_size=8), JSON_ANY),
              "run": st.one_of(st.text(max_size=8), JSON_ANY), "nudenet_classes": JSON_ANY})


@st.composite
def eval_json_text(draw) -> str:
    if draw(st.integers(0, 6)) == 0:
        return json.dumps(draw(JSON_ANY))  # not a record at all
    text = json.dumps(draw(RECORDS))  # NaN and Infinity as Python writes them
    if draw(st.integers(0, 6)) == 0:
        text = text[: draw(st.integers(0, len(text)))]  # torn
    return text


def _check_report(texts: list[str]) -> None:
    from eval.experiment import report

    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for i, text in enumerate(texts):
            folder = Path(tmp) / f"run{i}"
            folder.mkdir()
            (folder / "eval.json").write_text(text)
            folders.append(str(folder))
        try:
            result = report(folders, Path(tmp) / "out")
        except UserError as exc:
            assert str(exc) and "\n" not in str(exc), repr(str(exc))
            return
        written = (Path(tmp) / "out" / "table1.md").read_text()
    assert result["markdown"] == written
    assert "nan" not in written.lower() and "inf" not in written.lower().replace("info", "")


REPORT_ARGS = (st.lists(eval_json_text(), min_size=1, max_size=3),)


@settings(max_examples=FAST, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(*REPORT_ARGS)
def test_any_eval_json_gives_a_report_or_one_sentence(texts):
    _check_report(texts)


@pytest.mark.slow
def test_any_eval_json_gives_a_report_or_one_sentence_more():
    settings(max_examples=MORE, deadline=None, suppress_health_check=[HealthCheck.too_slow])(given(*REPORT_ARGS)(_check_report))()


def test_the_fuzzed_report_keeps_what_good_records_say(tmp_path):
    """...and would fail for a report that refuses everything: two good records give their numbers."""
    from eval.experiment import report

    for name, fid in (("a", 12.5), ("b", 30.25)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"kind": "run", "system": name, "name": name,
                                                               "metrics": {"fid": fid}}))
    md = report([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "out")["markdown"]
    assert "12.5" in md and "30.25" in md
