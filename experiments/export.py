r"""Exports a trained run to qsparse's bit-packed model file and checks it.

  python -m experiments.export --workdir=runs/joint --output=runs/joint/model.qsp
  python -m experiments.export --check=runs/joint/model.qsp --workdir=runs/joint
  python -m experiments.export --workdir=runs/smoke --setting=3   # one design of a sweep

A sweep's workdir holds every design's weights stacked per chunk: ``--setting N`` (the
``setting`` column of its results.csv) exports design N, by default to
WORKDIR/setting_N.qsp.

Prints the payload (codes + index + scales + biases) next to the memory model's
weight_memory_bits / 8, the file size, the compression against FP32, then loads the file back,
runs inference from the packed form on the whole test set and compares it with the trained
model (max |logit difference| and accuracy). The manifest's ``meta`` records the data set, its
test split, how its images are uint8 and become inputs, and the test accuracy measured at export
(docs/FORMAT.md sections 2 and 12). The format is specified in docs/FORMAT.md.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags():
    """Defines the CLI flags (only when run as a program, so modules can share flag names)."""
    flags.DEFINE_string(
        "workdir", None, "A training run's directory (config.json, checkpoints/), or a sweep's."
    )
    flags.DEFINE_string(
        "output",
        None,
        "The packed model file (default WORKDIR/model.qsp, or WORKDIR/setting_N.qsp).",
    )
    flags.DEFINE_string("check", None, "Only load and evaluate this packed file (with --workdir).")
    flags.DEFINE_integer(
        "setting",
        None,
        "For a sweep's workdir: the design to export (the setting column of results.csv).",
    )


# How each data set's images are uint8 and which examples are the test split (docs/FORMAT.md
# section 12); the digits split is also listed index by index (``test_indices``).
_SOURCES = {
    "digits": (
        "scikit-learn load_digits(): 8x8 pixel counts v in 0..16 -> u8 = round(v * 255 / 16), "
        "float64, ties to even (qsparse.data)",
        "360 of load_digits()'s 1797 images, stratified by class (qsparse.data, seed 0); "
        "test_indices lists them (indices into load_digits() order, increasing)",
    ),
    "mnist": ("the IDX files' uint8 pixels as stored", "the t10k test files (10000 images)"),
    "fashion_mnist": (
        "the IDX files' uint8 pixels as stored",
        "the t10k test files (10000 images)",
    ),
    "kmnist": ("the IDX files' uint8 pixels as stored", "the t10k test files (10000 images)"),
    "cifar10": ("TFDS cifar10 uint8 pixels as stored", "TFDS cifar10 'test' (10000 images)"),
    "synthetic": (
        "qsparse.data synthetic images, generated uint8",
        "the generated test images (qsparse.data.load('synthetic'), seed 0)",
    ),
    "synthetic_cifar10": (
        "qsparse.data synthetic 32x32x3 images, generated uint8",
        "the generated test images (qsparse.data.load('synthetic_cifar10'), seed 0)",
    ),
}
INPUT_CONVERSION = "x = float32(u8) * float32(1/255), as qsparse.data.normalize computes it"


def digits_test_indices(ds) -> list[int] | None:
    """The digits test split as indices into scikit-learn's ``load_digits()`` order.

    Args:
      ds: the loaded digits :class:`qsparse.data.Dataset`.

    Returns:
      The increasing indices, or None when they do not give back ``ds.test_x`` / ``test_y``.
    """
    import numpy as np
    from sklearn.datasets import load_digits

    from qsparse import data as qdata

    digits = load_digits()
    y = digits.target
    # qsparse.data.load("digits") splits with its default seed 0 (experiments.common.load_data).
    idx = qdata._stratified_test_indices(y, n_test=len(ds.test_y), seed=0)
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    if np.array_equal(images[idx], ds.test_x) and np.array_equal(y[idx], ds.test_y):
        return [int(i) for i in idx]
    return None


def export_meta(workdir, dataset: str, ds, test_accuracy: float, results: dict) -> dict:
    """The manifest's ``meta``: the run, the data set, its test split and the accuracy.

    Args:
      workdir: the run directory.
      dataset: the data set's name (the config's ``dataset``).
      ds: the loaded :class:`qsparse.data.Dataset`.
      test_accuracy: the trained model's accuracy on the test split, measured at export.
      results: the run's results.json content ({} when absent).

    Returns:
      JSON-serialisable dict.
    """
    uint8, split = _SOURCES.get(dataset, ("", ""))
    meta = {
        "workdir": str(workdir),
        "dataset": dataset,
        "split": "test",
        "split_rule": split,
        "test_examples": int(len(ds.test_y)),
        "input_shape": [int(d) for d in ds.input_shape],
        "uint8_source": uint8,
        "input_conversion": INPUT_CONVERSION,
        "test_accuracy": float(test_accuracy),
    }
    if "test_accuracy" in results:
        meta["results_test_accuracy"] = float(results["test_accuracy"])
    if dataset == "digits":
        indices = digits_test_indices(ds)
        if indices is not None:
            meta["test_indices"] = indices
    return meta


def is_sweep(workdir) -> bool:
    """Whether ``workdir`` holds a sweep (its config.json has a ``sweep`` block)."""
    import json

    path = Path(workdir) / "config.json"
    return path.exists() and "sweep" in json.loads(path.read_text())


def open_design(workdir, setting: int | None = None):
    """The trained model of a training run, or of one design of a sweep.

    Args:
      workdir: a training run's or a sweep's directory.
      setting: for a sweep, the design (the ``setting`` column of its results.csv); None for
        a training run.

    Returns:
      ``(run, spec, state, results)``: ``results`` is the run's results.json content, or the
      design's results.csv row ({} when absent).

    Raises:
      common.ConfigError: a sweep without ``setting``, a setting out of range, or
        ``setting`` for a training run.
      FileNotFoundError: not a qsparse workdir, or no checkpoint.
    """
    from experiments import common, sweep

    if not is_sweep(workdir):
        if setting is not None:
            raise common.ConfigError(
                f"--setting={setting}: workdir={str(workdir)!r} is a training run, not a sweep; "
                "leave --setting out"
            )
        return common.restore_run(workdir)
    n = len(sweep.enumerate_settings(sweep.read_config(workdir)))
    if setting is None:
        raise common.ConfigError(
            f"workdir={str(workdir)!r} is a sweep of {n} settings: pass --setting=N "
            f"(0..{n - 1}, the setting column of its results.csv) to export one design"
        )
    if not 0 <= setting < n:
        raise common.ConfigError(
            f"--setting={setting} is not allowed: workdir={str(workdir)!r} is a sweep of {n} "
            f"settings, use 0..{n - 1}"
        )
    run, spec, state = sweep.load_setting(workdir, setting)
    results = {}
    csv_path = Path(workdir) / "results.csv"
    if csv_path.exists():
        results = next((r for r in sweep.read_results(csv_path) if r["setting"] == setting), {})
    return run, spec, state, results


def default_output(workdir, setting: int | None = None) -> Path:
    """WORKDIR/model.qsp for a training run, WORKDIR/setting_N.qsp for design N of a sweep."""
    return Path(workdir) / ("model.qsp" if setting is None else f"setting_{setting}.qsp")


def export_run(workdir, output, setting: int | None = None) -> dict:
    """Writes the packed model of a run (or of one design of a sweep) and verifies it against
    the trained model.

    Args:
      workdir: the run directory, or a sweep's.
      output: the file to write.
      setting: for a sweep's workdir, the design to export (see :func:`open_design`).

    Returns:
      dict with the sizes, compression, accuracies, the max logit difference and the
      manifest's ``meta``.

    Raises:
      experiments.workdir.WorkdirInUse: ``output`` is inside ``workdir`` and a live run holds
        it.
    """
    from experiments import workdir as workdir_lock

    inside = Path(workdir).is_dir() and Path(workdir).resolve() in Path(output).resolve().parents
    # Writing into a run's workdir: not while a live run holds it.
    with workdir_lock.hold(workdir, "export") if inside else contextlib.nullcontext():
        return _export(workdir, output, setting)


def _in_batches(fn, x):
    """``fn`` over ``x`` in batches of 1000, concatenated on the host."""
    import numpy as np

    return np.concatenate([np.asarray(fn(x[i : i + 1000])) for i in range(0, len(x), 1000)])


def packed_logits(packed, run, x):
    """Logits of a packed file on normalized inputs ``x``, in batches of 1000.

    Args:
      packed: the loaded file (:func:`qsparse.export.load`).
      run: the run it was exported from (its model and plan run a file without a graph).
      x: normalized inputs.

    Returns:
      The logits as a numpy array.
    """
    import jax
    import numpy as np

    from qsparse import export

    if packed.graph is not None:
        return np.asarray(packed.predict(x, batch_size=1000))
    # Model layout: the variables go back through the run's own model.
    r = export.restore(packed)
    fn = jax.jit(
        lambda xb: run.plan.apply(
            run.model, r.params, r.qparams, r.spec, xb, state=r.model_state, quantized=True
        )
    )
    return _in_batches(fn, x)


def _export(workdir, output, setting: int | None) -> dict:
    """:func:`export_run` once the workdir is claimed."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qsparse import data as qdata
    from qsparse import export, training

    run, spec, state, results = open_design(workdir, setting)
    ds = run.dataset
    x = qdata.normalize(jnp.asarray(ds.test_x))
    fn = jax.jit(
        lambda xb: training.logits_fn(
            run.model, run.plan, state.params, spec, xb, state.model_state
        )
    )
    ref = _in_batches(fn, x)
    trained_accuracy = float(np.mean(ref.argmax(-1) == ds.test_y))
    meta = export_meta(workdir, run.config.dataset, ds, trained_accuracy, results)
    if setting is not None:
        meta["setting"] = int(setting)
    info = export.save(
        output,
        run.plan,
        state.params,
        spec["layers"],
        model=run.model,
        model_state=state.model_state,
        input_shape=ds.input_shape,
        meta=meta,
    )
    got = packed_logits(export.load(output), run, np.asarray(x))
    return {
        **info,
        "meta": meta,
        "trained_accuracy": trained_accuracy,
        "packed_accuracy": float(np.mean(got.argmax(-1) == ds.test_y)),
        "max_abs_logit_diff": float(np.max(np.abs(got - ref))),
        "same_predictions": bool(np.array_equal(got.argmax(-1), ref.argmax(-1))),
    }


def main(argv):
    del argv
    import numpy as np

    from experiments import common
    from experiments import workdir as workdir_lock
    from qsparse import data as qdata
    from qsparse import export

    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)
    try:
        if FLAGS.workdir is None:
            raise common.ConfigError("--workdir is required: the training run to export")
        if FLAGS.check:
            run = open_design(FLAGS.workdir, FLAGS.setting)[0]
            packed = export.load(FLAGS.check)
            x = np.asarray(qdata.normalize(run.dataset.test_x))
            acc = float(np.mean(packed_logits(packed, run, x).argmax(-1) == run.dataset.test_y))
            recorded = packed.manifest.get("meta", {}).get("test_accuracy")
            note = "" if recorded is None else f" (recorded at export {recorded:.4f})"
            print(f"{FLAGS.check}: {packed.file_bytes} bytes, test accuracy {acc:.4f}{note}")
            return
        output = Path(FLAGS.output or default_output(FLAGS.workdir, FLAGS.setting))
        r = export_run(FLAGS.workdir, output, FLAGS.setting)
    except (
        common.ConfigError,
        FileNotFoundError,
        export.FormatError,
        ValueError,
        workdir_lock.WorkdirInUse,
    ) as e:
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
