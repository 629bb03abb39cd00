"""Shared command-line plumbing: config-group checks before Hydra starts, so that a typo in
``method=``, ``params=``, ``model=``, ``concept=`` or ``logger=`` ends in one sentence, not a Hydra trace."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.experimental.callback import Callback

from .config import compose, group_options, validate
from .errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig

GROUPS = ("model", "method", "concept", "params", "logger", "trainer")
GROUP_WORD = {"params": "parameter subset"}


def check_group_overrides(argv: list[str]) -> None:
    """Refuse unknown options of the config groups named on the command line (sweeps included)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS:
            continue
        choices = value.strip()
        if choices.startswith(("choice(", "glob(")):
            continue
        options = group_options(key)
        for choice in choices.split(","):
            if choice.strip() and choice.strip() not in options:
                what = GROUP_WORD.get(key, key)
                raise UserError(f"unknown {what} '{choice.strip()}' ({key}=): choose one of {', '.join(options)}")


def parse_options(argv: list[str], options: set[str], usage: str, required) -> "DictConfig":
    """``key=value`` arguments of a small CLI as a DictConfig; unknown keys or ``required(args)`` false end in
    one sentence (the unknown keys, then the usage line)."""
    from omegaconf import OmegaConf

    try:
        args = OmegaConf.from_dotlist(argv) if argv else OmegaConf.create()
    except Exception:  # noqa: BLE001 -- a malformed key=value list
        raise UserError(f"cannot parse the command line; {usage}") from None
    unknown = set(args) - options
    if unknown or not required(args):
        raise UserError(f"{'unknown option ' + ', '.join(sorted(unknown)) + '; ' if unknown else ''}{usage}")
    return args


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")


def _hydra_flags_and_overrides(argv: list[str]) -> tuple[list[str], bool]:
    overrides, multirun, skip = [], False, False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir"):
            skip = True
        elif arg.startswith("-"):
            continue
        elif not arg.startswith(("hydra.", "hydra/", "+hydra")):
            overrides.append(arg)
    return overrides, multirun


def yaml_error(exc) -> str:
    """A YAML parser error as one sentence: the file, line and column, and the problem."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a config file"
    return f"{where} is not valid YAML ({getattr(exc, 'problem', None) or exc}): fix that file"


def precheck_train_args(argv: list[str], max_jobs: int = 64) -> None:
    """Compose and validate the configs a command line asks for, before Hydra starts any job (or makes a folder).

    Unknown keys, bad values, and (for ``-m``) every value of every sweep are checked here, so that a typo ends in
    one sentence instead of a Hydra trace, and a sweep fails before its first job, not at its 30th. The job does not
    check its config again (:func:`erasure.config.validate` remembers the configs it passed in this process).
    """
    import itertools

    import yaml

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_group_overrides(argv)
    overrides, multirun = _hydra_flags_and_overrides(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise UserError(f"cannot parse the command line: {str(exc).splitlines()[0]}") from None
    choices = []
    for ov, text in zip(parsed, overrides):
        if multirun and ov.is_sweep_override() and not ov.is_discrete_sweep():
            return  # range/interval sweeps: leave them to Hydra
        values = list(ov.sweep_string_iterator()) if multirun and ov.is_sweep_override() else [None]
        key = text.split("=", 1)[0]
        choices.append([text if v is None else f"{key}={v}" for v in values])
    combos = list(itertools.islice(itertools.product(*choices), max_jobs)) if choices else [()]
    for combo in combos:
        try:
            cfg = compose(list(combo))
        except yaml.YAMLError as exc:  # a hand-edited config file (concept, model, ...) that is not valid YAML
            raise UserError(yaml_error(exc)) from None
        except (HydraException, OmegaConfBaseException) as exc:
            first = str(exc).strip().splitlines()[0].rstrip(".")
            cause = str(exc.__cause__ or "").strip().splitlines()
            if cause and cause[0] not in first:  # e.g. a typed schema's "Value 'abc' ... could not be converted"
                first = f"{first} ({cause[0].rstrip('.')})"
            raise UserError(f"{first}: check the spelling of the key or value (`python -m erasure.train --cfg job` prints the config)") from None
        if not cfg.get("resume"):
            validate(cfg)


# ---------------------------------------------------------------------------------------------- sweeps (-m)
FAILED_JOB = "failed_job.json"  # in a failed sweep job's folder: its number, overrides and error


def record_failed_job(hc, message: str) -> None:
    """A sweep job's failure, written into its folder (any launcher: joblib runs jobs in other processes) for
    :class:`FailedJobs`; the job then returns, so that the sweep's other jobs still run."""
    import json

    from .io import write_text_atomic

    overrides = " ".join(hc.overrides.task) or "(no overrides)"
    logging.getLogger("erasure.train").error("job #%s (%s) failed: %s", hc.job.num, overrides, message)
    write_text_atomic(Path(hc.runtime.output_dir) / FAILED_JOB,
                      json.dumps({"job": hc.job.num, "overrides": overrides, "error": message}) + "\n")


class FailedJobs(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/train.yaml): at the end of a sweep, name every failed job with its
    overrides and error, and exit 1 (the other jobs ran to the end)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        import json

        failed = [json.loads(p.read_text()) for p in sorted(Path(str(config.hydra.sweep.dir)).glob(f"*/{FAILED_JOB}"))]
        if not failed:
            return
        failed.sort(key=lambda f: int(f["job"]))
        print(f"error: {len(failed)} sweep job(s) failed (the others finished): "
              + "; ".join(f"#{f['job']} ({f['overrides']}): {f['error']}" for f in failed), file=sys.stderr, flush=True)
        raise SystemExit(1)
