"""One run per folder: an exclusive lock file, and the cleanup of temp files from killed writes.

:func:`lock_run_folder` creates ``RUN_DIR/.lock`` with ``os.open(O_CREAT | O_EXCL)``, which is
atomic: of two runs started on one folder exactly one creates it. The file is a small JSON
object (``pid``, ``host``, ``command``, ``started``) so the run that is refused can name the
one that holds the folder. The lock is removed when the ``with`` block ends, on exceptions and
Ctrl-C too. A lock left by a killed run (``kill -9``, a crash) is stale when it was taken on this
host by a pid that is no longer alive: it is then taken over with one line saying so. A lock from
another host (a shared file system) cannot be checked and is never broken automatically; the
refusal says to ``rm RUN_DIR/.lock`` once that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "RunLocked", "clean_temp_files", "lock_run_folder", "read_lock"]

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another live run holds the folder; the message is one line naming it and how to break the lock."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError as err:
        return err.errno != errno.ESRCH
    return True


def read_lock(folder: str | Path) -> dict[str, Any] | None:
    """The lock record of ``folder`` (None without a lock; ``{}`` when it cannot be parsed)."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict[str, Any]) -> str:
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {record.get('started', '?')}"


def _is_stale(record: dict[str, Any]) -> bool:
    pid = record.get("pid")
    return record.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def _try_create(lock: Path, payload: bytes) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _take_over(lock: Path, seen: dict[str, Any]) -> bool:
    """Remove the stale lock ``seen`` (True), unless another run replaced it meanwhile (then leave that one)."""
    aside = lock.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.rename(lock, aside)  # atomic: of two runs taking over, one moves it
    except FileNotFoundError:
        return False
    try:
        moved = json.loads(aside.read_text())
    except (OSError, ValueError):
        moved = {}
    if moved != seen:  # a live lock was created between our read and the rename: put it back
        with contextlib.suppress(OSError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)
    return moved == seen


@contextlib.contextmanager
def lock_run_folder(folder: str | Path, command: str = "", say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold ``folder/.lock`` for the ``with`` block; :class:`RunLocked` when another live run holds it.

    ``command``: recorded in the lock (what the other run is told). ``say``: where the one line about a
    taken-over stale lock goes (standard error by default).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    mine = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command or " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    payload = (json.dumps(mine) + "\n").encode()
    for _ in range(3):
        if _try_create(lock, payload):
            break
        record = read_lock(folder)
        if record is None:  # released meanwhile
            continue
        if record and _is_stale(record):
            if _take_over(lock, record):
                (say or _stderr)(f"Taking over the stale lock {lock} of a run that is gone ({_describe(record)})")
            continue
        holder = _describe(record) if record else "a run whose lock file cannot be read"
        command_part = f" ({record['command']})" if record.get("command") else ""
        raise RunLocked(
            f"{folder} is in use by another run: {holder}{command_part}; "
            f"if that run is gone (e.g. on another host), remove the lock with: rm {lock}"
        )
    else:
        raise RunLocked(f"{folder}: could not take the lock {lock}; if no run uses the folder, remove it with: rm {lock}")
    try:
        yield lock
    finally:
        if read_lock(folder) == mine:
            lock.unlink(missing_ok=True)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def clean_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files of atomic writes that were killed (``.NAME.*.tmp``) under ``folder``; returns them.

    Call it only while holding the folder's lock: a live run's temp files look the same.
    """
    removed = []
    for path in sorted(Path(folder).rglob(".*.tmp")):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
