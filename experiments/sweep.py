r"""Trains a grid of qsparse settings, a chunk of settings per compiled program, and reports
the Pareto-optimal designs.

  python -m experiments.sweep --config=configs/sweep_digits_smoke.py --workdir=runs/smoke \
      [--config.sweep.w_bits='(2, 4)' --config.sweep.chunk_size=8 ...] [--overwrite]

A sweep config is an experiment config (``configs/base.py`` fields) plus a ``sweep`` block of
grids: ``w_bits``, ``a_bits``, ``compression``, ``seeds`` (and optionally ``learning_rate``,
``prox_strength``), and ``models``: model variants (``name``, ``hidden``, optionally ``arch``,
``channels`` and their own ``w_bits`` / ``a_bits`` / ``compression`` lists). Every setting is
one point of the product of the grids. (Write the grids as tuples: the command line can
override tuples, not lists.)

Settings are data: settings with the same model shape differ only in the values of their
spec, so their specs and train states are stacked on a leading axis and one compiled epoch
(``jax.vmap`` of :func:`qsparse.training.make_train_epoch`) trains a whole chunk of them. Large
groups run in chunks of ``sweep.chunk_size`` (the last chunk padded by repeating a setting,
so every chunk of a shape has the same shape and reuses the one compilation). The setting
axis is split over the devices of every process (``Mesh`` axis ``"settings"``,
:func:`qsparse.training.over_settings`: each device runs its own settings, so no step waits
on another device); the data is replicated. Several processes (``experiments.multihost``)
meet only at each epoch's end and its checkpoints; process 0 writes the files. A model with
convolutions on a CPU runs its chunk's epoch as a host loop over one compiled step of every
setting instead (``--loop``, :func:`make_program`): XLA:CPU runs a training step's
convolutions far slower inside a loop body (jax-ml/jax#12868).

Each setting starts from what ``experiments.train`` would use for it alone (the same
``common.make_spec``, ``common.init_state`` with its seed, ``common.epoch_key`` per epoch) and
shares its schedule (epochs, phase boundaries) with the rest of the sweep.

``sweep.vectorize`` picks how a device's settings are batched: ``"vmap"`` (default)
vectorises them (batched matmuls; what pays on accelerators), ``"map"`` runs them one
after another inside each device's program (``lax.map``), which gives
bit-for-bit the numbers of separate ``experiments.train`` runs. Why both: XLA sums a batched
reduction in another order than an unbatched one, so under ``vmap`` the gradients differ from a
lone run's in the last bit; a k-bit quantizer turns such a difference into a different code
when a value sits on a rounding boundary, and low-bit (e.g. 2-bit weights and activations)
trajectories then drift apart like runs of different seeds. Float settings agree to float
tolerance either way. The host loop of steps (a model with convolutions on a CPU) under
``"map"`` puts the settings' steps side by side in one program, where XLA may fuse them into
another order of float sums than a lone step's: its low-bit settings agree with lone runs as
runs of different seeds do, its float settings to float tolerance.

Writes DIR/config.json, DIR/chunks.json (which settings train together), DIR/checkpoints/
chunk_K (Orbax, the stacked state), DIR/chunks/chunk_K.json (a finished chunk's result rows),
TensorBoard events, then DIR/results.csv (one row per setting), DIR/pareto.csv,
DIR/pareto.png, DIR/pareto_weight.png and DIR/summary.md. Rerunning the same command resumes:
finished chunks are not rerun, the current chunk resumes from its last checkpoint.

results.csv has the results.json fields of ``experiments.train`` per setting (its
``train_seconds`` is the chunk's time divided by its settings), plus the setting's id, chunk,
model variant, grid values (the grid's ``compression`` is the ``block_compression`` column),
``diverged`` (a non-finite loss was seen) and ``diverged_step`` (the first such step, -1 if
none). A diverged setting's NaNs stay in its own slice of the batch; it is reported but never
on a Pareto front.

The pieces: ``experiments.sweep_settings`` (the grid's settings, their checks, the chunks),
``experiments.sweep_loop`` (the compiled programs and the training of a chunk, with the epoch
loop of ``experiments.epochs`` that ``experiments.train`` runs too) and
``experiments.sweep_report`` (results.csv, the Pareto fronts, plots and summary.md). This
module wires them into :func:`run_sweep`, opens a finished sweep (:func:`load_setting`) and is
the command line; it offers the pieces' public names too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments.sweep_loop import (
    ChunkContext,
    Program,
    Programs,
    abstract_chunk_state,
    chunk_line,
    chunk_result_path,
    make_program,
    read_chunk_rows,
    stack,
    train_chunk,
)
from experiments.sweep_report import (
    COLUMNS,
    DESIGN_COLUMNS,
    DESIGN_KEYS,
    FRONTIERS,
    PLOTS,
    SEED_COLUMNS,
    TIMING_COLUMNS,
    design_rows,
    fronts,
    label,
    plot_block_masks,
    plot_fronts,
    read_results,
    summary_markdown,
    write_csv,
    write_reports,
)
from experiments.sweep_settings import (
    GRID_KEYS,
    VARIANT_KEYS,
    VECTORIZE,
    Chunk,
    Setting,
    enumerate_settings,
    load_layout,
    make_chunks,
    plan_setting,
    setting_config,
    validate_sweep,
)

__all__ = [  # what experiments.sweep offers, wherever it is defined
    "COLUMNS",
    "DESIGN_COLUMNS",
    "DESIGN_KEYS",
    "FRONTIERS",
    "GRID_KEYS",
    "PLOTS",
    "TIMING_COLUMNS",
    "SEED_COLUMNS",
    "VARIANT_KEYS",
    "VECTORIZE",
    "Chunk",
    "Program",
    "Programs",
    "Setting",
    "design_rows",
    "enumerate_settings",
    "fronts",
    "label",
    "load_setting",
    "make_chunks",
    "make_program",
    "plot_block_masks",
    "plot_fronts",
    "read_config",
    "read_results",
    "run_sweep",
    "setting_config",
    "stack",
    "summary_markdown",
    "validate_sweep",
    "write_csv",
    "write_reports",
]
_label = label  # the name analysis.ipynb uses

FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------------------------
# The sweep.


def run_sweep(
    config,
    workdir,
    *,
    overwrite: bool = False,
    progress: bool = True,
    loop: str = "auto",
    programs: Programs | None = None,
):
    """Runs (or resumes) a sweep and writes its results and reports.

    Args:
      config: the sweep config (validated here before anything is computed).
      workdir: the sweep directory.
      overwrite: replace a workdir of another config.
      progress: show the tqdm progress bar (stderr).
      loop: how each chunk's epoch runs: ``"auto"`` (the scanned epoch, or for a model
        with convolutions on a CPU a host loop of steps), ``"scan"`` or ``"steps"``; see
        :func:`make_program`.
      programs: compiled programs to reuse and add to (default: compile anew).

    Returns:
      The result rows (as in results.csv).
    """
    from experiments import multihost

    workdir = Path(workdir)
    settings, ds, runs = _prepare(config, workdir, loop)
    with multihost.hold_workdir(workdir, "sweep"):
        return _sweep(config, workdir, overwrite, progress, loop, programs, settings, ds, runs)


def _sweep(config, workdir: Path, overwrite, progress, loop, programs, settings, ds, runs):
    """Trains this process's chunks in the claimed workdir, then (process 0) the reports."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from experiments import common, multihost
    from qsparse import data as qdata

    devices = jax.devices()  # of every process: a chunk's settings are split over all of them
    mesh = Mesh(np.array(devices), ("settings",))
    chunks = make_chunks(settings, config.sweep.chunk_size, len(devices))
    primary = multihost.is_primary()
    if primary:
        common.guard_workdir(workdir, config, overwrite)
        chunks = load_layout(workdir, chunks, len(devices))
        (workdir / "chunks").mkdir(exist_ok=True)
    multihost.barrier("sweep: workdir ready")
    chunks = load_layout(workdir, chunks, len(devices))
    done = {c.index: read_chunk_rows(workdir, c.index, config, settings, runs) for c in chunks}
    ctx = ChunkContext(
        config=config,
        workdir=workdir,
        data=qdata.to_device(ds, NamedSharding(mesh, P())),
        sharding=NamedSharding(mesh, P("settings")),
        writer=common.make_writer(workdir) if primary else common.NullWriter(),
        bar=_progress_bar(config, chunks, done, progress and primary),
    )
    if not any(chunk_result_path(workdir, c.index).exists() for c in chunks):
        ctx.writer.write_hparams(json.loads(common.config_json(config)))
    programs = Programs() if programs is None else programs
    vectorize = config.sweep.get("vectorize", "vmap")
    try:
        for chunk in chunks:
            if done[chunk.index] is None:
                members = [settings[i] for i in chunk.ids]
                run = runs[members[0].shape]
                prog = programs.get(config, members[0], run, mesh, vectorize, loop)
                done[chunk.index] = train_chunk(ctx, chunk, members, run, prog)
                if primary:
                    print(chunk_line(chunk, members, done[chunk.index], len(chunks)), flush=True)
    finally:
        ctx.bar.close()
        ctx.writer.flush()
    rows = sorted((r for rows in done.values() for r in rows), key=lambda r: r["setting"])
    if primary:
        write_reports(workdir, rows)
    multihost.barrier("sweep: reports written")
    return rows


