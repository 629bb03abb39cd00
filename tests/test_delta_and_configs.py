import json

import pytest
import torch
from omegaconf import OmegaConf

from erasure.delta import apply_delta, read_delta, save_delta
from erasure.io import atomic_folder
from erasure.errors import UserError
from erasure.cli import GROUPS
from erasure.trainer import train
from tests.conftest import CONF, compose_cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(["model=tiny", "concept=nudity", "trainer.iterations=2", "trainer.preview_every=1",
                       "method.T=6", "method.lr=1e-3", "trainer.preview_seeds=[0]", "concept.preview_prompts=[nudity]",
                       "model.sample_steps=4"])
    train(cfg, run)
    return run


def test_run_folder_contents(tiny_run):
    for name in ("config.yaml", "delta.safetensors", "metrics.jsonl", "summary.json", "timeline.png",
                 "samples/step_000000.png", "samples/step_000001.png", "samples/step_000002.png"):
        assert (tiny_run / name).is_file(), name
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"concept", "penalty", "loss", "lr"}
        assert r["loss"] == pytest.approx(r["concept"] + 5.0 * r["penalty"], rel=1e-5)
    cfg = OmegaConf.load(tiny_run / "config.yaml")
    assert cfg.method.lam == 5.0  # resolved, not "${lambda}"
    tensors, meta = read_delta(tiny_run)
    assert meta["method"] == "ours" and meta["params"] == "to_out" and meta["model"] == "tiny"
    assert tensors and all(".to_out." in n for n in tensors)
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["train_time_s"] > 0


def test_delta_reloads_into_a_fresh_pipeline_to_identical_weights(tiny_run):
    from erasure.delta import load_run

    tensors, meta = read_delta(tiny_run)
    _, models = load_run(tiny_run, "cpu")
    pipe = models.pipeline()
    named = dict(pipe.unet.named_parameters())
    for name, value in tensors.items():
        assert torch.equal(named[name].detach(), value)
    # and it really differs from the base it was trained from
    _, base = load_run(tiny_run, "cpu", base=True)
    base_named = dict(base.unet.named_parameters())
    assert any(not torch.equal(base_named[n], v) for n, v in tensors.items())
    assert base.fingerprint == meta["base_fingerprint"]


def test_delta_on_another_base_is_refused(tiny_run):
    from erasure.models import load_models

    other = load_models(compose_cfg(["model=tiny", "model.seed=7"]).model, "cpu")
    with pytest.raises(UserError, match="fingerprint"):
        apply_delta(other, tiny_run / "delta.safetensors")


