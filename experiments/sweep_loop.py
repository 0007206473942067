"""Training a sweep's chunks: one compiled program per model shape, and each chunk's epochs.

A chunk's settings are stacked on a leading axis; :func:`make_program` compiles the epoch and
the evaluation of every setting of a model shape at once, and :func:`train_chunk` trains (or
resumes) a chunk with the epoch loop ``experiments.train`` uses (``experiments.epochs``), then
writes its result rows. ``experiments.sweep`` re-exports the public names.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import logging

from experiments import multihost
from experiments.sweep_report import COLUMNS, RENAMED, label
from experiments.sweep_settings import Chunk, Setting, setting_config

# ---------------------------------------------------------------------------------------------
# One compiled program per model shape.


@dataclasses.dataclass
class Program:
    """The compiled chunk functions of one model shape.

    Attributes:
      epoch: ``epoch(states, images, labels, keys, specs) -> (states, metrics)``, batched:
        one jitted scanned epoch, or a host loop of one jitted step of every setting
        (``loop``); the states passed in may be donated (use the returned ones).
      evaluate: ``evaluate(params, specs, images, labels, model_state) -> {"accuracy",
        "loss"}``, batched.
      loop: ``"scan"`` or ``"steps"`` (:func:`qsparse.training.pick_loop`).
    """

    epoch: Any
    evaluate: Any
    loop: str = "scan"


class Programs:
    """Compiled chunk programs, keyed by everything static about them (:func:`program_key`).

    ``run_sweep`` makes its own unless given one: hold one to let a resumed or repeated sweep
    in the same process (a notebook, tests) reuse the compilations.

    Attributes:
      compiled: the :class:`Program` of each key.
      traces: how many times each program was traced, keyed by ``("epoch" | "eval", model
        shape)``; a compilation follows each trace.
    """

    def __init__(self):
        self.compiled: dict[tuple, Program] = {}
        self.traces: collections.Counter = collections.Counter()

    def get(self, config, setting: Setting, run, mesh, vectorize: str, loop: str) -> Program:
        """The program of ``setting``'s shape, compiled on first use.

        Args:
          config: the sweep config.
          setting: any setting of the shape.
          run: the shape's run.
          mesh: a ``Mesh`` with a ``"settings"`` axis.
          vectorize: ``"vmap"`` or ``"map"``.
          loop: ``"auto"``, ``"scan"`` or ``"steps"`` (``training.pick_loop``).

        Returns:
          The :class:`Program`.
        """
        from qsparse import training

        form = training.pick_loop(run.plan, loop)
        key = program_key(config, setting, mesh, vectorize, form)
        if key not in self.compiled:
            self.compiled[key] = make_program(
                run, setting.shape, mesh, vectorize, form, traces=self.traces
            )
        return self.compiled[key]


def program_key(config, setting: Setting, mesh, vectorize: str, loop: str) -> tuple:
    """What a chunk program depends on: the config without the per-setting values."""
    from experiments import common

    fixed = dataclasses.replace(
        setting,
        id=0,
        w_bits=32,
        a_bits=32,
        compression=1.0,
        seed=0,
        learning_rate=1.0,
        prox_strength=0.0,
    )
    text = common.config_json(setting_config(config, fixed))
    return (text, vectorize, loop, tuple(d.id for d in mesh.devices.flat))


def make_program(
    run, shape, mesh, vectorize: str, loop: str = "auto", traces: collections.Counter | None = None
) -> Program:
    """Builds the chunk epoch and eval functions of a model shape.

    The epoch is one program of the scanned epoch of every setting (``training.over_settings``
    around ``training.make_train_epoch``), or, where ``training.pick_loop`` picks the host
    loop of steps (a model with convolutions on a CPU, whose convolutions XLA:CPU runs far
    slower inside a loop body), a host loop over one program of a step of every setting
    (``over_settings`` around the step of ``training.make_epoch_steps``), so that no
    convolution sits inside a loop; ``"map"`` then puts the settings one after another
    unrolled in that program (``over_settings(..., "unroll")``) instead of in a ``lax.map``.
    Each setting computes what its lone run computes, bit for bit under ``lax.map``; in
    the unrolled step XLA may order a setting's float sums otherwise (see
    ``experiments.sweep``).

    Args:
      run: the shape's run (any of its settings: only the static part is used).
      shape: the shape key (for ``traces``).
      mesh: a ``Mesh`` with a ``"settings"`` axis.
      vectorize: ``"vmap"`` or ``"map"`` (see ``experiments.sweep``).
      loop: ``"auto"``, ``"scan"`` or ``"steps"`` (``training.pick_loop``).
      traces: counts the programs' traces (:attr:`Programs.traces`).

    Returns:
      The :class:`Program`.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qsparse import training

    traces = collections.Counter() if traces is None else traces
    c = run.config
    form = training.pick_loop(run.plan, loop)
    evaluate = training.make_eval(run.model, run.plan, c.eval_batch_size)
    # The settings axis is split over the devices; each runs its own settings (see
    # training.over_settings), batched by vmap or one after another by lax.map. (The
    # evaluation's forward convolutions keep their speed inside its scan and lax.map.)
    batched_eval = training.over_settings(
        evaluate, mesh, (True, True, False, False, True), vectorize
    )

    def eval_fn(params, specs, images, labels, model_state):
        traces[("eval", shape)] += 1
        return batched_eval(params, specs, images, labels, model_state)

    s, r = NamedSharding(mesh, P("settings")), NamedSharding(mesh, P())
    evaluate = jax.jit(eval_fn, in_shardings=(s, s, r, r, s), out_shardings=s)
    if form == "steps":
        epoch = _steps_epoch(run, shape, mesh, vectorize, traces)
        return Program(epoch=epoch, evaluate=evaluate, loop=form)
    epoch = training.make_train_epoch(run.model, run.plan, run.sched, c.batch_size)
    batched_epoch = training.over_settings(epoch, mesh, (True, False, False, True, True), vectorize)

    def epoch_fn(states, images, labels, keys, specs):
        traces[("epoch", shape)] += 1
        return batched_epoch(states, images, labels, keys, specs)

    jitted = jax.jit(epoch_fn, in_shardings=(s, r, r, s, s), out_shardings=s)
    return Program(epoch=jitted, evaluate=evaluate, loop=form)


