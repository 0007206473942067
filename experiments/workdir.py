"""One run per workdir: an advisory lock that a live run holds and a dead one cannot.

``experiments.train``, ``experiments.sweep`` and ``experiments.export`` hold ``DIR/.lock``
while they write into DIR. The lock is ``fcntl.flock`` on that file: the kernel drops it when
its holder exits, however it exits (SIGKILL included), so a lock left by a killed run is
stale by construction and the next run takes it over. The file names the holder (command,
host, pid, start time) for the error a second run gets. Shared file systems that support
``flock`` (local disks; NFS v4) give the same guarantee across hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir."""


def try_lock(workdir, command: str) -> tuple[int | None, str]:
    """Takes the workdir's lock if no live run holds it.

    Args:
      workdir: the run directory (created if missing).
      command: what this run is (``"train"``, ``"sweep"``, ``"export"``), for the holder's
        description.

    Returns:
      ``(fd, "")`` with the lock held on ``fd``, or ``(None, holder)`` describing the live run
      that holds it.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.pread(fd, 4096, 0))
        os.close(fd)
        return None, holder
    me = {
        "command": command,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd, ""


def release(fd: int | None) -> None:
    """Releases a lock taken by :func:`try_lock` (``None``: nothing to release)."""
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def busy_message(workdir, holder: str) -> str:
    """The one-line error for a workdir that ``holder`` holds."""
    return (
        f"workdir={str(workdir)!r} is in use by {holder}: wait for that run to end, or use "
        "another --workdir"
    )


@contextlib.contextmanager
def hold(workdir, command: str):
    """Holds the workdir's lock for the duration of the block.

    Args:
      workdir: the run directory (created if missing).
      command: what this run is, as in :func:`try_lock`.

    Yields:
      None.

    Raises:
      WorkdirInUse: a live run holds the workdir (nothing is written then).
    """
    fd, holder = try_lock(workdir, command)
    if fd is None:
        raise WorkdirInUse(busy_message(workdir, holder))
    try:
        yield
    finally:
        release(fd)


def _describe(raw: bytes) -> str:
    """The holder named in a lock file's contents."""
    try:
        h = json.loads(raw.decode())
        return f"{h['command']} (pid {h['pid']} on host {h['host']}, since {h['since']})"
    except (ValueError, KeyError, TypeError):
        return "another run (it has not written its name yet)"
