"""Experiments own their training children (issue 20, case 4): SIGTERM to the experiment stops its `erasure.train`
subprocesses before it exits (one line, exit 143), and a SIGKILLed experiment's children die with it, so that rerunning
the command never finds a stray training in the same folder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process-tree checks read Linux's ps")


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")


def wait_for(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_experiment(tmp_path: Path) -> subprocess.Popen:
    # one long training (ours, 200 iterations on the toy world) in a child process
    cmd = [sys.executable, "-m", "eval.concepts", "concepts=[circle]", "methods=[ours]", f"out={tmp_path}",
           'train_overrides="trainer.preview_every=0"', "jobs=1", "record=null"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_training_child_does_not_outlive_the_experiment(tmp_path, sig):
    parent = start_experiment(tmp_path)
    try:
        child = wait_for(lambda: children(parent.pid), 120, "the training subprocess")[0]
        wait_for(lambda: (tmp_path / "runs" / "circle" / "ours" / "train_stdout.log").is_file(), 30, "its log")
        parent.send_signal(sig)
        _, err = parent.communicate(timeout=120)
        wait_for(lambda: not alive(child), 60, "the child to exit")
    finally:
        parent.kill()
        parent.wait()
    if sig == signal.SIGTERM:
        assert parent.returncode == 143
        assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM)")
        assert "Traceback" not in err
    assert not (tmp_path / "runs" / "circle" / "ours" / "delta.safetensors").exists()


def test_ctrl_c_ends_a_training_in_one_line_with_exit_130(tmp_path):
    """Issue 20: Ctrl-C (SIGINT) to erasure.train ended in a KeyboardInterrupt traceback."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "erasure.train", "model=tiny", "concept=nudity", "method.T=6",
                             "trainer.iterations=100000", "trainer.preview_every=0", f"hydra.run.dir={run}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"})
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text(), 120, "training")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)")
