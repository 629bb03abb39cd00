"""Kill a training run with SIGKILL at a random step, resume it, and get a bit-identical delta."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from erasure.checkpoint import list_checkpoints, load_checkpoint
from tests.conftest import ROOT, killed_at, run_cli

COMMON = ["model=tiny", "concept=nudity", "trainer.iterations=8", "trainer.checkpoint_every=2",
          "trainer.keep_checkpoints=2", "trainer.preview_every=0", "method.lr=1e-3"]


def _kill_resume_compare(tmp_path, extra):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = run_cli(["-m", "erasure.train", *COMMON, *extra, f"hydra.run.dir={ref}"])
    assert r.returncode == 0, r.stderr[-2000:]

    # a step after at least one checkpoint, drawn from the run's settings: each method is killed at its own step, the
    # same on every run (a failure reproduces; a seed from the process id did not)
    kill_after = random.Random(" ".join(extra)).randint(3, 6)
    # SIGKILL as step kill_after + 1 begins: steps 1..kill_after are done, a checkpoint of step 2 or 4 exists
    killed_at("erasure.train", [*COMMON, *extra, f"hydra.run.dir={killed}"], "erasure.session:Session.step",
              kill_after + 1)
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == kill_after, f"killed after step {kill_after}"
    assert not (killed / "delta.safetensors").exists()
    assert 1 <= len(list_checkpoints(killed)) <= 2  # pruned to keep_checkpoints

    done, state = load_checkpoint(list_checkpoints(killed)[-1])
    before = state["train_time_s"]  # the time of steps 1..done, kept with the checkpoint
    assert before > 0

    r = run_cli(["-m", "erasure.train", f"resume={killed}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (killed / "delta.safetensors").read_bytes() == (ref / "delta.safetensors").read_bytes()
    # the summary's time counts every step: the checkpoint's time plus the 8 - done steps timed now, whose rate is
    # s_per_it (a resumed run once reported the time after its checkpoint as the whole run's)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_step"] == done and "train_time_estimated" not in summary
    assert summary["train_time_s"] == pytest.approx(before + summary["s_per_it"] * (8 - done), abs=1e-4 * 8 + 2e-3)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # no duplicated or missing step after the resume


def test_kill_and_resume_is_bit_identical_ours_with_teacher_bank(tmp_path):
    _kill_resume_compare(tmp_path, ["method=ours", "method.T=6", "trainer.teacher_batch=3"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sdd", "esd"])
def test_kill_and_resume_is_bit_identical_baselines(tmp_path, method):
    _kill_resume_compare(tmp_path, [f"method={method}", "method.ddim_steps=6"])


def test_non_finite_loss_stops_naming_term_and_step_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = run_cli(["-m", "erasure.train", "model=tiny", "concept=nudity", "trainer.iterations=30", "trainer.checkpoint_every=1",
                 "trainer.preview_every=0", "method.T=4", "method.lr=1e30", f"hydra.run.dir={run}"])
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "became" in lines[0] and "at step" in lines[0], r.stderr
    assert "'concept'" in lines[0] or "'penalty'" in lines[0]  # the term is named, not just the total
    step = int(lines[0].split("at step ")[1].split(":")[0])
    assert step >= 2
    kept = list_checkpoints(run)
    assert kept and kept[-1].name == f"step_{step - 1:06d}"
    assert not (run / "delta.safetensors").exists()


def test_parameters_made_non_finite_by_a_step_stop_the_run():
    """An optimizer step that leaves a trained tensor non-finite while the loss was finite (before validation refused
    it, `method.lr=inf` did this and saved a delta of NaNs with exit 0, issue 20) stops the run at that step, naming
    a parameter. The real session on the tiny model, its learning rate set to inf behind validation's back."""
    from erasure.errors import UserError
    from tests.conftest import build_session

    session = build_session(["model=tiny", "concept=nudity", "method.T=4", "trainer.preview_every=0"])[0]
    session.base_lrs = [float("inf")] * len(session.base_lrs)
    with pytest.raises(UserError, match=r"parameter '[^']+' became non-finite at step 1: lower the learning rate"):
        session.step(1)


