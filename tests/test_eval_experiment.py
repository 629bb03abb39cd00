"""The shape of eval/: experiments build every training command in one place (train_job), and the package's imports
keep library and entry points apart (no cycles, no entry point imported, no method imported)."""
from __future__ import annotations

import ast
import re
import sys

import pytest

from eval import experiment
from eval.config import compose
from tests.conftest import ROOT

EVAL = ROOT / "eval"
ENTRY_POINTS = {"eval.run", "eval.generate", "eval.report", "eval.table1", "eval.results", "eval.sweep", "eval.figures",
                "eval.attack", "eval.robustness", "eval.concepts"}
TINY = ["model=tiny", "concept=nudity", "suite=tiny", "methods=[ours]",
        'train_overrides="trainer.iterations=2 trainer.preview_every=0"', '++method_overrides.ours="method.T=6"']


class _Stop(Exception):
    pass


def _jobs(monkeypatch, name: str, overrides: list[str]):
    """The jobs an experiment hands to training, and the jobs train_job made (training itself is stopped)."""
    made, handed = [], []
    real = experiment.train_job

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    def stop(jobs, n_jobs, reuse):
        handed.extend(jobs)
        raise _Stop

    monkeypatch.setattr(experiment, "train_job", recording)
    monkeypatch.setattr(experiment, "run_training", stop)
    with pytest.raises(_Stop):
        experiment.run(compose(name, overrides), command="test")
    assert handed == made  # every job that trains was made by train_job
    return handed


def test_both_experiments_build_their_commands_in_train_job(tmp_path, monkeypatch):
    common = [sys.executable, "-m", "erasure.train", "method=ours", "model=tiny", "concept=nudity",
              "trainer.checkpoint_every=50", "trainer.iterations=2",
              "trainer.preview_every=0", "method.T=6"]
    (job,) = _jobs(monkeypatch, "experiment/table1", [*TINY, f"out={tmp_path / 't'}"])
    assert job.command == [*common, f"hydra.run.dir={tmp_path / 't' / 'runs' / 'ours'}", "overwrite=true"]
    assert job.config.trainer.iterations == 2 and job.config.method.T == 6  # the config erasure.train will compose

    jobs = _jobs(monkeypatch, "experiment/results", [*TINY, f"out={tmp_path / 'r'}", "seeds=[0,1]", "lambdas=[0,5]",
                                                     "probe_points=1", "probe_seeds=1"])
    assert [j.name for j in jobs] == ["ours seed=0", "ours seed=1", "ours lambda=0 seed=0", "ours lambda=0 seed=1",
                                      "ours lambda=5 seed=0", "ours lambda=5 seed=1"]
    assert jobs[1].command == [*common, "trainer.seed=1", "trainer.probe_points=1", "trainer.probe_seeds=1",
                               f"hydra.run.dir={tmp_path / 'r' / 'table1' / 'seed1' / 'runs' / 'ours'}", "overwrite=true"]
    assert jobs[4].command == [*common, "lambda=5", "trainer.seed=0", f"hydra.run.dir={tmp_path / 'r' / 'lambda' / 'lambda5_seed0'}",
                               "overwrite=true"]


def test_a_variant_is_a_row_of_its_own(tmp_path, monkeypatch):
    """variants.<name>: its own run folder and name, trained with its overrides after method=<method>; the default
    list (methods=null) ends with the variants; a variant that does not start with method= is refused."""
    jobs = _jobs(monkeypatch, "experiment/table1", [*TINY, f"out={tmp_path / 't'}", "methods=[ours,ours_adv]"])
    assert [j.name for j in jobs] == ["ours", "ours_adv"]
    assert jobs[1].command[3:6] == ["method=ours", "method.adversarial=true", "model=tiny"]
    assert jobs[1].run_dir == tmp_path / "t" / "runs" / "ours_adv" and jobs[1].config.method.adversarial is True
    assert jobs[0].config.method.adversarial is False
    cfg = compose("experiment/table1", ["++variants.esd_diffusers='method=esd method.timesteps=diffusers'"])
    names = experiment.chosen_methods(cfg)
    assert names[-2:] == ["ours_adv", "esd_diffusers"] and "advunlearn" in names
    from erasure.errors import UserError

    with pytest.raises(UserError, match="variants.bad must start with method="):
        experiment.system_overrides(compose("experiment/table1", ["++variants.bad='lambda=1'"]), "bad")


def test_each_run_row_is_labelled_by_its_folder(tmp_path, monkeypatch):
    """A variant's row keeps its own name (ours_adv's run config says method=ours): the evaluation is told the run
    folder's name; the base model and reference keep their own labels."""
    seen = []
    monkeypatch.setattr(experiment, "evaluate", lambda c: seen.append((c.system, c.name)))
    monkeypatch.setattr(experiment, "report", lambda *a, **k: dict(markdown="", records=[]))
    cfg = compose("experiment/table1", TINY)
    experiment.evaluate_table(cfg, tmp_path, ["ours", "ours_adv"], "t")
    assert seen == [("base", None), ("run", "ours"), ("run", "ours_adv"), ("reference", None)]


