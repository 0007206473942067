r"""Trains one qsparse experiment from a config file.

  python -m experiments.train --config=configs/default.py --workdir=runs/default \
      [--config.quant.w_bits=3 ...] [--overwrite]

Phases: train with quantization and the block-lasso prox, gradual cubic pruning to the target
compression, fine-tuning with frozen masks. Each epoch is one jitted ``lax.scan`` over
device-resident data, or for a model with convolutions on a CPU a host loop of one jitted
step (``--loop``; ``qsparse.training.make_epoch_runner``). Rerunning the same command
resumes from the latest checkpoint.
Writes DIR/config.json, DIR/checkpoints/, TensorBoard events in DIR, DIR/results.json; holds
DIR/.lock meanwhile, so a second run on DIR stops at once (``experiments.workdir``).

With several devices, or several processes (``--coordinator_address``, ``--num_processes``,
``--process_id``; ``experiments.multihost``), the run is data-parallel: each batch is split
along the mesh axis ``"data"`` over every device of every process, each device gathering its
own rows; parameters, masks and quantizer state are replicated and the compiled step reduces
the gradients. Process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
    """Defines the CLI flags (only when run as a program, so modules can share flag names)."""
    from experiments import multihost

    multihost.define_flags()
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
    flags.DEFINE_bool("overwrite", False, "Replace a workdir that holds a run of another config.")
    flags.DEFINE_enum(
        "loop",
        "auto",
        ["auto", "scan", "steps"],
        "How an epoch runs: auto = one scanned program, or for a model with convolutions on"
        " a CPU a host loop of one jitted step.",
    )


def train_and_evaluate(
    config,
    workdir,
    *,
    overwrite: bool = False,
    loop: str = "auto",
    dataset=None,
):
    """Runs (or resumes) one training run and writes results.json.

    Args:
      config: the experiment config (validated here before anything is computed).
      workdir: run directory.
      overwrite: replace a workdir of another config.
      loop: ``"auto"``, ``"scan"`` or ``"steps"``: the form of each epoch
        (``qsparse.training.pick_loop``).
      dataset: the config's data set, already loaded (else loaded here; ``scripts/bench.py``
        passes a cut one).

    Returns:
      The results dict (also written to ``workdir/results.json``).
    """
    from experiments import common, multihost
    from qsparse import training

    workdir = Path(workdir)
    common.validate(config)
    if loop not in training.LOOPS:
        raise ValueError(f"loop={loop!r} is not allowed: use one of {training.LOOPS}")
    ds = common.load_data(config) if dataset is None else dataset
    run = common.build_run(config, ds)  # validates the batch size and the block shapes
    with multihost.hold_workdir(workdir, "train"):
        if multihost.is_primary():
            common.guard_workdir(workdir, config, overwrite)
        multihost.barrier("train: workdir ready")
        return _train(run, ds, workdir, loop)


def _train(run, ds, workdir: Path, loop: str) -> dict:
    """Trains (or resumes) a run in its claimed workdir; see :func:`train_and_evaluate`."""
    import jax

    from experiments import common, epochs, multihost
    from qsparse import training

    config = run.config
    mesh = data_mesh(config.batch_size)
    spec = common.make_spec(run)
    teacher = _teacher_logits(config, ds) if config.distill.weight > 0 else None
    dev, spec, state = placed(mesh, ds, spec, common.init_state(run, spec, config.seed))
    mgr = common.checkpoint_manager(workdir / "checkpoints", config.keep_checkpoints)
    state, progress = _resume(mgr, state)
    # A jitted scanned epoch, or a host loop of jitted steps; the state passed in is donated.
    epoch_fn = training.make_epoch_runner(
        run.model,
        run.plan,
        run.sched,
        config.batch_size,
        loop=loop,
        batch_sharding=None if mesh is None else _data_sharding(mesh),
    )
    eval_fn = jax.jit(training.make_eval(run.model, run.plan, config.eval_batch_size))
    writer = common.make_writer(workdir) if multihost.is_primary() else common.NullWriter()
    if progress.epoch == 0:
        writer.write_hparams(json.loads(common.config_json(config)))
    try:
        state = epochs.run_epochs(
            state,
            spec,
            dev,
            epoch_fn=functools.partial(epoch_fn, teacher=teacher),
            eval_fn=eval_fn,
            keys=lambda epoch: common.epoch_key(config.seed, epoch),
            start=progress.epoch,
            config=config,
            mgr=mgr,
            on_epoch=functools.partial(_log_epoch, run, writer, progress),
            meta=progress.meta,
            recalibrate=_recalibrator(run, spec, dev, state),
        )
    finally:
        writer.flush()
    ev = epochs.evaluate(eval_fn, state, spec, dev)
    results = _results(run, jax.device_get(state), jax.device_get(spec), ev, progress)
    if multihost.is_primary():
        common.write_json(workdir / "results.json", results)
    return results


def _recalibrator(run, spec, dev, state):
    """``config.recalibrate_batches`` as ``run_epochs``' ``recalibrate``, or ``None`` (0).

    Raises:
      ConfigError: the model has no batch statistics to recompute.
    """
    import jax

    from experiments import common
    from qsparse import data as qdata
    from qsparse import training

    config = run.config
    if not config.recalibrate_batches:
        return None
    if not state.model_state:
        raise common.ConfigError(
            f"recalibrate_batches={config.recalibrate_batches} is not allowed: model"
            f" {config.model.name!r} has no batch statistics (use 0)"
        )
    fn = training.make_recalibrate(run.model, run.plan)
    size, n = config.batch_size, config.recalibrate_batches

    def recalibrate(state, epoch):
        # A fixed draw of training batches per epoch (the training order's key, folded).
        key = jax.random.fold_in(common.epoch_key(config.seed, epoch), 1)
        idx = jax.random.permutation(key, dev["train_x"].shape[0])[: n * size].reshape(n, size)
        batches = [qdata.normalize(dev["train_x"][i]) for i in idx]
        return state._replace(model_state=fn(state.params, spec, state.model_state, batches))

    return recalibrate


def data_mesh(batch_size: int):
    """The ``"data"`` mesh over every device of every process, or ``None`` with one device.

    Raises:
      ValueError: the batch does not split evenly over the devices.
    """
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.devices()
    if len(devices) == 1:
        return None
    if batch_size % len(devices):
        raise ValueError(
            f"batch_size={batch_size} is not allowed on {len(devices)} devices: use a multiple"
            f" of {len(devices)}"
        )
    return Mesh(np.array(devices), ("data",))


def _data_sharding(mesh):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(mesh, P("data"))


def placed(mesh, ds, spec, state):
    """The data, spec and state on the devices: replicated on ``mesh`` (every process puts
    its own copy), or on the default device without one."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from experiments import multihost
    from qsparse import data as qdata

    if mesh is None:
        return qdata.to_device(ds), spec, state
    replicated = NamedSharding(mesh, P())
    host = jax.device_get((spec, state))
    return (qdata.to_device(ds, replicated), *multihost.put(host, replicated))