def _prepare(config, workdir: Path, loop: str):
    """Checks everything, then loads the data and builds every model shape's run (a bad block
    shape fails here, before any training).

    Returns:
      ``(settings, dataset, runs)``, ``runs`` keyed by :attr:`Setting.shape`.
    """
    from experiments import common
    from qsparse import training

    common.validate(config)
    validate_sweep(config)
    if loop not in training.LOOPS:
        raise common.ConfigError(f"loop={loop!r} is not allowed: use one of {training.LOOPS}")
    settings = enumerate_settings(config)
    ds = common.load_data(config)
    runs = {}
    for s in settings:
        if s.shape not in runs:
            runs[s.shape] = common.build_run(setting_config(config, plan_setting(settings, s)), ds)
    return settings, ds, runs


def _progress_bar(config, chunks, done, show: bool):
    """The sweep's tqdm bar, in chunk-epochs, with the finished chunks counted."""
    from tqdm import tqdm

    total = config.num_epochs
    return tqdm(
        total=len(chunks) * total,
        initial=sum(total for rows in done.values() if rows is not None),
        unit="chunk-epoch",
        file=sys.stderr,
        disable=not show,
        dynamic_ncols=True,
    )


# ---------------------------------------------------------------------------------------------
# Opening a finished sweep.


