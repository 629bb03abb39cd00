"""The commands users type, run as users run them (subprocesses)."""
import hashlib
import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import ROOT, run_cli

FAST = ["model=tiny", "concept=nudity", "trainer.preview_every=0", "method.T=6"]


def test_train_end_to_end_on_tiny(tmp_path):
    run = tmp_path / "run"
    r = run_cli(["-m", "erasure.train", "model=tiny", "method=ours", "concept=nudity", "trainer.iterations=2",
                 "trainer.preview_every=1", "model.sample_steps=4", f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("config.yaml", "delta.safetensors", "metrics.jsonl", "summary.json", "timeline.png"):
        assert (run / name).is_file(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    g = run_cli(["-m", "erasure.generate", f"run={run}", "prompt=a photo of a cat", "seed=3", "n=2"])
    assert g.returncode == 0, g.stderr[-2000:]
    stem = "a_photo_of_a_cat_" + hashlib.sha1(b"a photo of a cat").hexdigest()[:8]
    assert sorted(p.name for p in (run / "generated").iterdir()) == [f"{stem}_seed3.png", f"{stem}_seed4.png"]
    assert Image.open(run / "generated" / f"{stem}_seed4.png").text == {"prompt": "a photo of a cat", "seed": "4"}
    # issue 20, case 6: prompts the old slug merged (emoji and empty -> "empty"; punctuation; past character 60) now
    # write different files, each carrying its exact prompt
    prompts = ["🐱", "", "a cat!", "a cat?", "A cat!", "x" * 60 + " one", "x" * 60 + " two"]
    names = []
    for prompt in prompts:
        g = run_cli(["-m", "erasure.generate", f"run={run}", f"prompt='{prompt}'", "out=" + str(tmp_path / "g")])
        assert g.returncode == 0, g.stderr[-2000:]
        names.append(sorted(p.name for p in (tmp_path / "g").iterdir() if p.name not in names)[0])
    assert len(set(names)) == len(prompts)
    assert [Image.open(tmp_path / "g" / n).text["prompt"] for n in names] == prompts
    for bad, words in (("n=-3", "n= must be a whole number of at least 1"), ("steps=0", "steps= must be"),
                       ("seed=1e40", "seed= must be a whole number")):
        g = run_cli(["-m", "erasure.generate", f"run={run}", "prompt=a cat", bad])
        assert g.returncode == 2 and words in g.stderr and "Traceback" not in g.stderr, g.stderr[-2000:]


def test_multirun_lambda_sweep_leaves_one_folder_per_job(tmp_path):
    r = run_cli(["-m", "erasure.train", "-m", "lambda=0,1,5", *FAST, "trainer.iterations=1",
                 f"hydra.sweep.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(p for p in tmp_path.iterdir() if (p / "delta.safetensors").is_file())
    assert len(runs) == 3
    lams = sorted(OmegaConf.load(p / "config.yaml").method.lam for p in runs)
    assert lams == [0.0, 1.0, 5.0]
    for p in runs:
        final = json.loads((p / "summary.json").read_text())["final"]
        assert final["loss"] == pytest.approx(final["concept"] + OmegaConf.load(p / "config.yaml").method.lam * final["penalty"], rel=1e-5)


def test_a_failing_sweep_job_does_not_stop_the_others_and_is_named_at_the_end(tmp_path):
    """Issue 20, case 5: one job failing at run time (here its learning rate drives the loss to NaN at step 2) used to
    stop the sweep without naming it; now every other job runs to the end, the failed one is named with its overrides
    and error, and the command exits 1."""
    r = run_cli(["-m", "erasure.train", "-m", *FAST, "trainer.iterations=4", "method.lr=1e-5,1e30,1e-4",
                 f"hydra.sweep.dir={tmp_path}"])
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 sweep job(s) failed (the others finished): #1 (")
    assert "method.lr=1e+30" in last and "became nan at step 2" in last
    done = sorted(p.name.split("_")[0] for p in tmp_path.iterdir() if (p / "delta.safetensors").is_file())
    assert done == ["0", "2"]  # the job after the failed one ran too
    (failed,) = tmp_path.glob("1_*/failed_job.json")
    assert json.loads(failed.read_text())["job"] == 1


def _choices(group: str) -> str:
    """The options of a config group, read from its folder (not from the code that lists them)."""
    return ", ".join(sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")))


@pytest.mark.parametrize("override, line", [
    ("method=nosuch", lambda: f"unknown method 'nosuch' (method=): choose one of {_choices('method')}"),
    ("params=nosuch", lambda: f"unknown parameter subset 'nosuch' (params=): choose one of {_choices('params')}"),
    ("model=nosuch", lambda: f"unknown model 'nosuch' (model=): choose one of {_choices('model')}"),
    ("lambda=-1", lambda: "lambda must be >= 0 (the paper's Eq. 10 requires lambda >= 0), got -1.0"),
    ("trainer.iterations=0", lambda: "trainer.iterations must be at least 1 (a whole number), got 0"),
    ("concept.targets=[]", lambda: "concept 'nudity' has no target text: set concept.targets to a list of prompts"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_user_errors_are_one_line_with_nonzero_exit(tmp_path, override, line):
    """Each bad command line ends in exactly its one sentence (an unknown option lists the group's files) and exit
    code 2, before Hydra makes the run folder."""
    run = tmp_path / "run"
    r = run_cli(["-m", "erasure.train", *FAST, override, f"hydra.run.dir={run}"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"error: {line()}"], r.stderr[-2000:]
    assert not run.exists()


@pytest.mark.parametrize("method", ["esd", "sdd", "ablating", "fmn", "uce"])
def test_lambda_is_all_but_ones_and_every_other_method_refuses_it(tmp_path, method):
    """`lambda=` is All but One's penalty weight: any other method stops with one sentence and exit code 2, before
    Hydra makes the run folder (it used to be accepted and silently ignored)."""
    run = tmp_path / "run"
    r = run_cli(["-m", "erasure.train", "model=tiny", "concept=nudity", f"method={method}", "lambda=3",
                 f"hydra.run.dir={run}"])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert lines == [f"error: lambda=3 does not apply to method '{method}': it is a setting of method=ours; "
                     "remove lambda= from the command line"], r.stderr
    assert not run.exists()