@dataclasses.dataclass
class _Progress:
    """What a run has done so far: saved with each checkpoint (:meth:`meta`), or this
    process's own epoch times (``times``, for the ETA)."""

    epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    times: list = dataclasses.field(default_factory=list)

    def meta(self, epochs_done: int) -> dict:
        return {"epoch": epochs_done, "history": self.history, "train_seconds": self.train_seconds}


def _resume(mgr, state):
    """The latest checkpoint's state and progress, or ``state`` and a fresh start."""
    from experiments import common

    restored = common.restore_checkpoint(mgr, state, log=logging.warning)
    if restored is None:
        return state, _Progress()
    step, state, meta = restored
    progress = _Progress(
        epoch=int(meta["epoch"]),
        history=list(meta.get("history", [])),
        train_seconds=float(meta.get("train_seconds", 0.0)),
    )
    logging.info("resumed from checkpoint at step %d (epoch %d)", step, progress.epoch)
    print(f"resumed from step {step} (epoch {progress.epoch})", flush=True)
    return state, progress


def _log_epoch(run, writer, progress: _Progress, e) -> None:
    """Records a finished epoch: its history row, TensorBoard scalars and the epoch line."""
    import jax

    from experiments import common
    from qsparse import training

    config, total = run.config, run.config.num_epochs
    progress.train_seconds += e.seconds
    progress.times.append(e.seconds)
    times = progress.times
    # The first epoch of a process includes compilation; estimate from the later ones.
    typical = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else e.seconds
    rate = run.steps_per_epoch / e.seconds
    eta = (total - e.index - 1) * typical
    # The block compression reached so far (the gradual schedule's target at this step).
    comp = float(
        training.optim.compression_schedule(
            e.step, config.sparsity.compression, run.sched.prune_begin, run.sched.prune_end
        )
    )
    row = {
        "epoch": e.index + 1,
        "step": e.step,
        "train_loss": float(e.train["loss"]),
        "train_accuracy": float(e.train["accuracy"]),
        "test_accuracy": float(e.test["accuracy"]),
        "test_loss": float(e.test["loss"]),
        "block_compression_now": comp if run.plan.block_shapes() else 1.0,
        "steps_per_second": rate,
    }
    if "accuracy_moving_averages" in e.test:  # batch statistics re-estimated
        row["test_accuracy_moving_averages"] = float(e.test["accuracy_moving_averages"])
    progress.history.append(row)
    writer.write_scalars(e.step, {k: v for k, v in row.items() if k not in ("epoch", "step")})
    writer.write_scalars(e.step, {"eta_seconds": eta})
    if jax.process_index():  # one process prints the run's progress
        return
    print(
        f"epoch {e.index + 1}/{total} step {e.step} loss {row['train_loss']:.4f} "
        f"train_acc {row['train_accuracy']:.4f} test_acc {row['test_accuracy']:.4f} "
        + (
            f"(moving averages {row['test_accuracy_moving_averages']:.4f}) "
            if "test_accuracy_moving_averages" in row
            else ""
        )
        + f"blocks {row['block_compression_now']:.2f}x {rate:.0f} steps/s "
        f"ETA {common.fmt_time(eta)}",
        flush=True,
    )
    if not bool(e.train["all_finite"]):
        print(f"warning: loss became non-finite at step {int(e.train['first_nonfinite_step'])}")


