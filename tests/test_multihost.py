"""Several processes as one run (JAX's distributed runtime on 127.0.0.1, one CPU device each),
and one run per workdir."""

import csv
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import digits
from experiments import multihost, train
from experiments import workdir as wd
from experiments.sweep_report import TIMING_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
ENV.pop("XLA_FLAGS", None)
TIMEOUT = 15  # seconds to join, and without news from a process before the others stop

SWEEP = [
    "--config=configs/sweep_digits_smoke.py",
    "--config.num_epochs=4",
    "--config.sparsity.prune_begin_epoch=1",
    "--config.sparsity.prune_end_epoch=3",
    "--config.sweep.chunk_size=2",  # 4 chunks: two per process
]
# Float weights and gradients, so that data parallelism differs from one device only by the
# order of float sums; pruning to 4X within the run.
TRAIN = [
    "--config=configs/digits.py",
    "--config.quant.w_bits=32",
    "--config.quant.a_bits=32",
    "--config.quant.bf16_grads=False",
    "--config.num_epochs=4",
    "--config.sparsity.prune_begin_epoch=1",
    "--config.sparsity.prune_end_epoch=3",
    "--config.checkpoint_every_epochs=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(module, args, workdir, *, process=None, port=None, env=None):
    cmd = [sys.executable, "-m", f"experiments.{module}", *args, f"--workdir={workdir}"]
    if process is not None:
        cmd += [
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process}",
            f"--distributed_timeout={TIMEOUT}",
        ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _two_processes(module, args, workdir):
    port = _free_port()
    procs = [_start(module, args, workdir, process=i, port=port) for i in (0, 1)]
    return [_finish(p) for p in procs]


def _rows(path):
    """results.csv without its timing columns."""
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def one_process_sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one") / "sweep"
    rc, out, err = _finish(_start("sweep", SWEEP, workdir))
    assert rc == 0, err[-3000:]
    return _rows(workdir / "results.csv")


@pytest.mark.slow
def test_sweep_over_two_processes_equals_one(one_process_sweep, tmp_path):
    (rc0, out0, err0), (rc1, out1, err1) = _two_processes("sweep", SWEEP, tmp_path / "sweep")
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert _rows(tmp_path / "sweep" / "results.csv") == one_process_sweep  # bit for bit
    assert len(one_process_sweep) == 8
    assert "runs (" in out0 and "runs (" not in out1  # one process reports
    # Each process trained its own chunks: two chunk checkpoints each, every chunk once.
    layout = json.loads((tmp_path / "sweep" / "chunks.json").read_text())
    assert sorted(i for c in layout for i in c["ids"]) == list(range(8))
    assert all(
        (tmp_path / "sweep" / "chunks" / f"chunk_{c['chunk']}.json").exists() for c in layout
    )


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_the_rerun_resumes(one_process_sweep, tmp_path):
    workdir = tmp_path / "sweep"
    port = _free_port()
    procs = [_start("sweep", SWEEP, workdir, process=i, port=port) for i in (0, 1)]
    first = workdir / "checkpoints" / "chunk_1"  # process 1's first chunk
    deadline = time.monotonic() + 240
    while not (first.exists() and any(p.name.isdigit() for p in first.iterdir())):
        assert time.monotonic() < deadline and procs[1].poll() is None
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    rc, _, err = _finish(procs[0], timeout=TIMEOUT * 6)
    procs[1].communicate()
    assert rc != 0
    assert time.monotonic() - killed_at < TIMEOUT * 4
    assert "another process of this run stopped" in err or "another task died" in err, err[-2000:]
    assert not (workdir / "results.csv").exists()
    (rc0, _, err0), (rc1, _, err1) = _two_processes("sweep", SWEEP, workdir)
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert _rows(workdir / "results.csv") == one_process_sweep


def _history(workdir):
    return json.loads((Path(workdir) / "results.json").read_text())["history"]


def _params_and_masks(workdir):
    from experiments import common

    _, _, state, _ = common.restore_run(workdir)
    return state.params, state.opt_state.masks


@pytest.mark.slow
def test_train_data_parallel_matches_one_device(tmp_path):
    rc, _, err = _finish(_start("train", TRAIN, tmp_path / "one"))
    assert rc == 0, err[-3000:]
    forced = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    rc, _, err = _finish(_start("train", TRAIN, tmp_path / "devices", env=forced))
    assert rc == 0, err[-3000:]
    (rc0, out0, err0), (rc1, out1, err1) = _two_processes("train", TRAIN, tmp_path / "processes")
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert "test_accuracy" in out0 and "test_accuracy" not in out1
    ref = _history(tmp_path / "one")
    ref_params, ref_masks = _params_and_masks(tmp_path / "one")
    import jax

    for run in ("devices", "processes"):
        hist = _history(tmp_path / run)
        assert len(hist) == len(ref) == 4
        for a, b in zip(hist, ref, strict=True):
            np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
            assert a["test_accuracy"] == b["test_accuracy"]
        params, masks = _params_and_masks(tmp_path / run)
        close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
        jax.tree.map(close, params, ref_params)
        jax.tree.map(np.testing.assert_array_equal, masks, ref_masks)
        assert sum(int(np.sum(m == 0)) for m in jax.tree.leaves(masks)) > 0  # pruned


def test_second_run_on_a_held_workdir_stops_at_once(tmp_path):
    args = [*TRAIN, "--config.num_epochs=2", "--config.sparsity.prune_end_epoch=2"]
    a = _start("train", args, tmp_path / "wd")
    b = _start("train", args, tmp_path / "wd")
    results = sorted([_finish(a), _finish(b)], key=lambda r: r[0])
    (rc_ok, _, _), (rc_refused, _, err) = results
    assert (rc_ok, rc_refused) == (0, 2), err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: workdir='{tmp_path / 'wd'}' is in use by train (pid ")
    assert (tmp_path / "wd" / "results.json").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    workdir = tmp_path / "wd"
    p = _start("train", TRAIN, workdir)
    deadline = time.monotonic() + 120
    while not (workdir / "checkpoints").exists():  # past the lock, training
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    assert json.loads((workdir / wd.LOCK_NAME).read_text())["pid"] == p.pid
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    rc, out, err = _finish(_start("train", TRAIN, workdir))
    assert rc == 0, err[-2000:]
    assert "test_accuracy" in out


def test_export_and_the_library_refuse_a_held_workdir(tmp_path):

    workdir = tmp_path / "wd"
    with wd.hold(workdir, "train"):
        rc, _, err = _finish(_start("export", [], workdir))
        assert rc == 2
        assert "is in use by train (pid" in err.strip().splitlines()[-1]
        config = digits.get_config()
        with pytest.raises(wd.WorkdirInUse, match="is in use by train"):
            train.train_and_evaluate(config, workdir)
    assert not (workdir / "config.json").exists()  # the refused run wrote nothing
    fd, holder = wd.try_lock(workdir, "sweep")  # released at the end of the block
    assert fd is not None and holder == ""
    wd.release(fd)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"coordinator_address": "127.0.0.1:1234"}, "give all three"),
        (
            {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2},
            "process_id=2 is not allowed: use 0..1",
        ),
        (
            {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0, "timeout": 0},
            "distributed_timeout=0 is not allowed",
        ),
    ],
)
def test_bad_multiprocess_setup_is_one_line(kwargs, message, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=message):
        multihost.initialize(**kwargs)


def test_one_process_needs_no_setup(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert multihost.initialize() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert multihost.cluster_detected()
