"""One run per folder: a lock file in the run directory names the process that holds it.

The lock is created with O_EXCL, so of two runs started into one folder at the same moment exactly
one gets it. A second run is refused with the PID, host and start time of the first. A lock left by
a process that no longer exists (killed with SIGKILL, a machine that rebooted) is detected on the
same host — the PID is gone, or now belongs to a process that started later — and taken over."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from torchslim.errors import RunDirError

LOCK = ".torchslim.lock"


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, Linux), or None where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process recorded in a lock on this host still runs (and is the same process)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    ticks = _start_ticks(pid)
    return ticks is None or holder.get("start_ticks") in (None, ticks)


def _record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_ticks": _start_ticks(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _describe(holder: dict) -> str:
    return f"PID {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"


def acquire(run_dir: Path) -> Path:
    """Take the lock of `run_dir` (which exists) or raise RunDirError naming the run that holds it."""
    path = Path(run_dir) / LOCK
    for _ in range(3):  # a stale lock removed under us by another taker: try again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}  # half-written by a process killed while taking it: stale
            if not isinstance(holder, dict):
                holder = {}
            if holder.get("host", socket.gethostname()) != socket.gethostname():
                raise RunDirError(
                    f"{run_dir} is in use by another torchslim run ({_describe(holder)}). Wait for it to "
                    f"finish, or choose another directory with --out. If that run is no longer running, "
                    f"delete {path} and start again."
                ) from None
            if _alive(holder):
                raise RunDirError(
                    f"{run_dir} is in use by another torchslim run ({_describe(holder)}). Wait for it to "
                    "finish or stop it, or choose another directory with --out."
                ) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_record(), f)
        return path
    raise RunDirError(f"Could not take the lock {path}: other runs keep creating it. Choose another --out.")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    try:
        holder = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return
    if isinstance(holder, dict) and holder.get("pid") == os.getpid():
        Path(path).unlink(missing_ok=True)


@contextlib.contextmanager
def held(run_dir: Path) -> Iterator[Path]:
    path = acquire(run_dir)
    try:
        yield path
    finally:
        release(path)