def _steps_epoch(run, shape, mesh, vectorize: str, traces: collections.Counter):
    """The chunk epoch as a host loop over one program of a step of every setting."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qsparse import training

    s, r = NamedSharding(mesh, P("settings")), NamedSharding(mesh, P())
    parts = training.make_epoch_steps(run.model, run.plan, run.sched, run.config.batch_size)
    vec = "unroll" if vectorize == "map" else vectorize
    begin = training.over_settings(parts.begin, mesh, (False, True), vec)
    step = training.over_settings(parts.step, mesh, (True, True, True, False, False, True), vec)
    end = training.over_settings(parts.end, mesh, (True, True), vec)

    def step_fn(states, progress, perms, images, labels, specs):
        traces[("epoch", shape)] += 1  # the epoch's program
        return step(states, progress, perms, images, labels, specs)

    return training.steps_epoch(
        jax.jit(begin, in_shardings=(r, s), out_shardings=s),
        jax.jit(
            step_fn,
            in_shardings=(s, s, s, r, r, s),
            out_shardings=s,
            donate_argnums=(0, 1),
        ),
        jax.jit(end, in_shardings=(s, s), out_shardings=s),
    )


def stack(trees):
    """Stacks pytrees of equal structure on a new leading axis.

    Args:
      trees: the pytrees (PRNG key arrays allowed).

    Returns:
      One pytree whose leaves have a leading axis of ``len(trees)``.
    """
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def chunk_inputs(run, settings: Sequence[Setting]):
    """Stacked specs and initial states of a chunk (each made as a lone run makes it)."""
    from experiments import common

    specs = [common.make_spec(run, **s.spec_values()) for s in settings]
    states = [common.init_state(run, sp, s.seed) for s, sp in zip(settings, specs)]
    return stack(specs), stack(states)


def abstract_chunk_state(run, settings: Sequence[Setting], sharding):
    """Shapes of a chunk's stacked state (no compute), placed by ``sharding``, for restoring."""
    import jax

    from experiments import common

    spec = common.make_spec(run, **settings[0].spec_values())
    one = jax.eval_shape(lambda sp: common.init_state(run, sp, settings[0].seed), spec)
    n = len(settings)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype, sharding=sharding), one
    )


# ---------------------------------------------------------------------------------------------
# Training a chunk.


def chunk_result_path(workdir: Path, index: int) -> Path:
    """Where a finished chunk's result rows are (``chunks/chunk_K.json``)."""
    return workdir / "chunks" / f"chunk_{index}.json"


