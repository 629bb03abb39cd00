"""Evaluation configs composed from command-line overrides: ``conf/eval/run.yaml`` (one system; its suite defaults to
the one named like the run's model) and the experiments ``conf/experiment/<name>.yaml`` (Table 1, results, the sweep
summary), whose ``suite`` group is ``conf/eval/suite/``."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from erasure.errors import UserError

from .prompts import ROOT

CONF_DIR = ROOT / "conf"
EVAL_CONF_DIR = CONF_DIR / "eval"


def suite_options(group: str = "suite") -> list[str]:
    return sorted(p.stem for p in (EVAL_CONF_DIR / group).glob("*.yaml"))


# configs whose tier group defaults to the one named like the run's model: run.yaml (the suite), attack.yaml (the
# threat model of the robustness evaluation)
TIER_GROUP = {"run": "suite", "attack": "robustness"}


def _value(overrides: list[str], key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key), None)


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """``run`` (conf/eval/run.yaml), ``attack`` (conf/eval/attack.yaml) or ``experiment/<name>`` with the given overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir

    overrides = list(overrides)
    group = TIER_GROUP.get(config_name, "suite")
    suite, run = _value(overrides, group), _value(overrides, "run")
    if suite is None and run is not None and config_name in TIER_GROUP:
        cfg_path = Path(run) / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"'{run}' is not a run folder (no config.yaml): pass the folder that erasure.train wrote")
        suite = str(OmegaConf.load(cfg_path).model.name)
        if suite not in suite_options(group):
            raise UserError(f"no {group} config for model '{suite}': pass {group}=<one of "
                            f"{', '.join(suite_options(group))}>")
        overrides.append(f"{group}={suite}")
    elif suite is not None and suite not in suite_options(group):
        raise UserError(f"unknown {group} '{suite}': choose one of {', '.join(suite_options(group))}")
    config_dir = EVAL_CONF_DIR
    if config_name.startswith("experiment/"):  # conf/experiment/ alone (model=, concept= stay plain keys), with
        config_dir, config_name = CONF_DIR / "experiment", config_name.split("/", 1)[1]  # the suite group of conf/eval/
        overrides.append(f"hydra.searchpath=['file://{EVAL_CONF_DIR}']")
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=overrides)
        except Exception as exc:  # hydra's override/compose errors: one line for the user
            raise UserError(f"bad evaluation option: {str(exc).splitlines()[0]}") from None
