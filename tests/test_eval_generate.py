"""The evaluation image cache: a second run generates nothing, base images are shared between runs,
and a generation killed mid-way resumes to the same files, none corrupt."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from omegaconf import OmegaConf
from PIL import Image

from eval.cache import image_name
from eval.prompts import load_prompt_set
from tests.conftest import PROMPT_DATA, ROOT, compose_cfg, killed_at


def make_run(root: Path, name: str, shift: float) -> Path:
    """A finished-looking run folder of the tiny model: config.yaml, a delta on attn2.to_out, summary.json."""
    from erasure.delta import save_delta
    from erasure.models import load_models

    cfg = compose_cfg(["model=tiny", "concept=nudity"])
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    models = load_models(cfg.model, "cpu")
    params = {n: p.detach() + shift for n, p in models.unet.named_parameters() if "attn2.to_out" in n}
    save_delta(run / "delta.safetensors", params, dict(base_model=models.source, base_fingerprint=models.fingerprint,
                                                       model="tiny", method="ours", params="to_out", iterations=1))
    (run / "summary.json").write_text(json.dumps({"train_time_s": 1.5, "iterations": 1}))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_run(root, "a", 0.05), make_run(root, "b", -0.05)


def generated(cache: Path) -> list[Path]:
    """PNGs of the image cache (folders holding sampler.json; not the built reference folder)."""
    return sorted(p for p in cache.glob("*/*/*.png") if (p.parent / "sampler.json").is_file())


def evaluation(run: Path, cache: Path, *extra: str):
    from eval.config import compose
    from eval.evaluation import Evaluation

    cfg = compose("run", [f"run={run}", f"cache_dir={cache}", "device=cpu", "suite.prompt_sets.objects.n=3", *extra])
    return Evaluation(cfg)


def test_second_run_generates_nothing_and_base_is_shared(runs, tmp_path):
    cache = tmp_path / "cache"
    ev = evaluation(runs[0], cache)
    erased, rows = ev.images("objects")
    base, _ = ev.base_images("objects")
    assert ev.stats == {"generated": 6, "cached": 0}
    assert erased.shape == (3, 32, 32, 3) and erased.dtype == np.uint8
    assert np.abs(erased.astype(int) - base.astype(int)).max() > 0  # the delta changed the images

    again = evaluation(runs[0], cache)
    erased2, _ = again.images("objects")
    base2, _ = again.base_images("objects")
    assert again.stats == {"generated": 0, "cached": 6}
    assert np.array_equal(erased, erased2) and np.array_equal(base, base2)

    # issue 20: a cached PNG cut short (copied outside the atomic writes) is made again, not read as an error
    victim = sorted(p for p in generated(cache) if ev.model_key(base=False) in str(p))[1]
    victim.write_bytes(victim.read_bytes()[:40])
    repaired = evaluation(runs[0], cache)
    erased3, _ = repaired.images("objects")
    assert repaired.stats == {"generated": 1, "cached": 2}
    assert np.array_equal(erased3, erased)

    other = evaluation(runs[1], cache)  # another run on the same base: base images come from the cache
    other.base_images("objects")
    assert other.stats == {"generated": 0, "cached": 3}
    other.images("objects")
    assert other.stats == {"generated": 3, "cached": 3}
    folders = sorted(p.parent.parent.name for p in generated(cache))
    fp = ev.models.fingerprint
    assert set(folders) == {fp, ev.model_key(base=False), other.model_key(base=False)} and len(folders) == 9

    # a different sampler setting is a different cache entry
    steps = evaluation(runs[0], cache, "suite.sampler.steps=3")
    steps.base_images("objects")
    assert steps.stats["generated"] == 3


def test_resume_after_kill(runs, tmp_path):
    cache = tmp_path / "cache"
    n = 8
    args = [sys.executable, "-m", "eval.generate", f"run={runs[0]}", "set=objects", "base=true", f"cache_dir={cache}",
            "device=cpu", f"suite.prompt_sets.objects.n={n}", "suite.sampler.batch_size=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGKILL as the 4th PNG is about to be written: 3 complete images, the rest not generated
    killed_at("eval.generate", args[2:], "eval.cache:save_png", 4)
    before = [p.name for p in generated(cache)]
    assert len(before) == 3, "the generation must be killed mid-way"
    for p in generated(cache):
        Image.open(p).load()  # complete PNGs only (atomic writes)

    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{n - len(before)} images" in done.stderr and f"({len(before)} were cached)" in done.stderr
    files = generated(cache)
    rows = load_prompt_set(OmegaConf.create({"kind": "csv", "path": str(PROMPT_DATA / "small_imagenet_prompts.csv"),
                                             "n": n}))
    assert sorted(p.name for p in files) == sorted(image_name(r, 7.5) for r in rows)  # tiny model: guidance 7.5

    # the resumed set equals an uninterrupted generation, image by image
    # (one torch thread, as the subprocess had: CPU reductions split over threads round differently)
    ev = evaluation(runs[0], tmp_path / "fresh", f"suite.prompt_sets.objects.n={n}", "suite.sampler.batch_size=1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fresh, _ = ev.base_images("objects")
    finally:
        torch.set_num_threads(threads)
    resumed = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in
                        [files[0].parent / image_name(r, 7.5) for r in rows]])
    assert np.array_equal(fresh, resumed)


def test_sharded_generation_matches_one_process(runs, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m eval.generate` on CPU writes the same files, byte for byte.

    (accelerate's `--cpu` flag runs a single process; `--multi_gpu` goes through torch.distributed.run, which works
    without GPUs: each process then generates on the CPU.)"""
    n = 5  # odd, with batch 2: three batches, split 2 + 1 between the processes
    common = [f"run={runs[0]}", "set=objects", "base=true", "device=cpu", f"suite.prompt_sets.objects.n={n}",
              "suite.sampler.batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "eval.generate", *common, f"cache_dir={tmp_path / 'one'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as sock:  # a free rendezvous port (torchrun's default 29500 may be taken)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "eval.generate", *common, f"cache_dir={tmp_path / 'two'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process 1/2 made 3" in two.stderr and "process 2/2 made 2" in two.stderr  # batches 0, 2 | 1
    a, b = generated(tmp_path / "one"), generated(tmp_path / "two")
    assert len(a) == n and [p.name for p in a] == [p.name for p in b]
    for p, q in zip(a, b):
        assert p.read_bytes() == q.read_bytes(), p.name


def test_reference_built_by_several_processes_at_once_is_one_complete_folder(tmp_path):
    """The ranks of a launch may build the same reference together: every builder succeeds, the folder holds one
    complete copy, and no temporary folder is left behind (the failure CI once hit: 'Directory not empty')."""
    from concurrent.futures import ThreadPoolExecutor

    from eval.reference import skimage_photos

    folder = tmp_path / "reference" / "skimage-8"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: skimage_photos(folder, n=8, side=16), range(4)))
    skimage_photos(folder, n=8, side=16)  # once more over a finished folder: still fine
    assert sorted(p.name for p in folder.parent.iterdir()) == ["skimage-8"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["captions.csv"] + [f"{i:06d}.png" for i in range(8)])
    lone = tmp_path / "lone"
    skimage_photos(lone, n=8, side=16)
    for p in folder.iterdir():
        assert p.read_bytes() == (lone / p.name).read_bytes(), p.name
