"""Kills a run at a chosen moment (the kill-and-resume tests): a CLI in a subprocess by
SIGKILL, or a run in this process at a checkpoint (:func:`killed_at_checkpoint`)."""

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Killed(Exception):
    """Stands for the kill of a run in this process."""


@contextlib.contextmanager
def killed_at_checkpoint(saves: int):
    """Runs the body as if the process died when about to write checkpoint ``saves + 1``:
    the first ``saves`` checkpoints are written, the next save raises :class:`Killed`
    (the epoch it would save is lost, as in a kill), and the body must end by it.

    Args:
      saves: the checkpoints written before the kill (of any run or chunk, counted together).
    """
    from experiments import common

    real, count = common.save_checkpoint, [0]

    def save(*args, **kwargs):
        count[0] += 1
        if count[0] > saves:
            raise Killed(f"killed before checkpoint {count[0]}")
        return real(*args, **kwargs)

    common.save_checkpoint = save
    try:
        with pytest.raises(Killed):
            yield
    finally:
        common.save_checkpoint = real


def run_until(cmd, predicate, watched: Path):
    """Starts ``cmd`` in the repository root and SIGKILLs it once ``predicate`` holds.

    Args:
      cmd: the command line.
      predicate: ``predicate(stdout_so_far, watched) -> bool``, polled every 2 ms.
      watched: a path handed to the predicate (e.g. the checkpoint directory).

    Returns:
      ``(stdout, killed)``: what the command printed, and whether it was killed (False: it
      finished first).
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    while p.poll() is None:
        if predicate("".join(lines), watched):
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            return "".join(lines), True
        time.sleep(0.002)
    reader.join(timeout=5)
    return "".join(lines), False


def run_to_end(cmd):
    """Runs ``cmd`` in the repository root to completion (CPU, 10 minutes at most).

    Returns:
      The ``subprocess.CompletedProcess`` (text output captured); asserts exit status 0.
    """
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out