def read_config(workdir):
    """The sweep config saved in a workdir.

    Args:
      workdir: the sweep directory.

    Returns:
      The ConfigDict (tuples restored where the code expects them).

    Raises:
      FileNotFoundError: no config.json.
    """
    import ml_collections

    from experiments import common

    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"workdir={str(workdir)!r} has no config.json: not a sweep")
    config = ml_collections.ConfigDict(common.read_saved_config(path))
    for f in ("block_shape", "first_block_shape", "last_block_shape"):
        config.sparsity[f] = tuple(config.sparsity[f])
    return config


def load_setting(workdir, setting_id: int, *, dataset=None):
    """One setting's trained model, sliced out of its chunk's stacked checkpoint.

    Args:
      workdir: the sweep directory.
      setting_id: the ``setting`` column of results.csv.
      dataset: the sweep's data set, if already loaded (else loaded here).

    Returns:
      ``(run, spec, state)``: the setting's own run (its config is the single-run config of
      the setting), its unstacked spec and its unstacked final train state, e.g. for
      ``training.make_eval(run.model, run.plan)(state.params, spec, x, y)``.

    Raises:
      FileNotFoundError: not a sweep workdir, or the setting's chunk has no checkpoint.
      KeyError: no such setting.
    """
    import jax

    from experiments import common

    workdir = Path(workdir)
    config = read_config(workdir)
    settings = enumerate_settings(config)
    if not 0 <= int(setting_id) < len(settings):
        raise KeyError(f"setting_id={setting_id} is not in this sweep: use 0..{len(settings) - 1}")
    layout = json.loads((workdir / "chunks.json").read_text())
    chunk = next(c for c in layout if int(setting_id) in c["ids"])
    pos = chunk["ids"].index(int(setting_id))
    s = settings[int(setting_id)]
    # The shape's plan (as the sweep trained it), with this setting's own config.
    run = common.build_run(setting_config(config, plan_setting(settings, s)), dataset)
    run = dataclasses.replace(run, config=setting_config(config, s))
    members = [settings[i] for i in chunk["ids"]]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mgr = common.checkpoint_manager(
        workdir / "checkpoints" / f"chunk_{chunk['chunk']}", config.keep_checkpoints
    )
    got = common.restore_checkpoint(mgr, abstract_chunk_state(run, members, sharding))
    if got is None:
        raise FileNotFoundError(f"setting {setting_id}: chunk {chunk['chunk']} has no checkpoint")
    state = jax.tree.map(lambda x: x[pos], got[1])
    return run, common.make_spec(run, **s.spec_values()), state


# ---------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> None:
    """Defines the command-line flags, only when run as a program: experiments.train defines
    flags of the same names at import, and tests import both modules into one process."""
    from experiments import multihost

    multihost.define_flags()
    config_flags.DEFINE_config_file("config", None, "Sweep config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
    flags.DEFINE_bool("overwrite", False, "Replace a workdir that holds a sweep of another config.")
    flags.DEFINE_enum(
        "loop",
        "auto",
        ["auto", "scan", "steps"],
        "How a chunk's epoch runs: auto = one scanned program, or for a model with"
        " convolutions on a CPU a host loop of one program stepping every setting.",
    )


def main(argv):
    del argv
    from experiments import common, multihost
    from experiments import workdir as workdir_lock

    common.cli_start(FLAGS)
    multihost.initialize_from_flags(FLAGS)
    t0 = time.perf_counter()
    try:
        rows = run_sweep(
            FLAGS.config,
            FLAGS.workdir,
            overwrite=FLAGS.overwrite,
            loop=FLAGS.loop,
        )
    except multihost.ProcessLost as e:
        multihost.exit_lost(e)
    except (common.ConfigError, FileNotFoundError, workdir_lock.WorkdirInUse) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not multihost.is_primary():
        return
    designs = design_rows(rows)
    front = fronts(designs)
    print(
        f"{len(rows)} runs ({len(designs)} designs) in "
        f"{common.fmt_time(time.perf_counter() - t0)}; Pareto "
        f"designs: {len(front['total'])} (total memory), {len(front['weight'])} (weight "
        f"memory); see {Path(FLAGS.workdir) / 'summary.md'}",
        flush=True,
    )


if __name__ == "__main__":
    import functools

    from experiments.common import parse_flags

    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=functools.partial(parse_flags, cli="sweep"))
