r"""Exports a trained run to qsparse's bit-packed model file and checks it.

  python -m experiments.export --workdir=runs/joint --output=runs/joint/model.qsp
  python -m experiments.export --check=runs/joint/model.qsp --workdir=runs/joint

Prints the payload (codes + index + scales + biases) next to the memory model's
weight_memory_bits / 8, the file size, the compression against FP32, then loads the file back,
runs inference from the packed form on the whole test set and compares it with the trained
model (max |logit difference| and accuracy). The format is specified in docs/FORMAT.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags():
    """Defines the CLI flags (only when run as a program, so modules can share flag names)."""
    flags.DEFINE_string("workdir", None, "A training run's directory (config.json, checkpoints/).")
    flags.DEFINE_string("output", None, "The packed model file (default WORKDIR/model.qsp).")
    flags.DEFINE_string("check", None, "Only load and evaluate this packed file (with --workdir).")


def export_run(workdir, output) -> dict:
    """Writes the packed model of a run and verifies it against the trained model.

    Args:
      workdir: the run directory.
      output: the file to write.

    Returns:
      dict with the sizes, compression, accuracies and the max logit difference.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import common
    from qsparse import export, training

    run, spec, state, _ = common.restore_run(workdir)
    ds = run.dataset
    info = export.save(
        output,
        run.plan,
        state.params,
        spec["layers"],
        model=run.model,
        input_shape=ds.input_shape,
        meta={"workdir": str(workdir), "dataset": run.config.dataset},
    )
    packed = export.load(output)
    x = jnp.asarray(ds.test_x, jnp.float32) / 255.0
    fn = jax.jit(lambda xb: training.logits_fn(run.model, run.plan, state.params, spec, xb))
    ref = np.concatenate([np.asarray(fn(x[i : i + 1000])) for i in range(0, len(x), 1000)])
    got = np.asarray(packed.predict(np.asarray(x), batch_size=1000))
    return {
        **info,
        "trained_accuracy": float(np.mean(ref.argmax(-1) == ds.test_y)),
        "packed_accuracy": float(np.mean(got.argmax(-1) == ds.test_y)),
        "max_abs_logit_diff": float(np.max(np.abs(got - ref))),
        "same_predictions": bool(np.array_equal(got.argmax(-1), ref.argmax(-1))),
    }


def main(argv):
    del argv
    from experiments import common
    from qsparse import export

    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)
    try:
        if FLAGS.workdir is None:
            raise common.ConfigError("--workdir is required: the training run to export")
        if FLAGS.check:
            run = common.build_run(common.restore_run(FLAGS.workdir)[0].config)
            packed = export.load(FLAGS.check)
            acc = packed.accuracy(run.dataset.test_x, run.dataset.test_y)
            print(f"{FLAGS.check}: {packed.file_bytes} bytes, test accuracy {acc:.4f}")
            return
        output = Path(FLAGS.output or Path(FLAGS.workdir) / "model.qsp")
        r = export_run(FLAGS.workdir, output)
    except (common.ConfigError, FileNotFoundError, export.FormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    mm = r["weight_memory_bits"] / 8
    print(f"wrote {output}")
    print(
        f"payload {r['payload_bytes']} bytes | memory model weight_memory_bits/8 = {mm:.1f} bytes"
        f" ({100 * (r['payload_bytes'] - mm) / mm:+.3f}%) | file {r['file_bytes']} bytes "
        f"(header+manifest {r['header_bytes']})"
    )
    print(
        f"FP32 dense {r['fp32_bytes']} bytes | compression: payload {r['compression']:.1f}x, "
        f"whole file {r['file_compression']:.1f}x"
    )
    print(
        f"packed inference: accuracy {r['packed_accuracy']:.4f} "
        f"(trained {r['trained_accuracy']:.4f}), max |logit diff| "
        f"{r['max_abs_logit_diff']:.2e}, same predictions: {r['same_predictions']}"
    )


if __name__ == "__main__":
    from experiments.common import parse_flags

    define_flags()
    app.run(main, flags_parser=parse_flags)