def read_chunk_rows(workdir: Path, index: int, config=None, settings=(), runs=None):
    """A finished chunk's rows (None if it has not finished), in the current columns: a
    chunk of an older sweep gets the renamed columns and ``total_activation_bits`` (which
    depends only on the plan and the setting's bits, so it is computed again here)."""
    from experiments import common

    path = chunk_result_path(workdir, index)
    if not path.exists():
        return None
    rows = json.loads(path.read_text())["rows"]
    out = []
    for row in rows:
        row = {RENAMED.get(k, k): v for k, v in row.items()}
        if "total_activation_bits" not in row and config is not None:
            s = settings[row["setting"]]
            run = runs[s.shape]
            run = dataclasses.replace(run, config=setting_config(config, s))
            spec = common.make_spec(run, **s.spec_values())
            row["total_activation_bits"] = int(
                run.plan.memory(spec["layers"])["activation_total_bits"]
            )
        out.append({k: row[k] for k in COLUMNS} if set(COLUMNS) <= set(row) else row)
    return out


@dataclasses.dataclass
class ChunkContext:
    """What every chunk of a sweep trains with.

    Attributes:
      config: the sweep config.
      workdir: the sweep directory.
      data: the data set on the devices (replicated).
      sharding: where a stacked array goes (its settings axis split over the devices).
      writer: the sweep's metric writer.
      bar: the sweep's progress bar (tqdm).
    """

    config: Any
    workdir: Path
    data: dict
    sharding: Any
    writer: Any
    bar: Any


@dataclasses.dataclass
class ChunkProgress:
    """What a chunk has done so far, saved with each of its checkpoints (:meth:`meta`).

    Attributes:
      epoch: epochs done.
      history: per real setting, its epochs' rows.
      train_seconds: the chunk's training time so far.
      diverged_step: per setting (padding included), the first non-finite step (-1: none).
    """

    epoch: int
    history: list
    train_seconds: float
    diverged_step: list

    def meta(self, epochs_done: int) -> dict:
        return {
            "epoch": epochs_done,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "diverged_step": self.diverged_step,
        }


def train_chunk(ctx: ChunkContext, chunk: Chunk, members, run, prog: Program) -> list[dict]:
    """Trains (or resumes) one chunk to the end.

    Args:
      ctx: what the sweep's chunks share.
      chunk: the chunk.
      members: its settings, padding included.
      run: the run of its shape.
      prog: its shape's compiled program.

    Returns:
      Its real settings' result rows (also written to ``chunks/chunk_K.json``).
    """

    from experiments import common, epochs

    config = ctx.config
    mgr = common.checkpoint_manager(
        ctx.workdir / "checkpoints" / f"chunk_{chunk.index}", config.keep_checkpoints
    )
    specs, state, progress = _start_chunk(run, chunk, members, mgr, ctx.sharding)
    ctx.bar.update(progress.epoch)

    def keys(epoch):
        return multihost.put(
            stack([common.epoch_key(s.seed, epoch) for s in members]), ctx.sharding
        )

    state = epochs.run_epochs(
        state,
        specs,
        ctx.data,
        epoch_fn=prog.epoch,
        eval_fn=prog.evaluate,
        keys=keys,
        start=progress.epoch,
        config=config,
        mgr=mgr,
        on_epoch=functools.partial(_log_epoch, ctx, chunk, members, progress),
        meta=progress.meta,
    )
    # Only the final state is needed from now on (load_setting, reports): older checkpoints of
    # a finished chunk would multiply the sweep's disk use by keep_checkpoints.
    final = mgr.latest_step()
    for old in mgr.all_steps():
        if old != final:
            mgr.delete(old)
    ev = epochs.evaluate(prog.evaluate, state, specs, ctx.data)
    rows = _result_rows(config, chunk, members, run, multihost.fetch((state, specs)), ev, progress)
    if multihost.is_primary():
        result = {"chunk": chunk.index, "history": progress.history, "rows": rows}
        common.write_json(chunk_result_path(ctx.workdir, chunk.index), result)
    return rows


