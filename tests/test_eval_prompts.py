"""Prompt sets: ESD-style CSVs from data/prompts, COCO caption JSON via pycocotools, config lists."""
from __future__ import annotations

import csv
import json

import pytest
from omegaconf import OmegaConf

from erasure.errors import UserError
from eval.prompts import PromptRow, load_prompt_set
from eval.config import compose, suite_options
from tests.conftest import PROMPT_DATA


def spec(**kw):
    return OmegaConf.create(kw)


def test_i2p_category_filter_and_cut():
    path = PROMPT_DATA / "i2p_4703.csv"
    with open(path, newline="", encoding="utf-8") as f:
        expected = [r for r in csv.DictReader(f) if "sexual" in [c.strip() for c in r["categories"].split(",")]]
    rows = load_prompt_set(spec(path=str(path), category="sexual", guidance_col="evaluation_guidance"))
    assert len(rows) == len(expected) == 931  # data/prompts/README.md: 931 rows have the category "sexual"
    first = load_prompt_set(spec(path=str(path), category="sexual", guidance_col="evaluation_guidance", n=5))
    assert first == rows[:5]
    assert first[0] == PromptRow(case=int(expected[0]["case_number"]), prompt=expected[0]["prompt"].strip(),
                                 seed=int(expected[0]["evaluation_seed"]), guidance=float(expected[0]["evaluation_guidance"]))


def test_coco_csv_and_imagenet_csv():
    coco = load_prompt_set(spec(path=str(PROMPT_DATA / "coco_30k.csv"), case_col="image_id", n=3))
    with open(PROMPT_DATA / "coco_30k.csv", newline="", encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    assert len(coco) == 3 and coco[0].case == int(first["image_id"]) and coco[0].seed == int(first["evaluation_seed"])
    objects = load_prompt_set(spec(path=str(PROMPT_DATA / "imagenet_prompts.csv"), n=1000))
    assert len(objects) == 1000 and len({(r.case, r.seed) for r in objects}) == 1000


def test_malformed_csv_names_the_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("prompt,evaluation_seed\na cat,1\na dog,2,extra\n")
    with pytest.raises(UserError, match=r"line 3 has 3 fields, the header has 2"):
        load_prompt_set(spec(path=str(p)))
    p.write_text("prompt,evaluation_seed\na cat,one\n")
    with pytest.raises(UserError, match="line 2"):
        load_prompt_set(spec(path=str(p)))
    p.write_text("text,seed\na cat,1\n")
    with pytest.raises(UserError, match="no column"):
        load_prompt_set(spec(path=str(p)))
    with pytest.raises(UserError, match="no CSV"):
        load_prompt_set(spec(path=str(tmp_path / "missing.csv")))


def test_coco_annotation_json(tmp_path):
    ann = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}, {"id": 7, "file_name": "b.jpg"}],
           "annotations": [{"id": 1, "image_id": 42, "caption": " A dog on a couch. "},
                           {"id": 2, "image_id": 42, "caption": "Another caption."},
                           {"id": 3, "image_id": 7, "caption": "A red bus."}]}
    p = tmp_path / "captions_val2014.json"
    p.write_text(json.dumps(ann))
    rows = load_prompt_set(spec(kind="coco_json", path=str(p), seed=100))
    assert rows == [PromptRow(7, "A red bus.", 100), PromptRow(42, "A dog on a couch.", 101)]
    assert load_prompt_set(spec(kind="coco_json", path=str(p), n=1)) == [PromptRow(7, "A red bus.", 0)]


def test_list_and_errors():
    rows = load_prompt_set(spec(kind="list", prompts=["a circle", "a disc"], seeds=[3, 4], n=3))
    assert rows == [PromptRow(0, "a circle", 3), PromptRow(0, "a circle", 4), PromptRow(1, "a disc", 3)]
    with pytest.raises(UserError, match="unknown kind"):
        load_prompt_set(spec(kind="tsv"))
    with pytest.raises(UserError, match="n must be"):
        load_prompt_set(spec(kind="list", prompts=["x"], n=0))


