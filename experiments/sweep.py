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
axis is split over the available devices (``Mesh`` axis ``"settings"``,
:func:`qsparse.training.over_settings`: each device runs its own settings); the data is
replicated. A model with convolutions on a CPU runs its chunk's epoch as a host loop over
one compiled step of every setting instead (``--loop``, :func:`make_program`): XLA:CPU runs
a training step's convolutions far slower inside a loop body (jax-ml/jax#12868).

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
tolerance either way.

Writes DIR/config.json, DIR/chunks.json (which settings train together), DIR/checkpoints/
chunk_K (Orbax, the stacked state), DIR/chunks/chunk_K.json (a finished chunk's result rows),
TensorBoard events, then DIR/results.csv (one row per setting), DIR/pareto.csv,
DIR/pareto.png, DIR/pareto_weight.png and DIR/summary.md. Rerunning the same command resumes:
finished chunks are not rerun, the current chunk resumes from its last checkpoint.

results.csv has the results.json fields of ``experiments.train`` per setting (its
``train_seconds`` is the chunk's time divided by its settings), plus the setting's id, chunk,
model variant, grid values, ``diverged`` (a non-finite loss was seen) and ``diverged_step``
(the first such step, -1 if none). A diverged setting's NaNs stay in its own slice of the
batch; it is reported but never on a Pareto front.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

VECTORIZE = ("vmap", "map")
VARIANT_KEYS = ("name", "hidden", "arch", "channels", "w_bits", "a_bits", "compression")
GRID_KEYS = ("w_bits", "a_bits", "compression")
TIMING_COLUMNS = ("train_seconds", "examples_per_second")
COLUMNS = (
    "setting",
    "chunk",
    "model",
    "arch",
    "hidden",
    "seed",
    "w_bits",
    "a_bits",
    "compression",
    "learning_rate",
    "prox_strength",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "block_sparsity",
    "weight_memory_bits",
    "fp32_weight_memory_bits",
    "weight_compression",
    "codes_bits",
    "index_bits",
    "scale_bits",
    "other_bits",
    "activation_memory_bits",
    "total_memory_bits",
    "num_params",
    "steps",
    "train_seconds",
    "examples_per_second",
    "diverged",
    "diverged_step",
)
_INT_COLUMNS = {
    "setting",
    "chunk",
    "seed",
    "w_bits",
    "a_bits",
    "weight_memory_bits",
    "fp32_weight_memory_bits",
    "codes_bits",
    "index_bits",
    "scale_bits",
    "other_bits",
    "activation_memory_bits",
    "total_memory_bits",
    "num_params",
    "steps",
    "diverged_step",
}
_TEXT_COLUMNS = {"model", "arch", "hidden", "frontier"}
FRONTIERS = {"total": "total_memory_bits", "weight": "weight_memory_bits"}
PLOTS = {"total": "pareto.png", "weight": "pareto_weight.png"}


# ---------------------------------------------------------------------------------------------
# Settings and chunks.


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the sweep grid.

    Attributes:
      id: index in the sweep's enumeration order (stable for a given config).
      model: the model variant's name.
      arch: ``config.model.name`` (``"mlp"``, ``"lenet"``, ``"vgg"``).
      hidden: hidden widths.
      channels: conv channels (unused by MLPs).
      w_bits: weight bits.
      a_bits: activation bits.
      compression: block compression ratio.
      seed: run seed (parameters and data order).
      learning_rate: peak learning rate.
      prox_strength: block-lasso strength.
    """

    id: int
    model: str
    arch: str
    hidden: tuple[int, ...]
    channels: tuple[int, ...]
    w_bits: int
    a_bits: int
    compression: float
    seed: int
    learning_rate: float
    prox_strength: float

    @property
    def shape(self) -> tuple:
        """What fixes the compiled program: settings with equal shapes train together."""
        return (self.arch, self.hidden, self.channels)

    def spec_values(self) -> dict:
        """The overrides for ``common.make_spec``."""
        return {
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "compression": self.compression,
            "learning_rate": self.learning_rate,
            "prox_strength": self.prox_strength,
        }


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Settings of one model shape that train together in one call of the chunk program.

    Attributes:
      index: chunk number (checkpoint directory ``chunk_{index}``).
      ids: setting ids, padding included (the last real id repeated).
      num_real: how many of ``ids`` are real (the rest is padding, dropped from results).
    """

    index: int
    ids: tuple[int, ...]
    num_real: int


def _as_dict(v) -> dict:
    return v.to_dict() if hasattr(v, "to_dict") else dict(v)


def _variants(config) -> list[dict]:
    """Model variants of a sweep config (the base model when ``sweep.models`` is empty)."""
    models = [_as_dict(m) for m in config.sweep.get("models", None) or []]
    if not models:
        hidden = list(config.model.hidden)
        models = [{"name": f"{config.model.name}-{'-'.join(map(str, hidden))}", "hidden": hidden}]
    return models


def validate_sweep(config) -> None:
    """Checks the sweep block and every setting's config; nothing is computed or read.

    Args:
      config: the sweep config.

    Raises:
      common.ConfigError: one line naming the field, the value and what is allowed.
    """
    from experiments import common

    if "sweep" not in config:
        raise common.ConfigError("sweep is missing: a sweep config needs a 'sweep' block")
    sw = config.sweep
    for key in ("w_bits", "a_bits", "compression", "seeds", "chunk_size"):
        if key not in sw:
            raise common.ConfigError(f"sweep.{key} is missing: a sweep config needs it")
    bits = f"use a non-empty list of values from {common.ALLOWED_BITS} (32 = float)"

    def check(cond, field, value, allowed):
        if not cond:
            raise common.ConfigError(f"{field}={value!r} is not allowed: {allowed}")

    def number_list(field, values, ok, allowed):
        values = list(values) if isinstance(values, (list, tuple)) else values
        check(
            isinstance(values, list)
            and values
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            and all(math.isfinite(v) and ok(v) for v in values),
            field,
            values,
            allowed,
        )
        check(len(set(values)) == len(values), field, values, "use each value once")

    def bits_ok(v):
        return float(v) == int(v) and int(v) in common.ALLOWED_BITS

    grids = {
        "w_bits": (bits_ok, bits),
        "a_bits": (bits_ok, bits),
        "compression": (lambda v: v >= 1, "use a non-empty list of ratios >= 1 (1 = dense)"),
    }
    for key, (ok, allowed) in grids.items():
        number_list(f"sweep.{key}", sw[key], ok, allowed)
    number_list(
        "sweep.seeds",
        sw.seeds,
        lambda v: float(v) == int(v) and v >= 0,
        "use a non-empty list of integers >= 0",
    )
    for key, ok, allowed in (
        ("learning_rate", lambda v: v > 0, "use [] (the config's) or a list of values > 0"),
        ("prox_strength", lambda v: v >= 0, "use [] (the config's) or a list of values >= 0"),
    ):
        if list(sw.get(key, None) or []):
            number_list(f"sweep.{key}", sw[key], ok, allowed)
    check(
        isinstance(sw.chunk_size, int)
        and not isinstance(sw.chunk_size, bool)
        and sw.chunk_size >= 1,
        "sweep.chunk_size",
        sw.chunk_size,
        "use an integer >= 1",
    )
    vec = sw.get("vectorize", "vmap")
    check(vec in VECTORIZE, "sweep.vectorize", vec, f"use one of {VECTORIZE}")
    check(
        config.distill.weight == 0,
        "distill.weight",
        config.distill.weight,
        "use 0 in a sweep (a teacher per setting is not supported)",
    )
    names = set()
    for i, m in enumerate(_variants(config)):
        field = f"sweep.models[{i}]"
        for key in sorted(set(m) - set(VARIANT_KEYS)):
            check(False, f"{field}.{key}", m[key], f"use only the keys {VARIANT_KEYS}")
        name = m.get("name")
        check(isinstance(name, str) and name, f"{field}.name", name, "use a non-empty string")
        check(name not in names, f"{field}.name", name, "use a name no other variant has")
        names.add(name)
        hidden = m.get("hidden")
        check(
            isinstance(hidden, (list, tuple)) and all(isinstance(h, int) and h > 0 for h in hidden),
            f"{field}.hidden",
            hidden,
            "use a list of positive integers",
        )
        for key, (ok, allowed) in grids.items():
            if key in m:
                number_list(f"{field}.{key}", m[key], ok, allowed)
    # Every distinct setting config must pass the single-run checks (e.g. compression > 1
    # needs a block shape); the checks are cheap, so run them all before any data is read.
    seen = set()
    for s in enumerate_settings(config):
        key = (s.shape, s.w_bits, s.a_bits, s.compression, s.learning_rate, s.prox_strength)
        if key not in seen:
            seen.add(key)
            common.validate(setting_config(config, s))


def _plan_setting(settings, s):
    """The setting whose config builds the plan of ``s``'s shape: the one with the fewest
    activation bits, so every layer whose input any setting quantizes has its quantizer (a
    rule at 32 bits has none; settings at 32 bits run it as the identity)."""
    return min((t for t in settings if t.shape == s.shape), key=lambda t: t.a_bits)


def enumerate_settings(config) -> list[Setting]:
    """All settings of a sweep config, in a fixed order (their ids).

    Order: model variant, then ``w_bits``, ``a_bits``, ``compression``, ``learning_rate``,
    ``prox_strength``, ``seeds`` (the last varies fastest).

    Args:
      config: the sweep config.

    Returns:
      The settings.
    """
    sw = config.sweep
    lrs = list(sw.get("learning_rate", None) or []) or [config.learning_rate]
    proxes = list(sw.get("prox_strength", None) or []) or [config.sparsity.prox_strength]
    out = []
    for m in _variants(config):
        grid = [list(m.get(k, sw[k])) for k in GRID_KEYS]
        for w, a, c, lr, prox, seed in itertools.product(*grid, lrs, proxes, list(sw.seeds)):
            out.append(
                Setting(
                    id=len(out),
                    model=str(m["name"]),
                    arch=str(m.get("arch", config.model.name)),
                    hidden=tuple(int(h) for h in m["hidden"]),
                    channels=tuple(int(h) for h in m.get("channels", config.model.channels)),
                    w_bits=int(w),
                    a_bits=int(a),
                    compression=float(c),
                    seed=int(seed),
                    learning_rate=float(lr),
                    prox_strength=float(prox),
                )
            )
    return out


def setting_config(config, setting: Setting):
    """The single-run config of one setting (what ``experiments.train`` would run).

    Args:
      config: the sweep config.
      setting: the setting.

    Returns:
      A ConfigDict without the ``sweep`` block.
    """
    import ml_collections

    d = config.to_dict()
    d.pop("sweep", None)
    c = ml_collections.ConfigDict(d)
    c.model.name = setting.arch
    c.model.hidden = list(setting.hidden)
    c.model.channels = list(setting.channels)
    c.quant.w_bits = setting.w_bits
    c.quant.a_bits = setting.a_bits
    c.sparsity.compression = setting.compression
    c.learning_rate = setting.learning_rate
    c.sparsity.prox_strength = setting.prox_strength
    c.seed = setting.seed
    return c


def make_chunks(settings: Sequence[Setting], chunk_size: int, num_devices: int) -> list[Chunk]:
    """Splits settings into chunks of one model shape each.

    The chunk size is rounded up to a multiple of ``num_devices`` (each device takes an equal
    slice) and, for a shape with fewer settings than that, cut to the fewest device multiples
    that hold them (no compute spent on padding). All chunks of a shape have the same size,
    so they share one compilation; the last one is padded with copies of its last setting.

    Args:
      settings: from :func:`enumerate_settings`.
      chunk_size: the requested settings per chunk.
      num_devices: devices the setting axis is sharded over.

    Returns:
      The chunks, shapes in order of first appearance.
    """
    groups: dict[tuple, list[Setting]] = {}
    for s in settings:
        groups.setdefault(s.shape, []).append(s)
    size = -(-chunk_size // num_devices) * num_devices
    chunks = []
    for group in groups.values():
        n = min(size, -(-len(group) // num_devices) * num_devices)
        for start in range(0, len(group), n):
            ids = [s.id for s in group[start : start + n]]
            real = len(ids)
            ids += [ids[-1]] * (n - real)
            chunks.append(Chunk(index=len(chunks), ids=tuple(ids), num_real=real))
    return chunks


def _layout_json(chunks: Sequence[Chunk]) -> list[dict]:
    return [{"chunk": c.index, "ids": list(c.ids), "num_real": c.num_real} for c in chunks]


def _load_layout(workdir: Path, chunks: list[Chunk], num_devices: int) -> list[Chunk]:
    """The chunk layout of this workdir: the saved one when resuming, else ``chunks`` (saved).

    A resumed sweep keeps the layout it started with, so finished chunks and checkpoints stay
    valid when the chunk size would now round differently.
    """
    from experiments import common

    path = workdir / "chunks.json"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_layout_json(chunks), indent=1))
        os.replace(tmp, path)
        return chunks
    saved = [
        Chunk(int(c["chunk"]), tuple(int(i) for i in c["ids"]), int(c["num_real"]))
        for c in json.loads(path.read_text())
    ]
    bad = [c.index for c in saved if len(c.ids) % num_devices]
    if bad:
        raise common.ConfigError(
            f"workdir={str(workdir)!r} was started with chunks of {len(saved[bad[0]].ids)} "
            f"settings, which {num_devices} devices cannot share evenly: resume on the device "
            "count it started with, or use --overwrite"
        )
    return saved


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


# Traces of the chunk programs, keyed by ("epoch" | "eval", model shape). A trace is what a
# compilation follows; tests read this to check one compilation per model shape.
TRACES: collections.Counter = collections.Counter()
# Compiled chunk programs of this process, keyed by everything static about them, so that a
# resumed or repeated sweep in one process (tests, notebooks) does not compile again.
_PROGRAMS: dict[tuple, Program] = {}


def _program_key(config, setting: Setting, mesh, vectorize: str, loop: str) -> tuple:
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


def make_program(run, shape, mesh, vectorize: str, loop: str = "auto") -> Program:
    """Builds the chunk epoch and eval functions of a model shape.

    The epoch is one program of the scanned epoch of every setting (``training.over_settings``
    around ``training.make_train_epoch``), or, where ``training.pick_loop`` picks the host
    loop of steps (a model with convolutions on a CPU, whose convolutions XLA:CPU runs far
    slower inside a loop body), a host loop over one program of a step of every setting
    (``over_settings`` around the step of ``training.make_epoch_steps``), so that no
    convolution sits inside a loop; ``"map"`` then puts the settings one after another
    unrolled in that program (``over_settings(..., "unroll")``) instead of in a ``lax.map``.
    Either way each setting computes what its lone run computes.

    Args:
      run: the shape's run (any of its settings: only the static part is used).
      shape: the shape key (for :data:`TRACES`).
      mesh: a ``Mesh`` with a ``"settings"`` axis.
      vectorize: ``"vmap"`` or ``"map"`` (see the module docstring).
      loop: ``"auto"``, ``"scan"`` or ``"steps"`` (``training.pick_loop``).

    Returns:
      The :class:`Program`.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qsparse import training

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
        TRACES[("eval", shape)] += 1
        return batched_eval(params, specs, images, labels, model_state)

    s, r = NamedSharding(mesh, P("settings")), NamedSharding(mesh, P())
    evaluate = jax.jit(eval_fn, in_shardings=(s, s, r, r, s), out_shardings=s)
    if form == "scan":
        epoch = training.make_train_epoch(run.model, run.plan, run.sched, c.batch_size)
        batched_epoch = training.over_settings(
            epoch, mesh, (True, False, False, True, True), vectorize
        )

        def epoch_fn(states, images, labels, keys, specs):
            TRACES[("epoch", shape)] += 1
            return batched_epoch(states, images, labels, keys, specs)

        jitted = jax.jit(epoch_fn, in_shardings=(s, r, r, s, s), out_shardings=s)
        return Program(epoch=jitted, evaluate=evaluate, loop=form)

    parts = training.make_epoch_steps(run.model, run.plan, run.sched, c.batch_size)
    vec = "unroll" if vectorize == "map" else vectorize
    begin = training.over_settings(parts.begin, mesh, (False, True), vec)
    step = training.over_settings(parts.step, mesh, (True, True, True, False, False, True), vec)
    end = training.over_settings(parts.end, mesh, (True, True), vec)

    def step_fn(states, progress, perms, images, labels, specs):
        TRACES[("epoch", shape)] += 1  # the epoch's program
        return step(states, progress, perms, images, labels, specs)

    epoch = training.steps_epoch(
        jax.jit(begin, in_shardings=(r, s), out_shardings=s),
        jax.jit(
            step_fn,
            in_shardings=(s, s, s, r, r, s),
            out_shardings=s,
            donate_argnums=(0, 1),
        ),
        jax.jit(end, in_shardings=(s, s), out_shardings=s),
    )
    return Program(epoch=epoch, evaluate=evaluate, loop=form)


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


def _chunk_inputs(run, settings: Sequence[Setting]):
    """Stacked specs and initial states of a chunk (each made as a lone run makes it)."""
    from experiments import common

    specs = [common.make_spec(run, **s.spec_values()) for s in settings]
    states = [common.init_state(run, sp, s.seed) for s, sp in zip(settings, specs)]
    return stack(specs), stack(states)


def _abstract_chunk_state(run, settings: Sequence[Setting], sharding):
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
# The sweep.


class _Stop(Exception):
    """Raised by the test hooks to end the sweep as if it had been killed."""


def run_sweep(
    config,
    workdir,
    *,
    overwrite: bool = False,
    stop_after_chunks: int = 0,
    stop_after_epochs: int = 0,
    progress: bool = True,
    loop: str = "auto",
):
    """Runs (or resumes) a sweep and writes its results and reports.

    Args:
      config: the sweep config (validated here before anything is computed).
      workdir: the sweep directory.
      overwrite: replace a workdir of another config.
      stop_after_chunks: for tests: return after this many chunks of this call (0 = all).
      stop_after_epochs: for tests: return after this many chunk-epochs of this call (0 = all).
      progress: show the tqdm progress bar (stderr).
      loop: how each chunk's epoch runs: ``"auto"`` (the scanned epoch, or for a model
        with convolutions on a CPU a host loop of steps), ``"scan"`` or ``"steps"``; see
        :func:`make_program`.

    Returns:
      The result rows (as in results.csv), or None when stopped early.
    """
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from tqdm import tqdm

    from experiments import common
    from qsparse import data as qdata
    from qsparse import training

    workdir = Path(workdir)
    common.validate(config)
    validate_sweep(config)
    if loop not in training.LOOPS:
        raise common.ConfigError(f"loop={loop!r} is not allowed: use one of {training.LOOPS}")
    settings = enumerate_settings(config)
    ds = common.load_data(config)
    runs = {}
    for s in settings:  # build every shape first: a bad block shape fails before training
        if s.shape not in runs:
            runs[s.shape] = common.build_run(setting_config(config, _plan_setting(settings, s)), ds)
    common.guard_workdir(workdir, config, overwrite)

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("settings",))
    per, rep = NamedSharding(mesh, P("settings")), NamedSharding(mesh, P())
    chunks = _load_layout(
        workdir, make_chunks(settings, config.sweep.chunk_size, len(devices)), len(devices)
    )
    dev = qdata.to_device(ds, rep)
    vectorize = config.sweep.get("vectorize", "vmap")
    writer = common.make_writer(workdir)
    (workdir / "chunks").mkdir(exist_ok=True)
    if not any(_chunk_result_path(workdir, c.index).exists() for c in chunks):
        writer.write_hparams(json.loads(common.config_json(config)))

    total = config.num_epochs
    done = {c.index: _read_chunk_rows(workdir, c.index) for c in chunks}
    bar = tqdm(
        total=len(chunks) * total,
        initial=sum(total for rows in done.values() if rows is not None),
        unit="chunk-epoch",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    budget = {"chunks": stop_after_chunks, "epochs": stop_after_epochs}
    try:
        for chunk in chunks:
            if done[chunk.index] is not None:
                continue
            shape = settings[chunk.ids[0]].shape
            form = training.pick_loop(runs[shape].plan, loop)
            key = _program_key(config, settings[chunk.ids[0]], mesh, vectorize, form)
            if key not in _PROGRAMS:
                _PROGRAMS[key] = make_program(runs[shape], shape, mesh, vectorize, form)
            members = [settings[i] for i in chunk.ids]
            done[chunk.index] = _train_chunk(
                config,
                workdir,
                chunk,
                members,
                runs[shape],
                _PROGRAMS[key],
                dev,
                per,
                writer,
                bar,
                budget,
            )
            print(_chunk_line(chunk, members, done[chunk.index], len(chunks)), flush=True)
            budget["chunks"] -= 1
            out_of_epochs = stop_after_epochs and budget["epochs"] <= 0
            out_of_chunks = stop_after_chunks and budget["chunks"] <= 0
            if (out_of_epochs or out_of_chunks) and chunk is not chunks[-1]:
                raise _Stop
    except _Stop:
        writer.flush()
        bar.close()
        return None
    bar.close()
    writer.flush()
    rows = sorted((r for rows in done.values() for r in rows), key=lambda r: r["setting"])
    write_reports(workdir, rows)
    return rows


def _chunk_result_path(workdir: Path, index: int) -> Path:
    return workdir / "chunks" / f"chunk_{index}.json"


def _read_chunk_rows(workdir: Path, index: int):
    path = _chunk_result_path(workdir, index)
    return json.loads(path.read_text())["rows"] if path.exists() else None


def _train_chunk(config, workdir, chunk, members, run, prog, dev, per, writer, bar, budget):
    """Trains (or resumes) one chunk to the end; returns its real settings' result rows."""
    import jax
    import numpy as np

    from experiments import common

    n, total = len(members), config.num_epochs
    mgr = common.checkpoint_manager(
        workdir / "checkpoints" / f"chunk_{chunk.index}", config.keep_checkpoints
    )
    start, seconds = 0, 0.0
    history = [[] for _ in range(chunk.num_real)]
    bad_step = [-1] * n
    if mgr.latest_step() is not None:
        abstract = _abstract_chunk_state(run, members, per)
        step, state, meta = common.restore_checkpoint(mgr, abstract, log=logging.warning)
        start, seconds = int(meta["epoch"]), float(meta["train_seconds"])
        history, bad_step = meta["history"], list(meta["diverged_step"])
        specs = stack([common.make_spec(run, **s.spec_values()) for s in members])
        bar.update(start)
    else:
        specs, state = _chunk_inputs(run, members)
    specs, state = jax.device_put((specs, state), per)

    for epoch in range(start, total):
        t0 = time.perf_counter()
        keys = jax.device_put(stack([common.epoch_key(s.seed, epoch) for s in members]), per)
        state, m = prog.epoch(state, dev["train_x"], dev["train_y"], keys, specs)
        ev = prog.evaluate(state.params, specs, dev["test_x"], dev["test_y"], state.model_state)
        m, ev = jax.device_get((m, ev))
        seconds += time.perf_counter() - t0
        step = int(np.asarray(jax.device_get(state.step))[0])
        for i in range(n):
            if bad_step[i] < 0 and not m["all_finite"][i]:
                bad_step[i] = int(m["first_nonfinite_step"][i])
        scalars = {}
        for i in range(chunk.num_real):
            row = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": float(m["loss"][i]),
                "train_accuracy": float(m["accuracy"][i]),
                "test_accuracy": float(ev["accuracy"][i]),
                "test_loss": float(ev["loss"][i]),
            }
            history[i].append(row)
            sid = members[i].id
            scalars[f"setting_{sid}/train_loss"] = row["train_loss"]
            scalars[f"setting_{sid}/test_accuracy"] = row["test_accuracy"]
        writer.write_scalars(step, scalars)
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == total:
            meta = {
                "epoch": epoch + 1,
                "history": history,
                "train_seconds": seconds,
                "diverged_step": bad_step,
            }
            common.save_checkpoint(mgr, step, state, meta)
        bar.update(1)
        acc = ev["accuracy"][: chunk.num_real]
        bar.set_postfix_str(f"chunk {chunk.index + 1} best test_acc {float(np.max(acc)):.4f}")
        budget["epochs"] -= 1
        if budget["epochs"] == 0 and epoch + 1 < total:
            raise _Stop  # as if killed: the chunk resumes from its last checkpoint

    # Only the final state is needed from now on (load_setting, reports): older checkpoints of
    # a finished chunk would multiply the sweep's disk use by keep_checkpoints.
    final = mgr.latest_step()
    for old in mgr.all_steps():
        if old != final:
            mgr.delete(old)
    ev = jax.device_get(
        prog.evaluate(state.params, specs, dev["test_x"], dev["test_y"], state.model_state)
    )
    host_state, host_specs = jax.device_get((state, specs))
    steps = int(host_state.step[0])
    per_setting = seconds / chunk.num_real  # the chunk's time, shared by its settings
    rows = []
    for i, s in enumerate(members[: chunk.num_real]):
        st = jax.tree.map(lambda x, i=i: x[i], host_state)
        sp = jax.tree.map(lambda x, i=i: x[i], host_specs)
        srun = dataclasses.replace(run, config=setting_config(config, s))
        res = common.result_metrics(srun, st, sp, float(ev["accuracy"][i]))
        last = history[i][-1] if history[i] else {}
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
            "compression": s.compression,
            "learning_rate": s.learning_rate,
            "prox_strength": s.prox_strength,
            "test_loss": float(ev["loss"][i]),
            "train_loss": last.get("train_loss", math.nan),
            "steps": steps,
            "train_seconds": per_setting,
            "examples_per_second": steps * config.batch_size / max(per_setting, 1e-9),
            "diverged": bad_step[i] >= 0,
            "diverged_step": bad_step[i],
        }
        rows.append({k: row[k] for k in COLUMNS})
    path = _chunk_result_path(workdir, chunk.index)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"chunk": chunk.index, "history": history, "rows": rows}))
    os.replace(tmp, path)
    return rows


