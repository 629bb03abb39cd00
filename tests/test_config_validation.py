"""Bad configs end in one clean UserError before any model loads (the fuzz over every key: tests/test_schema.py)."""
import pytest

from erasure.cli import precheck_train_args
from erasure.errors import UserError

BAD = [
    (["lambda=-0.5"], "lambda must be >= 0"),
    (["concept.instructions.0.kappa=0"], "kappa must be in (0, 1]"),
    (["concept.instructions.0.kappa=1.01"], "kappa must be in (0, 1]"),
    (["concept.instructions.1.window=[0.8,0.3]"], "0 <= low <= high <= 1"),
    (["concept.instructions.1.window=[0.2,1.5]"], "0 <= low <= high <= 1"),
    (["concept.instructions.1.window=[0.2,0.5,0.9]"], "has window [0.2, 0.5, 0.9]: use fractions of T"),
    (["concept.targets=[]"], "has no target text"),
    (["concept.targets=['  ']"], "has no target text"),
    (["trainer.iterations=0"], "iterations must be at least 1"),
    (["trainer.iterations=abc"], "could not be converted to Integer"),
    (["trainer.teacher_batch=0"], "teacher_batch must be at least 1"),
    (["trainer.keep_checkpoints=0"], "keep_checkpoints must be at least 1"),
    (["trainer.precision=int8"], "unknown trainer.precision"),
    (["method=nosuch"], "unknown method 'nosuch'"),
    (["params=nosuch"], "unknown parameter subset 'nosuch'"),
    (["concept=nosuch"], "unknown concept 'nosuch'"),
    (["model=nosuch"], "unknown model 'nosuch'"),
    (["logger=nosuch"], "unknown logger 'nosuch'"),
    (["method.T=1"], "method.T (DDIM steps) must be at least 2"),
    (["method.lr=0"], "method.lr must be a positive finite number"),
    (["method.signal=magic"], "method.signal must be"),
    (["method.gamma1=high"], "method.gamma1=high (Value 'high' of type 'str' could not be converted to Float)"),
    (["method=esd", "lambda=3"], "lambda=3 does not apply to method 'esd': it is a setting of method=ours"),
    (["-m", "method=ours,sdd", "lambda=1"], "lambda=1 does not apply to method 'sdd'"),
    (["lamda=3"], "Could not override 'lamda'"),
    (["method=sdd", "method.T=6"], "Could not override 'method.T' (Key 'T' not in 'SDDConfig')"),
    (["-m", "lambda=0,1,-1"], "lambda must be >= 0"),
    (["-m", "method=ours,nosuch"], "unknown method 'nosuch'"),
    (["model.resolution=big"], "could not be converted to Integer"),
    # a method's per-concept settings are checked by the method before any model loads (validate_concept)
    (["method=ablating", "~concept.ablating"], "concept 'nudity' has no Ablating Concepts data"),
    (["method=ablating", "concept.ablating.mode=poem"], "concept.ablating.mode must be one of caption, style, object"),
    (["method=fmn", "concept.fmn.type=poem"], "concept.fmn.type must be one of object, style"),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_clear_user_error(argv, words):
    with pytest.raises(UserError) as err:
        precheck_train_args(["model=tiny", "concept=nudity", *argv])
    message = str(err.value)
    assert words in message and "\n" not in message


@pytest.mark.parametrize("override,match", [
    ("method.lr=inf", "method.lr must be a positive finite number, got inf"),
    ("method.lr=nan", "method.lr must be a positive finite number, got nan"),
    ("method.grad_clip=-1", "method.grad_clip must be a positive finite number or null"),
    ("method.grad_clip=inf", "method.grad_clip must be a positive finite number or null"),
])
def test_non_finite_or_negative_optimizer_settings_are_refused(override, match):
    """A negative grad_clip would turn clipping into gradient ascent; an infinite lr makes a NaN delta (issue 20)."""
    from tests.conftest import assert_refused_in_one_sentence

    assert_refused_in_one_sentence(["model=tiny", "concept=nudity", override], match)


@pytest.mark.parametrize("argv, env, words", [
    (["params.include=['(unclosed']"], {}, "params.include pattern '(unclosed' is not a valid regular expression"),
    (["method.T=100000"], {}, "method.T=100000 is more sampling steps than the model's scheduler has timesteps (1000)"),
    (["logger=wandb"], {"WANDB_MODE": "bogus"}, "WANDB_MODE=bogus is not a W&B mode"),
])
def test_errors_the_training_command_used_to_end_in_a_traceback(tmp_path, argv, env, words):
    """Issue 20: each of these ended in a Python traceback (re.error, diffusers' ValueError, pydantic's error); now one
    sentence, exit 2, and the run folder holds no config.yaml (a rerun is not refused as another run's folder)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    run = tmp_path / "run"
    # not run_cli: it sets WANDB_MODE=offline
    proc = subprocess.run([sys.executable, "-m", "erasure.train", "model=tiny", "concept=nudity", "trainer.iterations=1",
                           "trainer.preview_every=0", *argv, f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **env})
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert proc.returncode == 2 and lines == [lines[-1]] and words in lines[-1], proc.stderr[-2000:]
    assert not (run / "config.yaml").exists()


def test_a_config_file_that_is_not_yaml_is_one_sentence_naming_it(tmp_path):
    """Issue 20: malformed YAML in a concept file ended in a yaml.ScannerError traceback. precheck_train_args turns the
    parser's error into this sentence (checked by hand on the command line: `concept=<a broken file>` exits 2 with it)."""
    import yaml

    from erasure.cli import yaml_error

    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ntargets: [a circle\n")
    with pytest.raises(yaml.YAMLError) as err:
        yaml.safe_load(open(path))
    message = yaml_error(err.value)
    assert message == (f"{path}, line 3, column 1 is not valid YAML (expected ',' or ']', but got '<stream end>'): "
                       "fix that file")


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("_class_name"), "names no diffusers scheduler (_class_name: None)"),
    (lambda c: c.update(_class_name="NoSuchScheduler"), "(_class_name: 'NoSuchScheduler')"),
])
def test_a_scheduler_config_without_a_known_class_is_one_sentence(tmp_path, edit, words):
    """Issue 20: a scheduler config without `_class_name` ended in a KeyError traceback."""
    import json
    import shutil

    from omegaconf import OmegaConf

    from erasure.models import load_models
    from erasure.toyworld import world

    model = tmp_path / "model"
    shutil.copytree(__import__("pathlib").Path(world.__file__).parent / "model", model)
    path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    cfg = OmegaConf.load("conf/model/toyworld.yaml")
    cfg.path = str(model)
    with pytest.raises(UserError, match="scheduler config") as err:
        load_models(cfg, "cpu")
    assert words in str(err.value)