def _start_chunk(run, chunk: Chunk, members, mgr, sharding):
    """A chunk's stacked specs and state on the devices, and its progress: from its latest
    checkpoint, or (none yet) made as each setting's lone run makes them."""

    from experiments import common

    if mgr.latest_step() is None:
        specs, state = chunk_inputs(run, members)
        progress = ChunkProgress(0, [[] for _ in range(chunk.num_real)], 0.0, [-1] * len(members))
    else:
        abstract = abstract_chunk_state(run, members, sharding)
        _, state, meta = common.restore_checkpoint(mgr, abstract, log=logging.warning)
        progress = ChunkProgress(
            epoch=int(meta["epoch"]),
            history=meta["history"],
            train_seconds=float(meta["train_seconds"]),
            diverged_step=list(meta["diverged_step"]),
        )
        specs = stack([common.make_spec(run, **s.spec_values()) for s in members])
    specs, state = multihost.put((specs, state), sharding)
    return specs, state, progress


def _log_epoch(ctx: ChunkContext, chunk: Chunk, members, progress: ChunkProgress, e) -> None:
    """Records a chunk's finished epoch: divergence, history rows, scalars, the progress bar."""
    import numpy as np

    m, ev = e.train, e.test
    progress.train_seconds += e.seconds
    for i, bad in enumerate(progress.diverged_step):
        if bad < 0 and not m["all_finite"][i]:
            progress.diverged_step[i] = int(m["first_nonfinite_step"][i])
    scalars = {}
    for i in range(chunk.num_real):
        row = {
            "epoch": e.index + 1,
            "step": e.step,
            "train_loss": float(m["loss"][i]),
            "train_accuracy": float(m["accuracy"][i]),
            "test_accuracy": float(ev["accuracy"][i]),
            "test_loss": float(ev["loss"][i]),
        }
        progress.history[i].append(row)
        sid = members[i].id
        scalars[f"setting_{sid}/train_loss"] = row["train_loss"]
        scalars[f"setting_{sid}/test_accuracy"] = row["test_accuracy"]
    ctx.writer.write_scalars(e.step, scalars)
    ctx.bar.update(1)
    best = float(np.max(ev["accuracy"][: chunk.num_real]))
    ctx.bar.set_postfix_str(f"chunk {chunk.index + 1} best test_acc {best:.4f}")


def _result_rows(config, chunk: Chunk, members, run, host, ev, progress: ChunkProgress):
    """The results.csv rows of a chunk's real settings, from its final state and specs on the
    host (``host``) and its final evaluation."""
    import jax

    from experiments import common

    host_state, host_specs = host
    steps = int(host_state.step[0])
    per_setting = progress.train_seconds / chunk.num_real  # the chunk's time, shared
    rows = []
    for i, s in enumerate(members[: chunk.num_real]):
        st = jax.tree.map(lambda x, i=i: x[i], host_state)
        sp = jax.tree.map(lambda x, i=i: x[i], host_specs)
        srun = dataclasses.replace(run, config=setting_config(config, s))
        res = common.result_metrics(srun, st, sp, float(ev["accuracy"][i]))
        last = progress.history[i][-1] if progress.history[i] else {}
        bad = progress.diverged_step[i]
        row = {
            "setting": s.id,
            "chunk": chunk.index,
            "model": s.model,
            "arch": s.arch,
            "hidden": "-".join(map(str, s.hidden)),
            "seed": s.seed,
            **res,
            # The grid's value (results.json reports the first layer's, which
            # quant.first_w_bits may fix for every setting).
            "w_bits": s.w_bits,
            "a_bits": s.a_bits,
            "block_compression": s.compression,
            "learning_rate": s.learning_rate,
            "prox_strength": s.prox_strength,
            "test_loss": common.readable(ev["loss"][i]),
            "train_loss": common.readable(last.get("train_loss", math.nan)),
            "steps": steps,
            "train_seconds": round(per_setting, 1),
            "examples_per_second": round(steps * config.batch_size / max(per_setting, 1e-9)),
            "diverged": bad >= 0,
            "diverged_step": bad,
        }
        rows.append({k: row[k] for k in COLUMNS})
    return rows


def chunk_line(chunk: Chunk, members, rows, num_chunks: int) -> str:
    """The line printed when a chunk is done: its model, best setting and divergences."""
    s = members[0]
    ok = [r for r in rows if not r["diverged"]]
    best = max(ok, key=lambda r: r["test_accuracy"]) if ok else None
    text = f"chunk {chunk.index + 1}/{num_chunks} ({s.model} {'-'.join(map(str, s.hidden))}, "
    text += f"{chunk.num_real} settings) done"
    if best is not None:
        text += f"; best test_acc {best['test_accuracy']:.4f} ({label(best)})"
    diverged = len(rows) - len(ok)
    return text + (f"; {diverged} diverged" if diverged else "")