def _chunk_line(chunk: Chunk, members, rows, num_chunks: int) -> str:
    s = members[0]
    ok = [r for r in rows if not r["diverged"]]
    best = max(ok, key=lambda r: r["test_accuracy"]) if ok else None
    text = f"chunk {chunk.index + 1}/{num_chunks} ({s.model} {'-'.join(map(str, s.hidden))}, "
    text += f"{chunk.num_real} settings) done"
    if best is not None:
        text += f"; best test_acc {best['test_accuracy']:.4f} ({_label(best)})"
    diverged = len(rows) - len(ok)
    return text + (f"; {diverged} diverged" if diverged else "")


# ---------------------------------------------------------------------------------------------
# Reports.


def _label(row: Mapping, with_model: bool = False) -> str:
    from qsparse import pareto

    text = pareto.default_label(row)
    return f"{row['model']} {text}" if with_model else text


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float
    return str(v)


def write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    """Writes rows to a CSV file (floats in full precision), atomically.

    Args:
      path: the file.
      rows: mappings holding every column.
      columns: column order.
    """
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in columns])
    os.replace(tmp, path)


def read_results(path) -> list[dict]:
    """Reads results.csv or pareto.csv back with typed values.

    Args:
      path: the CSV file.

    Returns:
      One dict per row: ints, floats, bools (``diverged``) and strings as written.
    """
    out = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if k in _TEXT_COLUMNS:
                    row[k] = v
                elif k == "diverged":
                    row[k] = v == "true"
                elif k in _INT_COLUMNS:
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            out.append(row)
    return out