def test_delta_write_is_atomic_and_corrupt_file_is_refused(tmp_path):
    path = save_delta(tmp_path / "d.safetensors", {"a": torch.ones(2)}, {"base_fingerprint": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # no temporary left behind
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_delta(path)


def test_atomic_folder_replaces_or_keeps_the_existing_folder_and_a_failed_write_leaves_nothing(tmp_path):
    def writer(text):
        return lambda tmp: (tmp / "a.txt").write_text(text)

    target = tmp_path / "f"
    atomic_folder(target, writer("one"))
    atomic_folder(target, writer("two"))  # default: replace (a checkpoint rewritten at the same step)
    assert (target / "a.txt").read_text() == "two"
    atomic_folder(target, writer("three"), keep_existing=True)  # another builder's folder wins
    assert (target / "a.txt").read_text() == "two"

    def fails(tmp):
        (tmp / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(tmp_path / "g", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no half-written folder, no temporary
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_file_composes_to_its_own_values(group):
    """Each option of each group, composed, holds every value its file sets (read here from the file alone), its
    interpolations resolved to the keys they name; a method's node parses to the same values, and its yaml selects
    the parameter subset its class names as its default."""
    import dataclasses

    from erasure import registry

    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options
    # beside a method whose iterations differ from the trainer schema's default (ESD: 1000), so that an interpolation
    # overwritten by a schema default shows
    context = [] if group == "method" else ["method=esd"]
    for option in options:
        cfg = compose_cfg([*context, f"{group}={option}"])
        resolved = OmegaConf.to_container(cfg, resolve=True)
        own = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")).items()
               if k != "defaults"}
        for key, value in own.items():
            if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
                value = OmegaConf.select(OmegaConf.create(resolved), value[2:-1])  # the key it names
            assert resolved[group][key] == value, f"{group}={option}: {key}"
        if group == "method":
            cls = registry.get_method(option)
            assert cfg.method.name == option and cfg.params.name == cls.default_params, option
            assert dataclasses.asdict(cls.parse_config(cfg.method)) == resolved["method"], option
        elif "name" in own:
            assert own["name"] == option


def test_method_defaults_have_one_source_the_schema():
    """A method's yaml names its schema and parameter subset and holds no value of its own: the composed method
    config is exactly the schema's defaults (the dataclass, where each default cites its source), except the keys a
    model tier's specialisation changes (conf/model_method/<model>_<method>.yaml, each saying why)."""
    from erasure import registry

    for option in sorted(p.stem for p in (CONF / "method").glob("*.yaml")):
        own = OmegaConf.load(CONF / "method" / f"{option}.yaml")
        assert set(own) == {"defaults"}, f"conf/method/{option}.yaml sets {sorted(set(own) - {'defaults'})}"
        assert f"{option}_schema" in list(own.defaults), option
        cfg = compose_cfg([f"method={option}"])
        cls = registry.get_method(option)
        expected = OmegaConf.structured(cls.Config)
        special = CONF / "model_method" / f"{cfg.model.name}_{option}.yaml"
        if special.is_file():
            expected = OmegaConf.merge(expected, OmegaConf.load(special).get("method", {}))
        assert OmegaConf.to_container(cfg.method, resolve=True) == OmegaConf.to_container(expected, resolve=True), option


def test_a_model_method_specialisation_applies_to_its_pair_only_and_the_command_line_wins():
    assert compose_cfg(["method=spm"]).method.iterations == 600  # conf/model_method/toyworld_spm.yaml
    assert compose_cfg(["method=spm"]).trainer.iterations == 600
    assert compose_cfg(["method=spm", "model=tiny"]).method.iterations == 3000  # the official default
    assert compose_cfg(["method=spm", "method.iterations=7"]).method.iterations == 7
    assert compose_cfg(["method=esd"]).method.iterations == 1000
    own = OmegaConf.load(CONF / "trainer" / "default.yaml")  # the trainer's only own value is the interpolation
    assert set(own) == {"defaults", "iterations"}
    assert OmegaConf.to_container(own, resolve=False)["iterations"] == "${method.iterations}"


def test_generate_on_a_folder_that_is_no_run_is_refused(tmp_path):
    from erasure.delta import load_run

    with pytest.raises(UserError, match="is not a run folder"):
        load_run(tmp_path, "cpu")


def test_methods_are_found_in_a_checkout_that_was_never_installed():
    """No installed metadata (e.g. a GPU box running from a copy of the tree): the registry reads the same
    entry-point table from pyproject.toml and imports those modules. In a subprocess: importing the method modules
    afresh here would leave this process with two copies of each (the registry's and the package's), and a later
    test that patches a module's function would patch the copy the registered class does not use."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import importlib.metadata as md\n"
            "md.entry_points = lambda group: []\n"
            "from erasure import registry\n"
            "print(registry.available())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(["ablating", "advunlearn", "esd", "fmn", "mace", "ours", "rece", "salun", "sdd",
                                      "spm", "uce"])


def test_the_project_writes_strict_json():
    """Issue 20: summary.json and metrics.jsonl once held `Infinity`, which strict JSON readers refuse. Every JSON file
    the project writes goes through erasure.io.to_json: non-finite numbers become null, numpy scalars numbers."""
    import json
    import math

    import numpy as np

    from erasure.io import to_json

    text = to_json({"a": math.inf, "b": [1.5, -math.inf, math.nan], "c": (np.float32(2.5), np.int64(3)), 4: "x"})
    assert text == '{"a": null, "b": [1.5, null, null], "c": [2.5, 3], "4": "x"}'
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no NaN/Infinity constants


def test_a_delta_with_non_finite_values_or_no_tensors_is_refused(tmp_path):
    """Issue 20: a delta of NaNs (a diverged run) was applied without a word and evaluated to noise images."""
    import torch

    from erasure.delta import read_delta, save_delta
    from erasure.errors import UserError

    meta = {"base_fingerprint": "x", "method": "ours"}
    save_delta(tmp_path / "nan.safetensors", {"a.weight": torch.tensor([1.0, float("nan")]), "b.weight": torch.ones(2)}, meta)
    save_delta(tmp_path / "empty.safetensors", {}, meta)
    save_delta(tmp_path / "fine.safetensors", {"a.weight": torch.tensor([1.0, -2.0])}, meta)
    with pytest.raises(UserError, match=r"non-finite values in 1 tensor\(s\) \(a.weight, ...\)"):
        read_delta(tmp_path / "nan.safetensors")
    with pytest.raises(UserError, match="holds no tensors"):
        read_delta(tmp_path / "empty.safetensors")
    tensors, _ = read_delta(tmp_path / "fine.safetensors")
    assert tensors["a.weight"].tolist() == [1.0, -2.0]


def test_atomic_writes_follow_the_umask(tmp_path):
    """Issue 20: atomic writes made 0600 files and 0700 folders whatever the umask (mkstemp's private modes), so a
    group could not read a shared run folder."""
    import os
    import stat

    from erasure.io import atomic_folder, write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}\n")
        atomic_folder(tmp_path / "ckpt", lambda d: (d / "x").write_text("1"))
        os.umask(0o077)
        write_text_atomic(tmp_path / "b.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