def test_a_second_training_into_a_busy_run_folder_is_refused_and_a_dead_owner_is_taken_over(tmp_path):
    """Issue 20, data-loss case 3: two trainings in one hydra.run.dir both exited 0 and the folder kept only the
    second. Now the second is refused in one line while the first runs; once the first is killed (SIGKILL: its lock
    stays behind), the next training takes the folder over, says so, and leaves no lock."""
    run = tmp_path / "run"
    args = ["-m", "erasure.train", "model=tiny", "concept=nudity", "trainer.preview_every=0", "method.T=4",
            f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    first = subprocess.Popen([sys.executable, *args, "trainer.iterations=100000"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not (run / "metrics.jsonl").is_file():
            time.sleep(0.1)
        assert first.poll() is None and (run / ".lock").is_file(), "the first training did not start"
        second = run_cli([*args, "trainer.iterations=1"])
        lines = [line for line in second.stderr.strip().splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"is in use by process {first.pid}" in lines[0], lines[0]
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / ".lock").is_file() and not (run / "delta.safetensors").exists()
    # the killed run's config and metrics are still there: a plain training is refused (case 2), overwrite=true replaces it
    refused = run_cli([*args, "trainer.iterations=1"])
    assert refused.returncode == 2 and "already holds a run" in refused.stderr, refused.stderr[-2000:]
    assert f"left locked by process {first.pid}, which is no longer running: taking it over" in refused.stderr + refused.stdout
    assert not (run / ".lock").exists() and (run / "metrics.jsonl").is_file()
    third = run_cli([*args, "trainer.iterations=1", "overwrite=true"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert (run / "delta.safetensors").is_file() and not (run / ".lock").exists()


def test_an_empty_lock_left_by_an_owner_killed_before_writing_it_is_taken_over(tmp_path, caplog):
    """A process killed between creating <run>/.lock and writing its PID leaves an empty lock: the next owner waits
    about 2 s for it to be written, then takes the folder over (it used to wait forever)."""
    from erasure.io import folder_lock

    (tmp_path / ".lock").write_text("")
    start = time.monotonic()
    with folder_lock(tmp_path, "run folder") as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
    assert 1.5 < time.monotonic() - start < 30 and not lock.exists()
    assert "holds an empty or unreadable lock: taking it over" in caplog.text


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("method: {name: ours}\n")
    r = run_cli(["-m", "erasure.train", f"resume={tmp_path}"])
    assert r.returncode == 2 and "has no checkpoint" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # two training subprocesses for a compatibility case (about 50 s on 2 cores)
def test_a_run_folder_from_before_lambda_was_ours_alone_still_resumes(tmp_path):
    """Run folders written before `lambda=` became All but One's own setting carry `lambda: 5.0` whatever the method;
    resuming one must neither be refused nor change what the method trains (it never read lambda)."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    extra = ["model=tiny", "concept=nudity", "method=esd", "method.ddim_steps=4", "trainer.iterations=2",
             "trainer.checkpoint_every=1", "trainer.preview_every=0"]
    r = run_cli(["-m", "erasure.train", *extra, f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    finished = (run / "delta.safetensors").read_bytes()
    (run / "delta.safetensors").unlink()
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg["lambda"] is None
    cfg["lambda"] = 5.0  # as the old conf/train.yaml wrote it
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    for ckpt in list_checkpoints(run):  # checkpoints of that time kept no config digest (it would refuse the edit)
        meta = json.loads((ckpt / "state.json").read_text())
        del meta["config_sha256"]
        (ckpt / "state.json").write_text(json.dumps(meta))
    r = run_cli(["-m", "erasure.train", f"resume={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "never read; resuming without it" in r.stdout + r.stderr
    assert (run / "delta.safetensors").read_bytes() == finished


def test_training_into_a_folder_that_holds_a_run_is_refused_unless_overwrite(tmp_path):
    """Issue 20, data-loss case 2: a second training into a finished run's folder replaced its delta, config and
    metrics and kept its checkpoints and eval.json. Now it is refused in one line and the folder is untouched;
    overwrite=true removes the previous run's files (evaluation and checkpoints included) before training."""
    run = tmp_path / "run"
    args = ["-m", "erasure.train", "model=tiny", "concept=nudity", "trainer.preview_every=0", "method.T=4",
            "trainer.iterations=2", "trainer.checkpoint_every=1", f"hydra.run.dir={run}"]
    assert run_cli(args).returncode == 0
    (run / "eval.json").write_text('{"metrics": {"fid": 1.0}}\n')  # the first run's evaluation
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in p.parts
              and p.name != "train.log"}
    assert any(p.parts[0] == "checkpoints" for p in before)
    second = run_cli([*args, "trainer.seed=1"])
    lines = [line for line in second.stderr.strip().splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1 and "already holds a run" in lines[0], second.stderr
    assert "overwrite=true" in lines[0] and f"resume={run}" in lines[0]
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in p.parts
             and p.name != "train.log"}
    assert after == before  # nothing replaced, nothing removed
    third = run_cli([*args, "trainer.seed=1", "trainer.checkpoint_every=0", "overwrite=true"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert not (run / "eval.json").exists() and not (run / "checkpoints").exists()
    assert OmegaConf.load(run / "config.yaml").trainer.seed == 1
    assert json.loads((run / "summary.json").read_text())["seed"] == 1
    assert (run / "delta.safetensors").read_bytes() != before[Path("delta.safetensors")]


def test_experiments_replace_the_folders_they_decided_to_train(tmp_path):
    """An experiment trains a folder only when it holds no finished run of the current base (or reuse=false): its
    command says overwrite=true, so a killed earlier attempt's files never block or mix with the new run."""
    from omegaconf import OmegaConf as OC

    from eval.experiment import TrainJob

    job = TrainJob("ours", tmp_path / "runs" / "ours", ["method=ours"], OC.create({}))
    assert job.command[-2:] == [f"hydra.run.dir={tmp_path / 'runs' / 'ours'}", "overwrite=true"]


def test_resume_survives_a_torn_metrics_line_and_a_truncated_checkpoint_and_refuses_other_settings(tmp_path):
    """Issue 20: a torn last line of metrics.jsonl and a truncated newest checkpoint made resume= end in a traceback;
    now the line is dropped and the run falls back to the checkpoint before, both said in the log, and the delta still
    equals an uninterrupted run's. resume= with an override that differs from the run's config is refused (it used
    to be ignored without a word)."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_cli(["-m", "erasure.train", *COMMON, f"hydra.run.dir={ref}"]).returncode == 0
    killed_at("erasure.train", [*COMMON, f"hydra.run.dir={killed}"], "erasure.session:Session.step", 7)
    newest = list_checkpoints(killed)[-1]
    assert newest.name.endswith("6")  # checkpoints of steps 4 and 6 kept
    data = (newest / "tensors.safetensors").read_bytes()
    (newest / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.1')  # cut mid-line
    conflict = run_cli(["-m", "erasure.train", f"resume={killed}", "trainer.iterations=20", "method.lr=0.5"])
    assert conflict.returncode == 2 and "Traceback" not in conflict.stderr
    assert "trainer.iterations (20 given, the run has 8)" in conflict.stderr and "method.lr (0.5 given" in conflict.stderr
    r = run_cli(["-m", "erasure.train", f"resume={killed}", "trainer.iterations=8"])  # the same value: no conflict
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stderr + r.stdout
    assert "dropped 1 torn line(s)" in log and "falling back to step_000004" in log
    assert (killed / "delta.safetensors").read_bytes() == (ref / "delta.safetensors").read_bytes()
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_refuses_a_config_yaml_edited_after_the_last_checkpoint_unless_told(tmp_path):
    """Issue 20: resume= used to continue with an edited config.yaml without a word (the delta then came from two
    configs). Each checkpoint records the digest of config.yaml; an edit is refused in one sentence, and
    resume_edited=true continues with the edited config, saying so."""
    killed = tmp_path / "killed"
    killed_at("erasure.train", [*COMMON, f"hydra.run.dir={killed}"], "erasure.session:Session.step", 6)  # after step 5
    untouched = (killed / "config.yaml").read_text()
    cfg = OmegaConf.load(killed / "config.yaml")
    cfg.trainer.iterations = 9
    OmegaConf.save(cfg, killed / "config.yaml")
    refused = run_cli(["-m", "erasure.train", f"resume={killed}"])
    lines = [line for line in refused.stderr.strip().splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1 and "was edited after its last checkpoint" in lines[0], refused.stderr
    assert not (killed / "delta.safetensors").exists()
    r = run_cli(["-m", "erasure.train", f"resume={killed}", "resume_edited=true"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "continuing with the edited config" in r.stderr + r.stdout
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10)) and untouched != (killed / "config.yaml").read_text()


def test_a_checkpoint_without_its_training_time_resumes_with_the_time_estimated(tmp_path):
    """Checkpoints written before the training time travelled with them still resume; the summary then says that its
    time is the rate of the steps timed after the checkpoint, over every step (train_time_estimated)."""
    run = tmp_path / "run"
    r = run_cli(["-m", "erasure.train", "model=tiny", "concept=nudity", "method.T=4", "trainer.iterations=3",
                 "trainer.checkpoint_every=1", "trainer.preview_every=0", f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    (run / "delta.safetensors").unlink()
    last = list_checkpoints(run)[-1]
    assert last.name == "step_000002"
    meta = json.loads((last / "state.json").read_text())
    assert meta["state"]["__dict__"].pop("train_time_s") > 0  # as an older checkpoint was written
    (last / "state.json").write_text(json.dumps(meta))
    r = run_cli(["-m", "erasure.train", f"resume={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "does not hold the training time of its 2 steps" in r.stdout + r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["train_time_estimated"] is True
    assert summary["train_time_s"] == pytest.approx(summary["s_per_it"] * 3, abs=3e-5 + 1e-3)