def fronts(rows: Sequence[Mapping]) -> dict[str, list[int]]:
    """The two Pareto fronts of a sweep: accuracy (max) against total / weight memory (min).

    Diverged settings are never on a front.

    Args:
      rows: result rows.

    Returns:
      ``{"total": [...], "weight": [...]}``, indices into ``rows`` in memory order.
    """
    from qsparse import pareto

    ok = [{**r, "test_accuracy": None if r["diverged"] else r["test_accuracy"]} for r in rows]
    return {
        name: pareto.pareto_front(ok, {col: "min", "test_accuracy": "max"})
        for name, col in FRONTIERS.items()
    }


def plot_fronts(rows: Sequence[Mapping], front: Mapping[str, Sequence[int]]) -> dict:
    """The two Pareto plots: every non-diverged design, the front highlighted and labelled.

    Args:
      rows: result rows.
      front: from :func:`fronts`.

    Returns:
      ``{"total": Figure, "weight": Figure}`` (matplotlib figures, no pyplot state).
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from qsparse import pareto

    many = len({r["model"] for r in rows}) > 1
    kib = 8 * 1024
    pos, shown = {}, []
    for i, r in enumerate(rows):
        if not r["diverged"]:
            pos[i] = len(shown)
            shown.append({**r, **{f"{n} memory (KiB)": r[c] / kib for n, c in FRONTIERS.items()}})
    figs = {}
    for name, title in (
        ("total", "accuracy vs total memory (weights + activations)"),
        ("weight", "accuracy vs weight memory"),
    ):
        fig = pareto.plot_front(
            shown,
            f"{name} memory (KiB)",
            "test_accuracy",
            [pos[i] for i in front[name]],
            label_fn=lambda r: _label(r, many),
            title=title,
        )
        for ax in fig.axes:
            if ax.get_xscale() == "log":
                # Labels at 1-2-5 steps: a sweep spans one to three decades, where the default
                # labels either overlap (minor ticks) or leave a single label (major only).
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
        figs[name] = fig
    return figs


def write_reports(workdir, rows: Sequence[Mapping]) -> None:
    """Writes results.csv, pareto.csv, pareto.png, pareto_weight.png and summary.md.

    Args:
      workdir: the sweep directory.
      rows: result rows (as :func:`run_sweep` returns them).
    """
    workdir = Path(workdir)
    rows = list(rows)
    write_csv(workdir / "results.csv", rows, COLUMNS)
    front = fronts(rows)
    picked = [{"frontier": name, **rows[i]} for name, idx in front.items() for i in idx]
    write_csv(workdir / "pareto.csv", picked, ("frontier", *COLUMNS))

    for name, fig in plot_fronts(rows, front).items():
        fig.savefig(workdir / PLOTS[name], dpi=120)
    (workdir / "summary.md").write_text(summary_markdown(rows, front))


def summary_markdown(rows: Sequence[Mapping], front: Mapping[str, Sequence[int]]) -> str:
    """The summary.md text: sweep counts and the Pareto designs as Markdown tables.

    Args:
      rows: result rows.
      front: from :func:`fronts`.

    Returns:
      Markdown text.
    """
    from qsparse import pareto

    kib = 8 * 1024
    table_rows = [
        {
            **r,
            "weight_KiB": r["weight_memory_bits"] / kib,
            "activation_KiB": r["activation_memory_bits"] / kib,
            "total_KiB": r["total_memory_bits"] / kib,
        }
        for r in rows
    ]
    cols = [
        "setting",
        "model",
        "hidden",
        "w_bits",
        "a_bits",
        "compression",
        "seed",
        "test_accuracy",
        "weight_KiB",
        "activation_KiB",
        "total_KiB",
        "weight_compression",
        "block_sparsity",
    ]
    diverged = sum(bool(r["diverged"]) for r in rows)
    models = sorted({(r["model"], r["hidden"]) for r in rows})
    lines = [
        "# Sweep summary",
        "",
        f"{len(rows)} settings ({diverged} diverged) over {len(models)} model variant(s): "
        + ", ".join(f"{m} ({h})" for m, h in models)
        + ".",
        "`weight_compression` is FP32 dense weight memory over this design's weight memory "
        "(codes, block index, scales, biases).",
        "",
        f"## Pareto front: test accuracy vs total memory (weights + activations), "
        f"{len(front['total'])} designs",
        "",
        pareto.front_table(table_rows, front["total"], cols),
        "",
        f"## Pareto front: test accuracy vs weight memory, {len(front['weight'])} designs",
        "",
        pareto.front_table(table_rows, front["weight"], cols),
        "",
    ]
    return "\n".join(lines)


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

    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"workdir={str(workdir)!r} has no config.json: not a sweep")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
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
    run = common.build_run(setting_config(config, _plan_setting(settings, s)), dataset)
    run = dataclasses.replace(run, config=setting_config(config, s))
    members = [settings[i] for i in chunk["ids"]]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mgr = common.checkpoint_manager(
        workdir / "checkpoints" / f"chunk_{chunk['chunk']}", config.keep_checkpoints
    )
    got = common.restore_checkpoint(mgr, _abstract_chunk_state(run, members, sharding))
    if got is None:
        raise FileNotFoundError(f"setting {setting_id}: chunk {chunk['chunk']} has no checkpoint")
    state = jax.tree.map(lambda x: x[pos], got[1])
    return run, common.make_spec(run, **s.spec_values()), state


# ---------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> None:
    """Defines the command-line flags, only when run as a program: experiments.train defines
    flags of the same names at import, and tests import both modules into one process."""
    config_flags.DEFINE_config_file("config", None, "Sweep config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
    flags.DEFINE_bool("overwrite", False, "Replace a workdir that holds a sweep of another config.")
    flags.DEFINE_integer(
        "stop_after_chunks",
        0,
        "Stop (as if killed) after this many chunks of this invocation; tests.",
    )
    flags.DEFINE_integer(
        "stop_after_epochs",
        0,
        "Stop (as if killed) after this many chunk-epochs of this invocation; tests.",
    )
    flags.DEFINE_enum(
        "loop",
        "auto",
        ["auto", "scan", "steps"],
        "How a chunk's epoch runs: auto = one scanned program, or for a model with"
        " convolutions on a CPU a host loop of one program stepping every setting.",
    )


def main(argv):
    del argv
    from experiments import common

    common.cli_start(FLAGS)
    t0 = time.perf_counter()
    try:
        rows = run_sweep(
            FLAGS.config,
            FLAGS.workdir,
            overwrite=FLAGS.overwrite,
            stop_after_chunks=FLAGS.stop_after_chunks,
            stop_after_epochs=FLAGS.stop_after_epochs,
            loop=FLAGS.loop,
        )
    except (common.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if rows is not None:
        front = fronts(rows)
        print(
            f"{len(rows)} settings in {common.fmt_time(time.perf_counter() - t0)}; Pareto "
            f"designs: {len(front['total'])} (total memory), {len(front['weight'])} (weight "
            f"memory); see {Path(FLAGS.workdir) / 'summary.md'}",
            flush=True,
        )


if __name__ == "__main__":
    from experiments.common import parse_flags

    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