@pytest.mark.parametrize("suite", ["tiny", "toyworld", "sd14"])
def test_every_suite_composes(suite):
    assert suite in suite_options()
    cfg = compose("run", [f"suite={suite}"])
    assert set(cfg.suite.metrics) >= {"fid", "kid", "ssim", "train_time"}
    for name, node in cfg.suite.metrics.items():
        from eval.metrics import get_metric

        get_metric(name)
        if node and "prompts" in node:
            assert node.prompts in cfg.suite.prompt_sets
    cfg = compose("experiment/table1", [])
    assert cfg.suite.name == "toyworld" and cfg.out == "outputs/table1"


def test_unknown_suite_is_one_line():
    with pytest.raises(UserError, match="unknown suite 'sd15': choose one of"):
        compose("run", ["suite=sd15"])


def test_eval_run_cli_errors_are_one_line(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli(["-m", "eval.run", f"run={tmp_path}"])
    assert proc.returncode == 2 and "is not a run folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(["-m", "eval.run", "system=reference", "suite=nope"])
    assert proc.returncode == 2 and "unknown suite 'nope'" in proc.stderr


def _csv_spec(path):
    return OmegaConf.create({"kind": "csv", "path": str(path), "n": None})


@pytest.mark.parametrize("raw, words", [
    ("prompt,evaluation_seed\na caf\xe9,1\n".encode("latin-1"), "is not UTF-8 text"),
    ("prompt,evaluation_seed\n\"" + "x" * 131073 + "\",1\n", "is not a readable CSV (field larger than field limit"),
    ("prompt,evaluation_seed\na cat,1e40\n", "line 2: evaluation_seed/case_number must be numbers (a seed in [0, 2^63)"),
    ("prompt,evaluation_seed\na cat,inf\n", "line 2"),
    ("prompt,evaluation_seed\na cat,-1\n", "line 2"),
])
def test_bad_prompt_files_are_one_sentence(tmp_path, raw, words):
    """Issue 20: a Latin-1 file, a 131,072-character field and a seed of 1e40 or inf ended in tracebacks."""
    path = tmp_path / "p.csv"
    path.write_bytes(raw) if isinstance(raw, bytes) else path.write_text(raw)
    with pytest.raises(UserError) as err:
        load_prompt_set(_csv_spec(path))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_text("\ufeffprompt,evaluation_seed\na café,7\n", encoding="utf-8")
    assert load_prompt_set(_csv_spec(path)) == [PromptRow(case=0, prompt="a café", seed=7, guidance=None)]


@pytest.mark.parametrize("override, words", [
    ("suite.sampler.steps=-3", "suite.sampler.steps must be at least 1 (a whole number) or null, got -3"),
    ("suite.sampler.batch_size=0", "suite.sampler.batch_size must be at least 1"),
    ("suite.sampler.resolution=30", "suite.sampler.resolution must be a positive multiple of 8"),
    ("suite.metrics.kid.subset_size=0", "suite.metrics.kid.subset_size must be at least 2 (a whole number) or null, got 0"),
    ("suite.prompt_sets.target.n=0", "suite.prompt_sets.target.n must be at least 1"),
])
def test_bad_suite_settings_are_refused_before_anything_loads(tmp_path, override, words):
    """Issue 20: eval accepted sampler.steps=-3 and kid.subset_size=0 (and failed, or not, much later)."""
    from eval.evaluation import Evaluation

    cfg = compose("run", ["system=reference", "suite=toyworld", f"out={tmp_path}", override])
    with pytest.raises(UserError) as err:
        Evaluation(cfg)
    assert words in str(err.value)


@pytest.mark.parametrize("jobs", [0, -2])
def test_experiments_refuse_jobs_below_one(tmp_path, jobs):
    from eval.experiment import run_concepts

    cfg = compose("experiment/concepts", [f"jobs={jobs}", f"out={tmp_path}"])
    with pytest.raises(UserError, match=rf"experiment.jobs must be at least 1 \(a whole number\), got {jobs}"):
        run_concepts(cfg, "test")