def test_train_false_trains_nothing(tmp_path, monkeypatch):
    """train=false: no job reaches training; the unfinished ones are reported as missing, not trained."""
    handed = []

    def stop(jobs, n_jobs, reuse):
        handed.append(list(jobs))
        raise _Stop

    monkeypatch.setattr(experiment, "run_training", stop)
    with pytest.raises(_Stop):
        experiment.run(compose("experiment/results", [*TINY, f"out={tmp_path / 'r'}", "seeds=[0]", "train=false"]), "t")
    assert handed == [[]]
    with pytest.raises(_Stop):  # and with train=true they all go
        experiment.run(compose("experiment/results", [*TINY, f"out={tmp_path / 'r'}", "seeds=[0]"]), "t")
    assert len(handed[1]) == 7 and not (tmp_path / "r" / "table1").exists()


def test_a_killed_experiment_continues_its_unfinished_runs_from_their_checkpoints(tmp_path, monkeypatch):
    """An experiment killed mid-training (the machine went down, the session ended): the rerun continues the run from
    its last checkpoint (resume=) to the delta an uninterrupted run makes, bit for bit, and removes the checkpoints
    once the run finished. A folder whose unfinished run has another config is trained again from scratch."""
    from safetensors.torch import load_file

    from tests.conftest import killed_at

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # every part on one thread, as killed_at's (bit-identity is per thread count)
    cfg = compose("experiment/table1", [*TINY, f"out={tmp_path}", "checkpoint_every=1",
                                        'train_overrides="trainer.iterations=3 trainer.preview_every=0"'])
    job = lambda folder, *extra: experiment.train_job(cfg, "ours", tmp_path / folder, folder, list(extra))  # noqa: E731
    times, failed = experiment.run_training([job("whole")], 1, True)
    assert not failed and not (tmp_path / "whole" / "checkpoints").exists()

    killed = job("killed")
    killed_at("erasure.train", killed.command[3:], "erasure.callbacks:save_checkpoint", 2)  # killed after step 2
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step_000001"]
    again = job("killed")
    times, failed = experiment.run_training([again], 1, True)
    assert not failed and again.resume and f"resume={tmp_path / 'killed'}" in again.command
    assert "resuming" in (tmp_path / "killed" / "train.log").read_text()
    whole, resumed = (load_file(str(tmp_path / f / "delta.safetensors")) for f in ("whole", "killed"))
    assert whole.keys() == resumed.keys() and all(whole[k].equal(resumed[k]) for k in whole)
    assert not (tmp_path / "killed" / "checkpoints").exists()

    other = job("other", "trainer.seed=1")
    killed_at("erasure.train", other.command[3:], "erasure.callbacks:save_checkpoint", 2)
    same = job("other")  # seed 0: not the killed run's config
    assert experiment.needs_training(same, True) and not same.resume and "overwrite=true" in same.command


def test_a_finished_run_is_recorded_at_once_and_its_record_stands_in_for_a_lost_run_folder(tmp_path, monkeypatch):
    """The records (results/concepts, committed) keep a finished run's summary and config when outputs/ is gone (a
    fresh clone): the run is recorded as soon as it finishes, a job of the same config and base model is then not
    trained again, and a job of another config is; a run of another config does not replace the record."""
    import json
    import shutil

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = compose("experiment/table1", [*TINY, f"out={tmp_path}"])
    records = tmp_path / "records"

    def job(folder, *extra):
        j = experiment.train_job(cfg, "ours", tmp_path / folder, folder, list(extra))
        j.record = records / folder
        return j

    first = job("a")
    times, failed = experiment.run_training([first], 1, True)
    assert not failed and experiment.recorded(records / "a")
    for name in ("summary.json", "config.yaml"):
        assert (records / "a" / name).read_text() == (tmp_path / "a" / name).read_text()
    meta = json.loads((records / "a" / "recorded.json").read_text())
    assert meta["run_dir"] == str(tmp_path / "a") and meta["wall_s"] == times["a"] and meta["machine"]
    assert not experiment.record_run(tmp_path / "a", records / "a")  # already recorded: nothing written

    shutil.rmtree(tmp_path / "a")  # the run folder is lost, the record is not
    assert not experiment.needs_training(job("a"), True)
    assert experiment.needs_training(job("a"), False)  # reuse=false trains everything
    assert experiment.needs_training(job("a", "trainer.seed=1"), True)  # another config: its record is not this run

    other = job("b", "trainer.seed=1")
    assert not experiment.run_training([other], 1, True)[1]
    before = (records / "a" / "summary.json").read_text()
    assert not experiment.record_run(tmp_path / "b", records / "a")  # another config: the record stays
    assert (records / "a" / "summary.json").read_text() == before


