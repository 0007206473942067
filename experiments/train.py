r"""Trains one qsparse experiment from a config file.

  python -m experiments.train --config=configs/default.py --workdir=runs/default \
      [--config.quant.w_bits=3 ...] [--overwrite]

Phases: train with quantization and the block-lasso prox, gradual cubic pruning to the target
compression, fine-tuning with frozen masks. Each epoch is one jitted ``lax.scan`` over
device-resident data, or for a model with convolutions on a CPU a host loop of one jitted
step (``--loop``; ``qsparse.training.make_epoch_runner``). Rerunning the same command
resumes from the latest checkpoint.
Writes DIR/config.json, DIR/checkpoints/, TensorBoard events in DIR, DIR/results.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
    """Defines the CLI flags (only when run as a program, so modules can share flag names)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
    flags.DEFINE_bool("overwrite", False, "Replace a workdir that holds a run of another config.")
    flags.DEFINE_integer(
        "stop_after_epochs", 0, "Stop after this many epochs of this invocation (for tests)."
    )
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
    stop_after_epochs: int = 0,
    loop: str = "auto",
    dataset=None,
):
    """Runs (or resumes) one training run and writes results.json.

    Args:
      config: the experiment config (validated here before anything is computed).
      workdir: run directory.
      overwrite: replace a workdir of another config.
      stop_after_epochs: for tests: return after this many epochs of this call (0 = run all).
      loop: ``"auto"``, ``"scan"`` or ``"steps"``: the form of each epoch
        (``qsparse.training.pick_loop``).
      dataset: the config's data set, already loaded (else loaded here; ``scripts/bench.py``
        passes a cut one).

    Returns:
      The results dict (also written to ``workdir/results.json``), or None when stopped early.
    """
    import jax
    import jax.numpy as jnp

    from experiments import common
    from qsparse import data as qdata
    from qsparse import training

    workdir = Path(workdir)
    common.validate(config)
    if loop not in training.LOOPS:
        raise ValueError(f"loop={loop!r} is not allowed: use one of {training.LOOPS}")
    ds = common.load_data(config) if dataset is None else dataset
    run = common.build_run(config, ds)  # validates the batch size and the block shapes
    common.guard_workdir(workdir, config, overwrite)

    spec = common.make_spec(run)
    state = common.init_state(run, spec, config.seed)
    teacher = _teacher_logits(config, ds) if config.distill.weight > 0 else None
    dev = qdata.to_device(ds)
    mgr = common.checkpoint_manager(workdir / "checkpoints", config.keep_checkpoints)
    history, start_epoch, train_seconds = [], 0, 0.0
    restored = common.restore_checkpoint(mgr, state, log=logging.warning)
    if restored is not None:
        step, state, meta = restored
        start_epoch = int(meta["epoch"])
        history = list(meta.get("history", []))
        train_seconds = float(meta.get("train_seconds", 0.0))
        logging.info("resumed from checkpoint at step %d (epoch %d)", step, start_epoch)
        print(f"resumed from step {step} (epoch {start_epoch})", flush=True)

    # A jitted scanned epoch, or a host loop of jitted steps; the state passed in is donated.
    epoch_fn = training.make_epoch_runner(
        run.model, run.plan, run.sched, config.batch_size, loop=loop
    )
    eval_fn = jax.jit(training.make_eval(run.model, run.plan, config.eval_batch_size))
    writer = common.make_writer(workdir)
    if start_epoch == 0:
        writer.write_hparams(json.loads(common.config_json(config)))

    total = config.num_epochs
    done_now, times = 0, []
    for epoch in range(start_epoch, total):
        t0 = time.perf_counter()
        key = common.epoch_key(config.seed, epoch)
        state, m = epoch_fn(state, dev["train_x"], dev["train_y"], key, spec, teacher)
        ev = eval_fn(state.params, spec, dev["test_x"], dev["test_y"], state.model_state)
        m, ev = jax.device_get((m, ev))
        dt = time.perf_counter() - t0
        train_seconds += dt
        step = int(state.step)
        times.append(dt)
        # The first epoch of a process includes compilation; estimate from the later ones.
        typical = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else dt
        rate = run.steps_per_epoch / dt
        eta = (total - epoch - 1) * typical
        comp = float(
            training.optim.compression_schedule(
                step, config.sparsity.compression, run.sched.prune_begin, run.sched.prune_end
            )
        )
        row = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(m["loss"]),
            "train_accuracy": float(m["accuracy"]),
            "test_accuracy": float(ev["accuracy"]),
            "test_loss": float(ev["loss"]),
            "compression_now": comp if run.plan.block_shapes() else 1.0,
            "steps_per_second": rate,
        }
        history.append(row)
        writer.write_scalars(step, {k: v for k, v in row.items() if k not in ("epoch", "step")})
        writer.write_scalars(step, {"eta_seconds": eta})
        print(
            f"epoch {epoch + 1}/{total} step {step} loss {row['train_loss']:.4f} "
            f"train_acc {row['train_accuracy']:.4f} test_acc {row['test_accuracy']:.4f} "
            f"compression {row['compression_now']:.2f}x {rate:.0f} steps/s "
            f"ETA {common.fmt_time(eta)}",
            flush=True,
        )
        if not bool(m["all_finite"]):
            print(f"warning: loss became non-finite at step {int(m['first_nonfinite_step'])}")
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == total:
            meta = {"epoch": epoch + 1, "history": history, "train_seconds": train_seconds}
            common.save_checkpoint(mgr, step, state, meta)
        done_now += 1
        if stop_after_epochs and done_now >= stop_after_epochs and epoch + 1 < total:
            writer.flush()
            return None
    writer.flush()

    ev = jax.device_get(
        eval_fn(state.params, spec, dev["test_x"], dev["test_y"], state.model_state)
    )
    results = common.result_metrics(run, state, spec, float(ev["accuracy"]))
    steps = int(state.step)
    results.update(
        {
            "steps": steps,
            "train_seconds": train_seconds,
            "examples_per_second": steps * config.batch_size / max(train_seconds, 1e-9),
            "history": history,
            "config": json.loads(common.config_json(config)),
        }
    )
    tmp = workdir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, workdir / "results.json")
    del jnp
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
        f"{r['compression']:g}x blocks (achieved block sparsity {r['block_sparsity']:.3f}) | "
        f"weight memory {r['weight_memory_bits'] / 8 / 1024:.1f} KiB vs FP32 "
        f"{r['fp32_weight_memory_bits'] / 8 / 1024:.1f} KiB = {r['weight_compression']:.1f}x | "
        f"activations {r['activation_memory_bits'] / 8 / 1024:.2f} KiB | "
        f"{r['train_seconds']:.0f}s"
    )


def main(argv):
    del argv
    from experiments import common

    common.cli_start(FLAGS)
    try:
        results = train_and_evaluate(
            FLAGS.config,
            FLAGS.workdir,
            overwrite=FLAGS.overwrite,
            stop_after_epochs=FLAGS.stop_after_epochs,
            loop=FLAGS.loop,
        )
    except (common.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if results is not None:
        print(summary_line(results), flush=True)


if __name__ == "__main__":
    from experiments.common import parse_flags

    define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
