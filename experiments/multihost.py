"""Several processes, on one host or many, as one run: JAX's multi-controller runtime.

Every process runs the same command; ``jax.distributed.initialize`` joins them before any
device is touched. The set-up comes from flags, from the environment JAX reads
(``JAX_COORDINATOR_ADDRESS``) plus ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or, under
Slurm, Open MPI or on a Cloud TPU slice of several hosts, from JAX's own cluster detection.
Without any of them a run is one process and nothing here does anything.

A sweep splits each chunk's settings over every device of every process (the mesh axis
``"settings"``): each device trains its own settings, so no training step waits on another
process; the processes meet at the end of each epoch (its numbers) and at checkpoints, which
Orbax writes together. A single training splits each batch over every device of every
process (``experiments.train``). One process (0) writes the shared files.
"""

from __future__ import annotations

import contextlib
import os
import sys

from absl import flags

from experiments import workdir as wd


def define_flags() -> None:
    """The multi-process flags of ``experiments.train`` and ``experiments.sweep``."""
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0, for a run of several processes (default: the environment's"
        " JAX_COORDINATOR_ADDRESS, or the cluster's).",
    )
    flags.DEFINE_integer("num_processes", None, "Processes in the run (env JAX_NUM_PROCESSES).")
    flags.DEFINE_integer(
        "process_id", None, "This process, 0..num_processes-1 (env JAX_PROCESS_ID)."
    )
    flags.DEFINE_integer(
        "distributed_timeout",
        300,
        "Seconds to wait for every process to join, and without news from one before the"
        " others stop with an error.",
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def cluster_detected() -> bool:
    """Whether the environment is a cluster of several processes that JAX sets up itself
    (Slurm with more than one task, Open MPI with more than one rank, a TPU slice of several
    hosts)."""
    env = os.environ
    return (
        int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: int = 300,
) -> bool:
    """Joins the run's processes with ``jax.distributed.initialize`` when there are several.

    Call it before anything touches a device.

    Args:
      coordinator_address: ``host:port`` of process 0 (default ``JAX_COORDINATOR_ADDRESS``).
      num_processes: the processes in the run (default ``JAX_NUM_PROCESSES``).
      process_id: this process (default ``JAX_PROCESS_ID``).
      timeout: seconds to wait for all to join, and without a heartbeat from one before the
        others stop.

    Returns:
      Whether JAX's distributed runtime was initialized.

    Raises:
      ValueError: an incomplete or inconsistent set-up (names the field and what is allowed).
    """
    import jax

    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if address is None and n is None and pid is None:
        if not cluster_detected():
            return False
        jax.distributed.initialize(
            initialization_timeout=timeout, heartbeat_timeout_seconds=timeout
        )
        return True
    if address is None or n is None or pid is None:
        raise ValueError(
            f"coordinator_address={address!r}, num_processes={n}, process_id={pid}: give all"
            " three for a run of several processes, or none"
        )
    if n < 1 or not 0 <= pid < n:
        raise ValueError(f"process_id={pid} is not allowed: use 0..{n - 1} (num_processes={n})")
    if timeout < 1:
        raise ValueError(f"distributed_timeout={timeout} is not allowed: use >= 1 seconds")
    if n == 1:
        return False
    jax.distributed.initialize(
        address,
        n,
        pid,
        initialization_timeout=timeout,
        heartbeat_timeout_seconds=timeout,
    )
    return True


def initialize_from_flags(flag_values) -> None:
    """:func:`initialize` with the parsed flags; a bad set-up exits 2 with one line."""
    try:
        initialize(
            flag_values.coordinator_address,
            flag_values.num_processes,
            flag_values.process_id,
            flag_values.distributed_timeout,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def is_primary() -> bool:
    """Whether this process writes the run's shared files (process 0)."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (nothing to wait for in a one-process run).

    Raises:
      RuntimeError: another process of the run died (one line, for the CLI's error).
    """
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    try:
        multihost_utils.sync_global_devices(name)
    except Exception as e:  # noqa: BLE001 - JAX raises backend errors of several types
        raise ProcessLost(
            f"another process of this run stopped (at {name!r}: {_first_line(e)})"
        ) from e


def put(tree, sharding):
    """Places host or single-device arrays (the same on every process) by ``sharding``, whose
    devices may span several processes; PRNG key arrays included.

    Args:
      tree: a pytree of arrays.
      sharding: a ``jax.sharding.Sharding``.

    Returns:
      The pytree of global arrays.
    """
    import jax

    def one(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), sharding))
        return jax.device_put(x, sharding)

    return jax.tree.map(one, tree)


def fetch(tree):
    """The host (numpy) value of every array in ``tree``, shards of other processes included.

    Raises:
      ProcessLost: another process of the run died (the gathering needs every process).
    """
    import jax

    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    try:
        return multihost_utils.process_allgather(tree, tiled=True)
    except Exception as e:  # noqa: BLE001 - JAX raises backend errors of several types
        raise ProcessLost(f"another process of this run stopped ({_first_line(e)})") from e


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__


class ProcessLost(RuntimeError):
    """Another process of a multi-process run is gone."""


@contextlib.contextmanager
def hold_workdir(workdir, command: str):
    """The run's lock on its workdir (:mod:`experiments.workdir`), taken by process 0 for all.

    Every process learns whether process 0 got it, so a run refused by a live holder stops
    in every process at once.

    Args:
      workdir: the run directory.
      command: ``"train"``, ``"sweep"`` or ``"export"``.

    Yields:
      None.

    Raises:
      experiments.workdir.WorkdirInUse: a live run of another command line holds it.
    """
    import jax

    if jax.process_count() == 1:
        with wd.hold(workdir, command):
            yield
        return
    import numpy as np
    from jax.experimental import multihost_utils

    fd, holder = wd.try_lock(workdir, command) if is_primary() else (None, "")
    # Process 0's answer, for every process: it took the lock for the run, or was refused.
    ok = multihost_utils.broadcast_one_to_all(np.int32(fd is not None))
    if not int(ok):
        raise wd.WorkdirInUse(wd.busy_message(workdir, holder or "another run (see process 0)"))
    try:
        yield
    finally:
        wd.release(fd)


def exit_lost(e: ProcessLost) -> None:
    """Ends this process at once after another one died: the one-line error, exit 1 (a
    normal exit would wait for the dead process in JAX's shutdown barrier)."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    os._exit(1)
