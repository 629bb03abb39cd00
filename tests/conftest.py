"""Shared fixtures: Hydra-composed configs and a tiny random SD-architecture model (built offline)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Hypothesis draws the same examples on every CI run (a red CI is reproducible; locally it explores new ones)
settings.register_profile("ci", derandomize=True, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
PROMPT_DATA = ROOT / "data" / "prompts"

# `make test` runs the suite in pytest-xdist workers (one per core): one torch thread each, so that the workers do not
# oversubscribe the cores (two spinning threads per process on a busy 2-core machine slowed sampling ~50x, Makefile)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def shared_scope(fixture_name: str, config) -> str:
    """Scope of a fixture that runs the code under test once for several tests of a module (a training run, a
    closed-form edit, Inception features). Under mutation testing (``make mutation``: mutmut sets MUTANT_UNDER_TEST)
    it is rebuilt for every test, so that mutmut traces each of those tests to the code it checks and runs all of them
    against a mutant (module-scoped, only the first test would be traced and the others' assertions would not count)."""
    return "function" if "MUTANT_UNDER_TEST" in os.environ else "module"


def compose_cfg(overrides: list[str] | None = None, config_name: str = "train"):
    """The config `python -m erasure.train <overrides>` would see (without Hydra's runtime keys)."""
    from erasure.config import compose

    return compose(overrides, config_name)



def assert_refused_in_one_sentence(overrides: list[str], match: str) -> None:
    """`erasure.config.validate` (what `python -m erasure.train` checks before loading a model) refuses the config of
    ``overrides`` with a UserError matching ``match``, in one line."""
    from erasure.config import validate
    from erasure.errors import UserError

    with pytest.raises(UserError, match=match) as err:
        validate(compose_cfg(overrides))
    assert "\n" not in str(err.value)

def assert_precheck(argv: list[str], words: str | None) -> None:
    """`python -m erasure.train <argv>`'s checks before any model loads (``precheck_train_args``): accepted when
    ``words`` is None, else refused with a UserError matching ``words``."""
    from erasure.cli import precheck_train_args
    from erasure.errors import UserError

    if words is None:
        precheck_train_args(argv)
    else:
        with pytest.raises(UserError, match=words):
            precheck_train_args(argv)


@pytest.fixture(scope="session")
def tiny_cfg():
    return compose_cfg(["model=tiny", "concept=nudity"])


@pytest.fixture()
def tiny_models(tiny_cfg):
    from erasure.models import load_models

    return load_models(tiny_cfg.model, "cpu")


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def killed_at(module: str, args: list[str], target: str, call: int) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` in a subprocess that SIGKILLs itself when ``target`` (``"pkg.mod:Class.method"``
    or ``"pkg.mod:function"``) is called for the ``call``-th time, before that call runs: a kill at a known point of
    the work, with no poll-and-kill race (the process can neither finish first nor be killed before the point)."""
    mod, attr = target.split(":")
    code = f"""
import importlib, os, runpy, signal, sys
owner = importlib.import_module({mod!r})
path = {attr!r}.split(".")
for name in path[:-1]:
    owner = getattr(owner, name)
original = getattr(owner, path[-1])
calls = [0]
def wrapper(*a, **k):
    calls[0] += 1
    if calls[0] == {call}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*a, **k)
setattr(owner, path[-1], wrapper)
sys.argv = [{module!r}, *{list(args)!r}]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == -9, f"the run was not killed at call {call} of {target}: {proc.stderr[-2000:]}"
    return proc


def build_session(overrides: list[str]):
    """What ``python -m erasure.train <overrides>`` sets up before its loop, on the CPU: the config composed and
    validated, the global RNGs seeded as the trainer seeds them, the model loaded and the session (method, trainable
    weights, teacher, optimizer) created. Returns (session, models, cfg)."""
    from erasure.config import validate
    from erasure.models import load_models
    from erasure.session import Session, seed_everything

    cfg = compose_cfg(overrides)
    method_cls, method_cfg = validate(cfg)
    seed_everything(int(cfg.trainer.seed))
    models = load_models(cfg.model, "cpu")
    return Session.create(cfg, models, method_cls, method_cfg), models, cfg


def build_method(overrides: list[str], generator_seed: int = 0):
    """What erasure.trainer.train sets up before its loop, for unit tests of one method: the config composed from
    ``overrides``, the tiny model, the trainable subset, the frozen teacher and the method. Returns (method, ctx, cfg)."""
    import torch

    from erasure.config import validate
    from erasure.method import TrainContext
    from erasure.models import load_models
    from erasure.params import select_params
    from erasure.session import seed_everything
    from erasure.teacher import Teacher

    cfg = compose_cfg(overrides)
    method_cls, mcfg = validate(cfg)
    seed_everything(0)
    models = load_models(cfg.model, "cpu")
    trainable = select_params(models.unet, cfg.params)
    for p in trainable.values():
        p.requires_grad_(True)
    ctx = TrainContext(models=models, trainable=trainable, teacher=Teacher(models.unet, trainable),
                       concept=cfg.concept, cfg=cfg, generator=torch.Generator().manual_seed(generator_seed))
    return method_cls(mcfg, ctx), ctx, cfg
