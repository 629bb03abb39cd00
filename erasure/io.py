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
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_path(path: Path):
    """A temporary file in ``path``'s folder; the caller renames it into place with os.replace. Its permissions are
    what a plain ``open(path, "w")`` would give (0666 less the umask), not mkstemp's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
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
    os.chmod(tmp, 0o777 & ~_umask())  # as os.mkdir would make it (mkdtemp's is private 0700)
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


def strict(value):
    """A copy that strict JSON accepts: NaN and infinities become None (null), tuples lists, numpy scalars numbers."""
    import math

    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(value, **kwargs) -> str:
    """``json.dumps`` of :func:`strict`'s copy with ``allow_nan=False``: every JSON file the project writes is strict
    JSON (no ``NaN`` / ``Infinity``, which other JSON readers refuse); a missing or non-finite number is ``null``."""
    import json

    return json.dumps(strict(value), allow_nan=False, **kwargs)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat, field 22), or "" where /proc is
    absent: with the PID it names one process, even after the PID is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return not start or _process_start(pid) in ("", start)


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "folder"):
    """Own ``folder`` for the duration of the block: ``<folder>/.lock`` holds this process's PID, start time and host.
    A live owner makes this raise a :class:`~erasure.errors.UserError` (two trainings into one run folder would
    interleave their files); a lock left by a process that is gone (killed) is taken over with a warning. The lock is
    removed when the block ends, however it ends."""
    import socket

    from .errors import UserError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    host = socket.gethostname()
    me = f"{os.getpid()} {_process_start(os.getpid())} {host}"
    unreadable_since = None
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid, start, owner_host = (lock.read_text().split() + ["", "", ""])[:3]
                pid = int(pid)
            except (OSError, ValueError):  # being written this instant: look again; still empty after 2 s, the
                pid, start, owner_host = None, "", ""  # owner died between creating and writing it: take it over
                unreadable_since = unreadable_since or time.monotonic()
                if time.monotonic() - unreadable_since < 2.0:
                    time.sleep(0.05)
                    continue
                log.warning("%s %s holds an empty or unreadable lock: taking it over", what, folder)
                lock.unlink(missing_ok=True)
                continue
            if owner_host not in ("", host):
                raise UserError(f"{what} '{folder}' is locked by process {pid} on {owner_host}: wait for it to finish, "
                                f"or delete {lock} if that process is gone") from None
            if _alive(pid, start):
                raise UserError(f"{what} '{folder}' is in use by process {pid}: wait for it to finish, or choose "
                                "another folder") from None
            log.warning("%s %s was left locked by process %d, which is no longer running: taking it over", what,
                        folder, pid)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == me:
                lock.unlink()