def test_a_run_saved_before_a_trainer_key_existed_still_stands_for_its_job(tmp_path):
    """Keys added to the trainer later (trainer.sdpa_backends, trainer.channels_last) are missing from the records and
    run folders saved before them; those runs trained as the keys' defaults do, so they are still this job's runs
    (reused, or continued from a checkpoint) and not trained again. A saved run with another value is not."""
    from omegaconf import OmegaConf

    from erasure.config import validate

    cfg = compose("experiment/table1", [*TINY, f"out={tmp_path}"])
    job = experiment.train_job(cfg, "ours", tmp_path / "a", "a", [])
    mine = job.config.copy()
    validate(mine)
    saved = OmegaConf.to_container(mine, resolve=True)
    (tmp_path / "a").mkdir()
    assert saved["trainer"].pop("sdpa_backends") == "auto" and saved["trainer"].pop("channels_last") is False
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "a" / "config.yaml")
    assert experiment.same_run(job)
    saved["trainer"]["channels_last"] = True
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "a" / "config.yaml")
    assert not experiment.same_run(job)
    assert "sdpa_backends" not in (ROOT / "results/concepts/circle/ours/config.yaml").read_text()  # such records exist


def test_a_bad_training_override_stops_before_any_training(tmp_path):
    from erasure.errors import UserError

    with pytest.raises(UserError, match="training 'ours'"):
        experiment.run(compose("experiment/table1", [*TINY, f"out={tmp_path}", 'train_overrides="trainer.nosuch=1"']), "test")
    assert not (tmp_path / "runs").exists()


def test_the_training_command_is_written_once_in_eval():
    hits = [p.name for p in sorted(EVAL.glob("*.py")) for _ in re.finditer(r'"erasure\.train"', p.read_text())]
    assert hits == ["experiment.py"]


# --------------------------------------------------------------------------------------------------- imports
def _module(path) -> str:
    return "eval" if path.stem == "__init__" else f"eval.{path.stem}"


def _imports(path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in the file, relative imports made absolute."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:  # from . import x / from .x import y
                base = "eval" + (f".{node.module}" if node.module else "")
                out += [(f"{base}.{n}", []) for n in names if f"{base}.{n}".removeprefix("eval.") in MODULES] \
                    if not node.module else [(base, names)]
            else:
                out.append((node.module, names))
    return out


MODULES = {p.stem for p in EVAL.glob("*.py")}


def test_eval_layout():
    files = {_module(p): p for p in EVAL.glob("*.py")}
    entry = {m for m, p in files.items() if '__name__ == "__main__"' in p.read_text()}
    assert entry == ENTRY_POINTS
    graph = {}
    for m, p in files.items():
        imports = _imports(p)
        deps = {mod for mod, _ in imports}
        graph[m] = {d for d in deps if d in files}
        assert not (graph[m] & entry), f"{m} imports an entry point: {graph[m] & entry}"
        if m not in entry:
            assert "erasure.cli" not in deps, f"{m} is a library module and imports erasure.cli"
        methods = [d for d in deps if d.startswith(("baselines", "erasure.ours", "erasure.implicit", "erasure.purify",
                                                    "erasure.allbutone"))]
        assert not methods, f"{m} imports a method: {methods}"
        atomic = [mod for mod, names in imports if {"write_text_atomic", "atomic_write", "atomic_folder"} & set(names)]
        assert set(atomic) <= {"erasure.io"}, f"{m} takes atomic writes from {atomic}"
    for m in entry:  # argument parsing, logging set-up and one call: a main() and nothing else
        tree = ast.parse(files[m].read_text())
        assert [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))] == ["main"], m

    state: dict[str, int] = {}

    def visit(m, path):  # depth-first search for a cycle in eval's own imports
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("args, words", [
    (["-m", "eval.table1", "model=nosuch"], "unknown model 'nosuch'"),
    (["-m", "eval.results", "model=tiny", "concept=nudity", "suite=tiny", "seeds=[]"], "seeds is empty"),
    (["-m", "eval.table1", "suite=nope"], "unknown suite 'nope'"),
    (["-m", "eval.table1", "methods=[nosuch]"], "unknown method(s) nosuch"),
    (["-m", "eval.sweep"], "usage: python -m eval.sweep"),
    (["-m", "eval.figures", "nosuch=1"], "usage: python -m eval.figures"),
    (["-m", "eval.generate", "set=objects"], "usage: python -m eval.generate"),
])
def test_eval_commands_end_bad_input_in_one_line(args, words, tmp_path):
    from tests.conftest import run_cli

    proc = run_cli([*args, f"out={tmp_path}"] if "eval.table1" in args or "eval.results" in args else args)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing trained or written
