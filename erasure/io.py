"""Writes that a kill never leaves half-done: a temporary name beside the target, then one rename.

Every file and folder the project writes for users (deltas, checkpoints, images, reports, caches) goes through
these helpers.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_path(path: Path):
    """A temporary file in ``path``'s folder; the caller renames it into place with os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place: a kill
    never leaves a truncated file under the final name."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_folder(path: str | Path, write, *, keep_existing: bool = False) -> Path:
    """Call ``write(tmp_dir)`` on a private temporary folder beside ``path``, then move it into place in one step:
    a kill never leaves a half-written folder under the final name.

    ``keep_existing=False`` replaces a folder already at ``path`` (a checkpoint rewritten at the same step).
    ``keep_existing=True`` is for folders whose content is a pure function of their inputs and that several
    processes (the ranks of ``accelerate launch``) may build at once: the first move wins and the others drop
    their identical copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        write(tmp)
        if path.is_dir() and not keep_existing:
            shutil.rmtree(path)
        elif path.is_dir() and not any(path.iterdir()):
            with contextlib.suppress(OSError):  # another process may have removed or filled it meanwhile
                path.rmdir()
        try:
            os.replace(tmp, path)
        except OSError:
            if not (keep_existing and path.is_dir() and any(path.iterdir())):
                raise
            log.info("%s was built by another process meanwhile; using that one", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