def _results(run, state, spec, ev, progress: _Progress) -> dict:
    """The results dict of a finished run (``workdir/results.json``)."""
    from experiments import common

    config = run.config
    results = common.result_metrics(run, state, spec, float(ev["accuracy"]))
    last = progress.history[-1] if progress.history else {}
    if "test_accuracy_moving_averages" in last:  # the last epoch's, before re-estimation
        results["test_accuracy_moving_averages"] = common.readable(
            last["test_accuracy_moving_averages"]
        )
    steps = int(state.step)
    seconds = progress.train_seconds
    results.update(
        {
            "steps": steps,
            "train_seconds": round(seconds, 1),
            "examples_per_second": round(steps * config.batch_size / max(seconds, 1e-9)),
            "history": [common.readable_row(h) for h in progress.history],
            "config": json.loads(common.config_json(config)),
        }
    )
    return results


def _teacher_logits(config, ds):
    """Logits of the teacher run (config.distill.teacher_workdir) on the training images."""
    import jax
    import jax.numpy as jnp

    from experiments import common
    from qsparse import training

    run, spec, state, _ = common.restore_run(config.distill.teacher_workdir)
    fn = jax.jit(
        lambda x: training.logits_fn(run.model, run.plan, state.params, spec, x, state.model_state)
    )
    out = [
        fn(jnp.asarray(ds.train_x[i : i + 5000], jnp.float32) / 255.0)
        for i in range(0, len(ds.train_x), 5000)
    ]
    return jnp.concatenate(out)


def summary_line(r: dict) -> str:
    """One line with the headline numbers of a results dict."""
    return (
        f"test_accuracy {r['test_accuracy']:.4f} | w{r['w_bits']:g}/a{r['a_bits']:g} "
        f"blocks {r['block_compression']:g}x (achieved block sparsity {r['block_sparsity']:.3f})"
        f" | weight memory {r['weight_memory_bits'] / 8 / 1024:.1f} KiB vs FP32 "
        f"{r['fp32_weight_memory_bits'] / 8 / 1024:.1f} KiB = {r['weight_compression']:.1f}x | "
        f"peak activations {r['peak_activation_bits'] / 8 / 1024:.2f} KiB | "
        f"{r['train_seconds']:.0f}s"
    )


def main(argv):
    del argv
    from experiments import common, multihost
    from experiments import workdir as workdir_lock

    common.cli_start(FLAGS)
    multihost.initialize_from_flags(FLAGS)
    try:
        results = train_and_evaluate(
            FLAGS.config,
            FLAGS.workdir,
            overwrite=FLAGS.overwrite,
            loop=FLAGS.loop,
        )
    except multihost.ProcessLost as e:
        multihost.exit_lost(e)
    except (common.ConfigError, FileNotFoundError, ValueError, workdir_lock.WorkdirInUse) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if multihost.is_primary():
        print(summary_line(results), flush=True)


if __name__ == "__main__":
    from experiments.common import parse_flags

    define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=functools.partial(parse_flags, cli="train"))
