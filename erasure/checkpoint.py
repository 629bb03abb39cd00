"""Checkpoints: everything needed to continue a run bit-for-bit, written atomically, loaded without pickle.

A checkpoint is a folder ``<run>/checkpoints/step_NNNNNN/`` with ``tensors.safetensors`` (trained
parameters, optimizer moments, RNG states, the method's tensors, the teacher bank's pre-computed work)
and ``state.json`` (step, optimizer hyper-parameters, Python/numpy RNG states, the method's other state).
It is written into a temporary folder and renamed into place, so a kill leaves the previous one intact.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .io import atomic_folder
from .errors import UserError

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _split(prefix: str, value: Any, tensors: dict, plain: dict) -> None:
    """Tensors (at any depth of dicts/lists) go to ``tensors`` under dotted keys; the rest stays JSON."""
    if torch.is_tensor(value):
        tensors[prefix] = value.detach().cpu().contiguous()
        plain[prefix] = {"__tensor__": prefix}
    elif isinstance(value, dict):
        out = {}
        for k, v in value.items():
            holder: dict = {}
            _split(f"{prefix}.{k}", v, tensors, holder)
            out[str(k)] = holder[f"{prefix}.{k}"]
        plain[prefix] = {"__dict__": out}
    elif isinstance(value, (list, tuple)):
        sub = {}
        for i, v in enumerate(value):
            _split(f"{prefix}.{i}", v, tensors, sub)
        plain[prefix] = {"__list__": [sub[f"{prefix}.{i}"] for i in range(len(value))]}
    else:
        plain[prefix] = value


def _join(node: Any, tensors: dict) -> Any:
    if isinstance(node, dict) and "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if isinstance(node, dict) and "__dict__" in node:
        return {k: _join(v, tensors) for k, v in node["__dict__"].items()}
    if isinstance(node, dict) and "__list__" in node:
        return [_join(v, tensors) for v in node["__list__"]]
    return node


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(x):
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    return x


def config_digest(run_dir: Path) -> str | None:
    """sha256 of the run's ``config.yaml`` (recorded in each checkpoint: ``resume=`` notices an edited config)."""
    path = Path(run_dir) / "config.yaml"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def saved_digest(path: Path) -> str | None:
    """The ``config.yaml`` digest a checkpoint recorded (None: unreadable, or written before digests were kept)."""
    try:
        return json.loads((path / "state.json").read_text()).get("config_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` (nested dicts/lists of tensors and JSON values) as checkpoint ``step``, with the digest of
    the run's ``config.yaml``; prune old ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    plain: dict = {}
    _split("ckpt", payload, tensors, plain)
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "state": plain["ckpt"],
                                                    "config_sha256": config_digest(run_dir)}))

    final = atomic_folder(root / f"step_{step:06d}", write)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and
             (p / "state.json").is_file() and (p / "tensors.safetensors").is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> tuple[int, dict]:
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "tensors.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:  # missing, truncated or corrupt
        raise UserError(f"checkpoint '{path.name}' is unreadable ({str(exc).splitlines()[0][:120]})") from None
    return int(meta["step"]), _join(meta["state"], tensors)
