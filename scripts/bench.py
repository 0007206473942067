r"""Benchmark of qsparse's training paths, each figure a ratio of two programs timed side by side.

    python scripts/bench.py [--quick | --gpu] [--out bench.json]

What it measures (each ratio's two sides in one process: parts 1, 2 and 4 in this process on
the default single JAX device, parts 3 and 5 in a child process with one device per core):

1. **Step-time ratio**: qsparse's joint training step (2-bit weights and activations, 4X blocks
   on every layer, learned LSQ steps and PACT clips, proximal step and masks on; as in
   ``configs/joint.py`` the layers after the first multiply integer codes in bfloat16, forward
   and backward) over a plain Flax + optax Adam FP32 step of the same MLP
   784-1024-1024-1024-10, at batch 128 and 1024, in three phases of the schedule: proximal
   (before pruning), pruning (masks updated every ``prune_every`` steps; the update's cost is
   measured and amortized) and fine-tuning (masks frozen). The headline is the worst phase.
   The same step with float32 backward matmuls (``bf16_grads=False``) is timed in the prox
   phase for reference.
2. **Achieved training FLOP/s** ``6 * batch * parameters / step time`` as a fraction of the
   machine's matmul peak (a jitted 2048x2048 float32 matmul) timed in the same rounds,
   batch 1024, for both steps.
3. **Sweep throughput**: 8 settings (w_bits, a_bits, compression) of MLP 784-256-256-10 trained
   in one ``jax.vmap``-ed program over a stacked spec and stacked states, against the same 8
   run one after another through the one compiled single-setting program; the same ratio for
   plain Flax + optax FP32 training of that MLP is printed beside it as a reference. As
   ``experiments.sweep`` does, the vmapped program splits the settings over the devices
   (:func:`qsparse.training.over_settings`); on a CPU this part runs in a child process with
   one JAX device per core (``--xla_force_host_platform_device_count``), so each core trains
   its own settings while a single-setting program spreads each op over the cores.
4. **Input pipeline**: one epoch of Fashion-MNIST through ``training.make_train_epoch``
   (device-resident uint8 data, per-epoch shuffle, gather + normalize per step) against the same
   number of steps on one constant device-resident batch.
5. **Divergence guard**: the sweep's epoch program (8 settings, vmapped) with and without the
   per-step non-finite-loss flag that marks a diverged setting; target: under 2% extra time.

How it times: every program is jitted and runs many training steps as one ``lax.scan``
(so Python dispatch is excluded for both sides alike); the first call (compile) is excluded;
then the programs of one comparison run round-robin for a number of rounds set by the mode,
each call ended by ``block_until_ready``. A ratio is the median over rounds of the per-round
ratio, so slow drifts in machine load (other processes) cancel; the best-of ratio (each side's
fastest round) is shown beside it, and a target whose two estimates disagree is NOISY rather
than PASS or MISS. Phase states are made by setting the step counters of a fresh state (timing
does not depend on the weights' values). XLA's cost analysis of one compiled step (bytes
accessed, flops) is printed too: it does not depend on load, and on a memory-bound CPU it is
where the joint step's extra time comes from; a streaming-bandwidth probe timed in the same
rounds turns those extra bytes into milliseconds to set beside the measured difference.
The JSON file holds every program's timed rounds too (``rounds_s``, seconds per call in round
order, keyed ``b128/prox``, ``sweep/vmap`` and so on) and the process's minor page faults in
each (``round_faults``), for statistics beyond the medians.

``--only steps,sweep,input,guard`` runs a subset; on 2 CPU cores ``--quick`` takes 1 to 2
minutes and the full run about 5 (283-337 s on a busy AMD EPYC VM). Its comparisons stop
after 75 s of rounds once they have 9, so a machine at a third of that speed runs the
minimum rounds (an Intel Xeon VM at 2 GHz took 7 minutes with 9 to 13 rounds); ``--gpu``
sizes the scans for an accelerator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

try:
    import resource
except ImportError:  # not on Windows
    resource = None

# A sweep splits its settings over the devices (training.over_settings); on a CPU host, one
# JAX device per core lets each core train its own settings. The sweep's parts (3 and 5) run
# in a child process started with that flag (set here, before JAX starts, when the child's
# argv holds MULTI_DEVICE_FLAG); the single-setting parts (1, 2 and 4) run in the parent on
# the default single device, as experiments.train runs. With two host devices on a 2-core VM,
# single-device programs ran at one of two speeds, switching even within a process (a small
# MLP's one-after-another sweep: 0.65-0.72 or 1.05-1.15 ms per setting-step, the slow one in
# 13 of 23 processes at some point; with one device 0.65-0.72 in all of 11).
MULTI_DEVICE_FLAG = "--multi-device"
if MULTI_DEVICE_FLAG in sys.argv and "--xla_force_host_platform_device_count" not in (
    os.environ.get("XLA_FLAGS", "")
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={os.cpu_count() or 1}"
    ).strip()

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qsparse import data as qdata
from qsparse import training, wrap
from qsparse.models import MLP

BIG_HIDDEN = (1024, 1024, 1024)
SMALL_HIDDEN = (256, 256)
# The 8 sweep settings: (w_bits, a_bits, compression).
SWEEP_SETTINGS = (
    (2, 2, 4),
    (2, 2, 8),
    (3, 3, 4),
    (4, 4, 2),
    (4, 2, 4),
    (8, 8, 1),
    (2, 4, 16),
    (1, 2, 4),
)
LEARNING_RATE = 1e-3
STEP_RATIO_TARGET = 1.15  # joint step / plain step, on CPU (issue: benchmarks)
PROX_STRENGTH = 1e-4


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How long each measurement runs.

    Attributes:
      step_reps: timed rounds of the step comparison per batch size (median taken).
      min_reps: the fewest rounds of a comparison that :attr:`budget_s` may cut short.
      budget_s: seconds of timed rounds after which a comparison stops once it has
        ``min_reps`` rounds (None: always every round), so that a slower machine runs the
        minimum and the whole bench stays within 10 minutes.
      step_batches: batch sizes of the step-time comparison.
      steps: scan length per timed call, per batch size.
      matmul_chain: 2048x2048 matmuls per timed peak call.
      sweep_steps: training steps per setting in the sweep comparison.
      sweep_reps: rounds of the sweep comparison and of the divergence guard's.
      sweep_map: also time the ``lax.map`` variant of the sweep (a diagnostic; one compile).
      input_examples: training images per epoch (None: the whole split).
      input_reps: rounds of the input comparison.
    """

    step_reps: dict[int, int]
    min_reps: int
    budget_s: float | None
    step_batches: tuple[int, ...]
    steps: dict[int, int]
    matmul_chain: int
    sweep_steps: int
    sweep_reps: int
    sweep_map: bool
    input_examples: int | None
    input_reps: int


SIZES = {
    # Rounds enough for medians that hold still on a shared 2-core VM, where one round's ratio
    # of two calls varies by 10-15% (other tenants; `probes.py ratio-drift`): the median of n
    # rounds then by about 1.25 * 0.12 / sqrt(n). The rows whose figures sit nearest their
    # targets get the most rounds: batch 128 (true ratio 1.02-1.10) 21, about +-0.03; the
    # input row (0.99 over 41 rounds, blocks of 10 at 0.97-1.02, where 13 rounds read
    # 0.93-1.00 in five runs of the same code) 41, about +-0.025; the divergence guard (true
    # cost about 0, target 2%, NOISY in five of the last six runs at 11 rounds) and the sweep
    # 21. Batch 1024 (0.92) keeps 9.
    # Each stops after 75 s of rounds once it has 9: on this 2-core VM about 20 rounds of
    # batch 128 (2.9 s a round), all 41 of the input and 21 of the guard (1.3-1.4 s), about
    # 21 of the sweep (3.3 s); 9 of each, or a few more, on a VM at a third of its speed.
    "full": Sizes(
        step_reps={128: 21, 1024: 9},
        min_reps=9,
        budget_s=75.0,
        step_batches=(128, 1024),
        # Each call allocates its output state and scratch afresh, and the pages it touches
        # for them cost about 1.3 us each when the allocator has handed them back (0 to 11,000
        # of them per call, the same for a short call as for a long one, and not the same for
        # the two sides: `probes.py page-cost`, `step-windows`). A training epoch is one call
        # of hundreds of steps, so the windows are long enough for that to weigh little (at 20
        # steps per call it was up to 0.7 ms of a 7 ms step), and short enough that a 2-core
        # VM at a third of this one's speed still runs the whole bench within 10 minutes.
        steps={128: 40, 1024: 8},
        matmul_chain=6,
        sweep_steps=100,
        sweep_reps=21,
        sweep_map=True,
        input_examples=None,
        input_reps=41,
    ),
    "quick": Sizes(
        step_reps={128: 3, 1024: 3},
        min_reps=3,
        budget_s=None,
        step_batches=(128, 1024),
        steps={128: 10, 1024: 2},
        matmul_chain=2,
        sweep_steps=40,
        sweep_reps=3,
        sweep_map=False,
        input_examples=12800,
        input_reps=3,
    ),
    # An accelerator runs a step in well under a millisecond: long scans keep each timed call
    # far above launch and timer noise, and the whole run stays within about 5 minutes.
    "gpu": Sizes(
        step_reps={128: 7, 1024: 7},
        min_reps=7,
        budget_s=None,
        step_batches=(128, 1024),
        steps={128: 400, 1024: 200},
        matmul_chain=200,
        sweep_steps=1500,
        sweep_reps=5,
        sweep_map=True,
        input_examples=None,
        input_reps=5,
    ),
}

# Phase boundaries of the step-time schedule; states are placed inside each phase.
STEP_SCHEDULE = training.Schedule(
    total_steps=3000, prune_begin=1000, prune_end=2000, prune_every=50
)


# --- timing ----------------------------------------------------------------------------------


WARMUP: dict[str, float] = {}  # program name -> seconds of its first (compiling) call
# Program name -> its timed rounds in seconds, in round order, so a reader of the JSON file can
# set any program's rounds beside another's (a slow round of the streaming probe beside the
# step ratios of the same round, say) rather than only the medians.
ROUNDS: dict[str, list[float]] = {}
# Program name -> the process's minor page faults during each timed call: a call whose output
# and scratch buffers land on fresh pages pays about 1.3 us per 4 KiB page here
# (`probes.py page-cost`), which is no part of a training step's cost.
FAULTS: dict[str, list[int]] = {}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def race(
    programs: dict[str, Callable[[], Any]],
    reps: int,
    tag: str = "",
    *,
    min_reps: int | None = None,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Times programs round-robin after one untimed warm-up call each (the compile).

    Each round runs every program once; the starting program rotates between rounds so no
    program always follows the same neighbour.

    Args:
      programs: name -> zero-argument callable returning JAX arrays.
      reps: number of rounds.
      tag: prefix of the names recorded in :data:`WARMUP`.
      min_reps: with ``budget_s``, the rounds always run (default: ``reps``).
      budget_s: stop after the round that takes the timed rounds past this many seconds,
        once ``min_reps`` rounds have run; None: run all ``reps``.

    Returns:
      name -> list of wall-clock seconds, one per round.
    """
    for k, f in programs.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        WARMUP[f"{tag}{k}"] = time.perf_counter() - t0
    names = list(programs)
    times: dict[str, list[float]] = {k: [] for k in names}
    faults: dict[str, list[int]] = {k: [] for k in names}
    floor = reps if min_reps is None else min(min_reps, reps)
    start = time.perf_counter()
    for r in range(reps):
        if budget_s is not None and r >= floor and time.perf_counter() - start > budget_s:
            break
        for k in names[r % len(names) :] + names[: r % len(names)]:
            f0 = _minor_faults()
            t0 = time.perf_counter()
            jax.block_until_ready(programs[k]())
            times[k].append(time.perf_counter() - t0)
            faults[k].append(_minor_faults() - f0)
    ROUNDS.update({f"{tag}{k}": list(v) for k, v in times.items()})
    FAULTS.update({f"{tag}{k}": v for k, v in faults.items()})
    return times


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``."""
    return float(statistics.median(a / b for a, b in zip(num, den)))


def best_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """``min(num) / min(den)``: each side at its least disturbed round.

    Other processes only ever add time, so on a shared machine this is the steadier
    estimate; it is reported beside the median (see :func:`verdict`).
    """
    return float(min(num) / min(den))


def med(xs: Sequence[float]) -> float:
    """Median."""
    return float(statistics.median(xs))


def cost_of(jitted, *args) -> dict[str, float]:
    """XLA's cost analysis (flops, bytes accessed) of one compiled call; {} if unavailable."""
    try:
        ca = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - a missing analysis must not stop the benchmark
        return {}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}


def compiles(jitted) -> int | None:
    """Number of compiled variants a jitted function holds (more than 1 means a retrace)."""
    size = getattr(jitted, "_cache_size", None)
    return int(size()) if callable(size) else None


# --- models and steps ------------------------------------------------------------------------


class PlainMLP(nn.Module):
    """The reference: an MLP in plain Flax, no qsparse code (ReLU hidden layers, logits out).

    Attributes:
      hidden: hidden widths.
      num_classes: outputs.
    """

    hidden: Sequence[int]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        """Args: x: ``(batch, ...)`` images. Returns: logits."""
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def plain_setup(hidden, sample_x):
    """Plain FP32 Adam step ``(state, batch) -> (state, metrics)`` and its initial state."""
    model = PlainMLP(hidden=tuple(hidden))
    params = model.init(jax.random.key(0), sample_x)["params"]
    tx = optax.adam(LEARNING_RATE)

    def step(state, batch):
        params, opt_state = state
        x, y = batch

        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, jnp.mean(jnp.argmax(logits, -1) == y)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        # Same metrics as qsparse's step, so both sides do the same bookkeeping.
        metrics = {"loss": loss, "accuracy": acc, "finite": jnp.isfinite(loss)}
        return (optax.apply_updates(params, updates), opt_state), metrics

    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return step, (params, tx.init(params)), n_params


def joint_plan(model: nn.Module, sample_x, *, bf16_grads: bool = True, **overrides):
    """The joint setting on every layer: 2-bit weights and activations, 4X blocks (8,8) on
    hidden layers and (8,2) on the logits layer, learned weight steps and clips, and (as
    ``configs/joint.py``) the forward matmuls after the first layer on integer codes, their
    backward matmuls in bfloat16 (``bf16_grads``; False: float32 gradients)."""
    common = dict(w_bits=2, a_bits=2, compression=4, scale_mode="learned", learn_clip=True)
    codes = dict(int_matmul=True, bf16_grads=bf16_grads)
    last = f"Dense_{len(model.hidden)}"
    rules = [  # the first layer's input is the data (uint8 / 255), left as it is
        wrap.Rule(pattern="Dense_0", block_shape=(8, 8), **{**common, "a_bits": 32}),
        wrap.Rule(pattern=last, block_shape=(8, 2), **codes, **common),
        wrap.Rule(pattern=".*", block_shape=(8, 8), **codes, **common),
    ]
    plan = wrap.make_plan(model, rules, sample_x[:1])
    spec = training.make_spec(
        plan.init_spec(**overrides), learning_rate=LEARNING_RATE, prox_strength=PROX_STRENGTH
    )
    return plan, spec


def at_step(state, step: int):
    """The state with every step counter (integer scalar leaf) set to ``step``.

    All counters of a qsparse train state (its ``step``, Adam's, the prox's, the pruning's)
    advance together, so this places a state at any point of its schedule without running
    the steps before it.
    """

    def one(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.integer) and leaf.ndim == 0:
            return jnp.asarray(step, leaf.dtype)
        return leaf

    return jax.tree.map(one, state)


def phase_states(state, sched) -> dict:
    """The state placed in each phase of ``sched``: prox (step 0), pruning (just after a mask
    update) and fine-tuning (just after the last one)."""
    return {
        "prox": at_step(state, 0),
        "prune": at_step(state, sched.prune_begin + 1),
        "finetune": at_step(state, sched.prune_end + 1),
    }


def scan_steps(step: Callable, n: int) -> Callable:
    """``run(state, batch, *args)``: ``n`` steps on one batch as a ``lax.scan``, jitted."""

    def run(state, batch, *args):
        def body(s, _):
            s, m = step(s, batch, *args)
            return s, m["loss"]

        return jax.lax.scan(body, state, None, length=n)

    return jax.jit(run)


def settings_mesh(n: int) -> tuple[Mesh, NamedSharding, NamedSharding]:
    """A ``"settings"`` mesh over as many devices as share ``n`` settings evenly, with its
    per-setting (split) and replicated shardings."""
    devices = jax.devices()
    d = max(k for k in range(1, min(n, len(devices)) + 1) if n % k == 0)
    mesh = Mesh(np.array(devices[:d]), ("settings",))
    return mesh, NamedSharding(mesh, P("settings")), NamedSharding(mesh, P())


def synthetic_batch(batch: int, seed: int = 1):
    """A device-resident float batch of 28x28x1 images and labels; the images are uint8 pixels
    through ``qdata.normalize``, as real data reaches the model."""
    kx, ky = jax.random.split(jax.random.key(seed))
    x = qdata.normalize(jax.random.randint(kx, (batch, 28, 28, 1), 0, 256).astype(jnp.uint8))
    y = jax.random.randint(ky, (batch,), 0, 10)
    return jax.device_put((x, y))


# --- 1 + 2: step time and FLOP/s -------------------------------------------------------------


def bench_steps(sz: Sizes) -> dict:
    """Step-time ratios (all phases) per batch size; FLOP/s fractions at the largest batch."""
    big = max(sz.step_batches)
    return {
        "batches": {
            b: step_batch(b, sz, sz.matmul_chain if b == big else 0) for b in sz.step_batches
        }
    }


def step_batch(batch: int, sz: Sizes, matmul_chain: int) -> dict:
    """Plain vs joint step at one batch size, in every phase of :data:`STEP_SCHEDULE`.

    Args:
      batch: batch size.
      sz: the run's sizes (steps per timed call, rounds, their floor and time budget).
      matmul_chain: matmuls per peak-probe call; 0: no FLOP/s figures.

    Returns:
      The entry of this batch size in the results.
    """
    n, reps = sz.steps[batch], sz.step_reps[batch]
    sched = STEP_SCHEDULE
    if n >= min(
        sched.prune_begin, sched.prune_end - sched.prune_begin, sched.total_steps - sched.prune_end
    ):
        raise ValueError(f"steps per call {n} do not fit in a phase of {sched}")
    # The timed windows hold no mask update: with more steps per call than prune_every (the
    # GPU sizes), the timed programs update the masks less often; the update's cost is
    # measured on its own below and amortized over sched.prune_every all the same.
    timed = dataclasses.replace(sched, prune_every=max(sched.prune_every, n + 1))
    model = MLP(hidden=BIG_HIDDEN)
    xy = synthetic_batch(batch)
    p_step, p_state, n_params = plain_setup(BIG_HIDDEN, xy[0])
    plan, spec = joint_plan(model, xy[0])
    j_state = training.init_state(model, plan, timed, spec, jax.random.key(0), xy[0])
    p_run = scan_steps(p_step, n)
    j_run = scan_steps(training.make_train_step(model, plan, timed), n)
    # Compiling through lower() fills the jit cache too, so this costs no extra compile. The
    # analysis counts a scan's body once, i.e. one step.
    cost = {"plain": cost_of(p_run, p_state, xy), "joint": cost_of(j_run, j_state, xy, spec)}
    # Windows of n steps inside each phase; the pruning window starts just after a mask
    # update. The update's cost inside the step (the branch's block norms, ranking and masks)
    # is the difference between that window and the same window of a step whose schedule
    # updates the masks on every step (prune_every=1), divided by n; it is then amortized over
    # prune_every steps. A window holding one update would differ from one without by less
    # than the noise, and the update timed alone, outside the step, is not what the step runs.
    states = phase_states(j_state, sched)
    programs = {"plain": lambda: p_run(p_state, xy)}
    for name, st in states.items():
        programs[name] = lambda st=st: j_run(st, xy, spec)
    every = dataclasses.replace(timed, prune_every=1)
    e_run = scan_steps(training.make_train_step(model, plan, every), n)
    programs["prune, update every step"] = lambda: e_run(states["prune"], xy, spec)
    # For reference, not a target: the same joint step with float32 backward matmuls in the
    # integer-code layers (bf16_grads=False), in the prox phase.
    f_plan, f_spec = joint_plan(model, xy[0], bf16_grads=False)
    f_run = scan_steps(training.make_train_step(model, f_plan, timed), n)
    f_state = phase_states(
        training.init_state(model, f_plan, timed, f_spec, jax.random.key(0), xy[0]), sched
    )["prox"]
    programs["prox, float32 grads"] = lambda: f_run(f_state, xy, f_spec)
    programs["stream"] = stream_program()
    if matmul_chain:
        programs["matmul"] = matmul_program(matmul_chain)
    t = race(programs, reps, tag=f"b{batch}/", min_reps=sz.min_reps, budget_s=sz.budget_s)
    # Per round: one in-step mask update (seconds), and the pruning phase as its steady state
    # plus its share of one update.
    upd = [(e - a) / n for e, a in zip(t["prune, update every step"], t["prune"])]
    update_ms = 1e3 * med(upd)
    t["prune"] = [a + u * n / sched.prune_every for a, u in zip(t["prune"], upd)]
    phases = ("prox", "prune", "finetune")
    ms = {k: 1e3 * med(t[k]) / n for k in ("plain", *phases)}
    ratios = {k: paired_ratio(t[k], t["plain"]) for k in phases}
    best = {k: best_ratio(t[k], t["plain"]) for k in phases}
    worst = max(ratios, key=ratios.get)
    gbs = STREAM_BYTES / med(t["stream"]) / 1e9
    extra_mb = (cost["joint"]["bytes"] - cost["plain"]["bytes"]) / 1e6 if cost["joint"] else None
    entry = {
        "steps_per_call": n,
        "rounds": len(t["plain"]),
        "ms_per_step": ms,
        "mask_update_ms": update_ms,
        "ratio": ratios,
        "ratio_best": best,
        "ratio_f32_grads": paired_ratio(t["prox, float32 grads"], t["plain"]),
        "ratio_f32_grads_best": best_ratio(t["prox, float32 grads"], t["plain"]),
        "worst_phase": worst,
        "worst_ratio": ratios[worst],
        "params": n_params,
        "cost_plain": cost["plain"],
        "cost_joint": cost["joint"],
        "compiles": {"plain": compiles(p_run), "joint": compiles(j_run)},
        # What the extra bytes alone would cost at the machine's streaming bandwidth, against
        # what the worst phase measured beyond the plain step.
        "stream_gbs": gbs,
        "extra_bytes_ms": extra_mb / gbs if extra_mb is not None else None,
        "extra_ms": ms[worst] - ms["plain"],
        # Fresh pages each call's buffers touched (the process's minor faults, median).
        "faults_per_call": (
            {k: int(med(FAULTS[f"b{batch}/{k}"])) for k in ("plain", *phases)} if resource else {}
        ),
    }
    if matmul_chain:
        flops_step = 6.0 * batch * n_params
        peak = [2.0 * 2048**3 * matmul_chain / s for s in t["matmul"]]
        plain_f = [flops_step * n / s for s in t["plain"]]
        joint_f = [flops_step * n / s for s in t[worst]]
        entry["flops"] = {
            "peak_gflops": med(peak) / 1e9,
            "plain_gflops": med(plain_f) / 1e9,
            "joint_gflops": med(joint_f) / 1e9,
            "plain_fraction": med([a / b for a, b in zip(plain_f, peak)]),
            "joint_fraction": med([a / b for a, b in zip(joint_f, peak)]),
            "plain_fraction_best": max(plain_f) / max(peak),
            "joint_fraction_best": max(joint_f) / max(peak),
            "joint_phase": worst,
        }
    return entry


def stream_bytes(elems: int = 2**22, passes: int = 8) -> int:
    """Bytes :func:`stream_program` moves per call: each pass reads two arrays, writes one."""
    return 3 * 4 * elems * passes


STREAM_BYTES = stream_bytes()


def stream_program(elems: int = 2**22, passes: int = 8) -> Callable[[], Any]:
    """The bandwidth probe: ``passes`` jitted passes ``z = x + a * y`` over arrays of ``elems``
    float32s (a STREAM triad; by default 16 MB arrays, far larger than the caches), as one
    call; bytes moved: :func:`stream_bytes` (:data:`STREAM_BYTES` by default)."""
    kx, ky = jax.random.split(jax.random.key(11))
    x = jax.random.normal(kx, (elems,), jnp.float32)
    y = jax.random.normal(ky, (elems,), jnp.float32)

    @jax.jit
    def run(x, y):
        # Each pass depends on the last, so XLA cannot merge them into one.
        def body(i, z):
            return z + (1.0 + i.astype(jnp.float32) * 1e-9) * y

        return jax.lax.fori_loop(0, passes, body, x)

    return lambda: run(x, y)


def matmul_program(calls: int) -> Callable[[], Any]:
    """The peak probe: ``calls`` 2048x2048 float32 matmuls in one jitted program.

    ``c <- c @ q`` in a ``fori_loop``, ``q`` orthogonal so the values keep their size (normal
    random values: no denormals or infinities to slow a CPU down), and ``c`` donated, so a
    call writes into the buffer it was given. Before, each matmul was its own call with a
    fresh 16 MB output, whose new pages (12,000-33,000 per 8-matmul call here, at about 1.3 us
    each) read 5-10% off the peak.
    """
    ka, kb = jax.random.split(jax.random.key(7))
    q = jnp.linalg.qr(jax.random.normal(kb, (2048, 2048), jnp.float32))[0]
    chain = jax.jit(
        lambda c, b: jax.lax.fori_loop(0, calls, lambda i, c: c @ b, c), donate_argnums=0
    )
    box = [jax.random.normal(ka, (2048, 2048), jnp.float32)]

    def run():
        box[0] = chain(box[0], q)
        return box[0]

    return run


# --- 3: sweep --------------------------------------------------------------------------------


def bench_sweep(sz: Sizes) -> dict:
    """8 settings in one vmapped program vs one after another, same steps, MLP 784-256-256-10."""
    batch, s = 128, sz.sweep_steps
    # A whole short run: proximal phase, pruning with several mask updates, fine-tuning.
    sched = training.Schedule(
        total_steps=s, prune_begin=s // 3, prune_end=2 * s // 3, prune_every=max(s // 15, 1)
    )
    model = MLP(hidden=SMALL_HIDDEN)
    xy = synthetic_batch(batch)
    plan, _ = joint_plan(model, xy[0])
    specs = [
        training.make_spec(
            plan.init_spec(w_bits=w, a_bits=a, compression=c),
            learning_rate=LEARNING_RATE,
            prox_strength=PROX_STRENGTH,
        )
        for w, a, c in SWEEP_SETTINGS
    ]
    states = [
        training.init_state(model, plan, sched, sp, jax.random.key(i), xy[0])
        for i, sp in enumerate(specs)
    ]
    step = training.make_train_step(model, plan, sched)

    def run(state, batch_, spec):
        return jax.lax.scan(lambda st, _: step(st, batch_, spec), state, None, length=s)[0]

    one = jax.jit(run)
    # One vmapped program over the settings, split over the devices (one per core on a CPU
    # host: see the top of this file) as experiments.sweep runs it; the data batch is shared
    # by all settings (replicated), as a sweep's data is.
    mesh, per, rep = settings_mesh(len(SWEEP_SETTINGS))
    vmapped = jax.jit(training.over_settings(run, mesh, (True, False, True), "vmap"))
    stacked_specs, stacked_states, xy_rep = jax.device_put(
        (wrap.stack_specs(specs), jax.tree.map(lambda *xs: jnp.stack(xs), *states), xy),
        (per, per, rep),
    )
    # Diagnostic: the settings one after another inside each device's program (lax.map),
    # the sweep's bit-exact mode.
    mapped = jax.jit(training.over_settings(run, mesh, (True, False, True), "map"))
    # Reference: the same comparison for plain Flax + optax FP32 training of the same MLP
    # (no qsparse code), to tell XLA's batched execution on this machine from our overhead.
    p_step, p_state, _ = plain_setup(SMALL_HIDDEN, xy[0])

    def p_run(state, batch_):
        return jax.lax.scan(lambda st, _: p_step(st, batch_), state, None, length=s)[0]

    p_one = jax.jit(p_run)
    p_vmapped = jax.jit(training.over_settings(p_run, mesh, (True, False), "vmap"))
    p_stacked = jax.device_put(
        jax.tree.map(lambda x: jnp.stack([x] * len(SWEEP_SETTINGS)), p_state), per
    )
    programs = {
        "sequential": lambda: [one(st, xy, sp) for st, sp in zip(states, specs)],
        "vmap": lambda: vmapped(stacked_states, xy_rep, stacked_specs),
        "plain sequential": lambda: [p_one(p_state, xy) for _ in SWEEP_SETTINGS],
        "plain vmap": lambda: p_vmapped(p_stacked, xy_rep),
    }
    if sz.sweep_map:
        programs["lax.map"] = lambda: mapped(stacked_states, xy_rep, stacked_specs)
    t = race(programs, sz.sweep_reps, tag="sweep/", min_reps=sz.min_reps, budget_s=sz.budget_s)
    n_steps = s * len(SWEEP_SETTINGS)
    return {
        "settings": [list(x) for x in SWEEP_SETTINGS],
        "devices": mesh.devices.size,
        "steps_per_setting": s,
        "rounds": len(t["vmap"]),
        "schedule": dataclasses.asdict(sched),
        "ms_per_setting_step": {k: 1e3 * med(v) / n_steps for k, v in t.items()},
        "ratio": paired_ratio(t["sequential"], t["vmap"]),
        "ratio_best": best_ratio(t["sequential"], t["vmap"]),
        "ratio_lax_map": paired_ratio(t["sequential"], t["lax.map"]) if sz.sweep_map else None,
        "ratio_plain": paired_ratio(t["plain sequential"], t["plain vmap"]),
        "compiles": {"one": compiles(one), "vmap": compiles(vmapped)},
    }


# --- 4: input pipeline -----------------------------------------------------------------------


def input_setup(examples: int | None = None) -> dict:
    """The input comparison's data and programs (also used by ``probes.py input-order``).

    Args:
      examples: training images to use (None: the whole split).

    Returns:
      A dict: ``dataset``, ``note`` (why synthetic data stands in, or ""), ``images``,
      ``labels``, ``batch``, ``steps`` per epoch, ``state``, ``spec``, the jitted ``epoch``
      (shuffled, gathered on device), the training ``step``, the jitted ``const`` (the same
      steps on one batch) and its batch ``fixed``.
    """
    batch = 128
    note = ""
    try:
        ds = qdata.load("fashion_mnist")
    except (FileNotFoundError, ModuleNotFoundError, OSError) as e:
        note = f"fashion_mnist unavailable ({type(e).__name__}): synthetic data used"
        ds = qdata.load("synthetic", synthetic_size=(60000, 1000))
    n = len(ds.train_y) if examples is None else min(examples, len(ds.train_y))
    images = jax.device_put(ds.train_x[:n])
    labels = jax.device_put(ds.train_y[:n])
    steps = n // batch
    sched = training.Schedule(total_steps=10 * steps, prune_begin=5 * steps, prune_end=8 * steps)
    model = MLP(hidden=SMALL_HIDDEN)
    plan, spec = joint_plan(model, qdata.normalize(images[:batch]))
    state = training.init_state(model, plan, sched, spec, jax.random.key(0), images[:1] / 255.0)
    epoch = jax.jit(training.make_train_epoch(model, plan, sched, batch))
    # The same steps and per-epoch metrics (losses, accuracies, the divergence guard) over one
    # fixed, already normalized batch: no shuffle, no gather; only the data path differs.
    step = training.make_train_step(model, plan, sched)

    def fresh(batch, st):
        # The batch made to depend on the step count (x + 0 * step, which XLA keeps for
        # floats): with a loop-invariant batch XLA may hoist the model's work on it out of the
        # loop (a first layer with int_matmul had its input codes hoisted), and the constant
        # side would do less per step than the epoch.
        return (batch[0] + 0.0 * st.step.astype(batch[0].dtype), batch[1])

    @jax.jit
    def const(state, batch, spec):
        state, ms = jax.lax.scan(
            lambda st, _: step(st, fresh(batch, st), spec), state, None, length=steps
        )
        return state, {
            "loss": jnp.mean(ms["loss"]),
            "accuracy": jnp.mean(ms["accuracy"]),
            "all_finite": jnp.all(ms["finite"]),
            "first_nonfinite_step": jnp.argmin(ms["finite"]),
        }

    fixed = (qdata.normalize(images[:batch]), labels[:batch])
    return {
        "dataset": ds.name,
        "note": note,
        "images": images,
        "labels": labels,
        "batch": batch,
        "steps": steps,
        "state": state,
        "spec": spec,
        "epoch": epoch,
        "step": step,
        "const": const,
        "fixed": fixed,
    }


def bench_input(sz: Sizes) -> dict:
    """An epoch of real data (shuffled, gathered on device) vs the same steps on one batch."""
    su = input_setup(sz.input_examples)
    images, labels, state, spec = su["images"], su["labels"], su["state"], su["spec"]
    epoch, const, fixed = su["epoch"], su["const"], su["fixed"]
    n, batch, steps, note = len(labels), su["batch"], su["steps"], su["note"]
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    programs = {
        # A fresh key per call: every timed epoch is shuffled anew, as in training.
        "epoch": lambda: epoch(state, images, labels, next(keys), spec),
        "constant": lambda: const(state, fixed, spec),
        # The machine's streaming bandwidth in the same rounds: on a shared VM it swings
        # (85-117 GB/s here), and the epoch's extra memory traffic costs more when it is low.
        "stream": stream_program(),
    }
    t = race(programs, sz.input_reps, tag="input/", min_reps=sz.min_reps, budget_s=sz.budget_s)
    # The shuffle alone: qsparse's Feistel permutation against a sort of the indices by 64
    # random bits (two uint32 keys), the uniform-permutation-by-sorting it replaced.
    feistel = jax.jit(lambda k: qdata.epoch_indices(k, n, batch))

    @jax.jit
    def by_sort(k):
        bits = jax.random.bits(k, (2, n))
        return jax.lax.sort((bits[0], bits[1], jnp.arange(n, dtype=jnp.int32)), num_keys=2)[2]

    shuffles = race(
        {"feistel": lambda: feistel(next(keys)), "sort": lambda: by_sort(next(keys))},
        sz.input_reps,
        tag="input/shuffle ",
    )
    return {
        "shuffle_ms": {k: 1e3 * med(v) for k, v in shuffles.items()},
        "dataset": su["dataset"],
        "examples": n,
        "steps": steps,
        "note": note,
        "rounds": len(t["epoch"]),
        "epoch_s": med(t["epoch"]),
        "constant_s": med(t["constant"]),
        "ratio": paired_ratio(t["constant"], t["epoch"]),
        "ratio_best": best_ratio(t["constant"], t["epoch"]),
        "stream_gbs": STREAM_BYTES / med(t["stream"]) / 1e9,
        "compiles": {"epoch": compiles(epoch), "constant": compiles(const)},
    }


# --- 5: divergence guard --------------------------------------------------------------------


def bench_guard(sz: Sizes) -> dict:
    """The sweep's epoch program with and without its divergence guard (8 settings, vmapped).

    The guard is one ``isfinite`` of the loss per step plus two reductions per epoch of the
    per-step flags; the program is :func:`qsparse.training.make_train_epoch` as
    ``experiments.sweep`` runs it, on synthetic device-resident data.
    """
    batch = 128
    steps = sz.sweep_steps
    n = steps * batch
    kx, ky = jax.random.split(jax.random.key(3))
    images = jax.random.randint(kx, (n, 28, 28, 1), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(ky, (n,), 0, 10)
    sched = training.Schedule(total_steps=10 * steps, prune_begin=2 * steps, prune_end=5 * steps)
    model = MLP(hidden=SMALL_HIDDEN)
    plan, _ = joint_plan(model, qdata.normalize(images[:batch]))
    specs = wrap.stack_specs(
        [
            training.make_spec(
                plan.init_spec(w_bits=w, a_bits=a, compression=c),
                learning_rate=LEARNING_RATE,
                prox_strength=PROX_STRENGTH,
            )
            for w, a, c in SWEEP_SETTINGS
        ]
    )
    states = jax.vmap(
        lambda sp, k: training.init_state(model, plan, sched, sp, k, images[:1] / 255.0)
    )(specs, jax.random.split(jax.random.key(0), len(SWEEP_SETTINGS)))
    mesh, per, rep = settings_mesh(len(SWEEP_SETTINGS))
    states, specs = jax.device_put((states, specs), per)
    images, labels, key = jax.device_put((images, labels, jax.random.key(1)), rep)
    programs = {}
    for name, guard in (("guard", True), ("no guard", False)):
        epoch = training.make_train_epoch(model, plan, sched, batch, guard=guard)
        fn = jax.jit(training.over_settings(epoch, mesh, (True, False, False, False, True)))
        programs[name] = lambda fn=fn: fn(states, images, labels, key, specs)
    t = race(programs, sz.sweep_reps, tag="guard/", min_reps=sz.min_reps, budget_s=sz.budget_s)
    return {
        "settings": len(SWEEP_SETTINGS),
        "steps": steps,
        "rounds": len(t["guard"]),
        "ms_per_setting_step": {
            k: 1e3 * med(v) / (steps * len(SWEEP_SETTINGS)) for k, v in t.items()
        },
        "overhead": paired_ratio(t["guard"], t["no guard"]) - 1.0,
        "overhead_best": best_ratio(t["guard"], t["no guard"]) - 1.0,
    }


# --- report ----------------------------------------------------------------------------------


def machine_info() -> dict:
    """Devices, CPU count, load and versions."""
    import jaxlib

    return {
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
    }


def verdict(value: float, target: float, higher_is_better: bool, best: float | None) -> str:
    """PASS or MISS when the median and the best-of estimate agree; NOISY when they do not.

    On a machine shared with other processes the two can straddle a target; a verdict then
    needs a quieter run.
    """

    def ok(v: float) -> bool:
        return v >= target if higher_is_better else v <= target

    if best is not None and ok(best) != ok(value):
        return "NOISY"
    return "PASS" if ok(value) else "MISS"


def report(res: dict) -> list[dict]:
    """Prints the tables; returns the target rows."""
    m = res["machine"]
    print(f"machine : {m['devices']} backend={m['backend']} cpu_count={m['cpu_count']}")
    print(f"          {m['platform']}; load avg at start {m['load_avg_start']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print(f"mode    : {res['mode']}; timing: jitted lax.scan of N steps per call for both sides,")
    print("          compile excluded, round-robin rounds, median of per-round ratios")
    targets = []

    st = res.get("steps")
    if st:
        print("\n1. step time, MLP 784-1024-1024-1024-10 (ms/step, median)")
        hdr = f"{'batch':>6} {'N':>4} {'rounds':>6} {'plain':>8} {'prox':>8} {'prune*':>8}"
        hdr += f" {'finetune':>9}"
        print(hdr + f" {'mask upd':>9}  ratio prox/prune/finetune: median (best-of)")
        for b, e in st["batches"].items():
            ms, r, rb = e["ms_per_step"], e["ratio"], e["ratio_best"]
            print(
                f"{b:>6} {e['steps_per_call']:>4} {e.get('rounds', 0):>6}"
                f" {ms['plain']:8.2f} {ms['prox']:8.2f}"
                f" {ms['prune']:8.2f} {ms['finetune']:9.2f} {e['mask_update_ms']:8.1f}ms"
                + "  "
                + " / ".join(f"{r[k]:.2f} ({rb[k]:.2f})" for k in ("prox", "prune", "finetune"))
            )
        print(
            "   *prune: steady state + one mask update per"
            f" prune_every={STEP_SCHEDULE.prune_every} steps (the update's cost in the step: a"
            " window updating on every step against one that does not)"
        )
        print(
            "   the joint step with float32 gradients in its integer-code layers"
            " (bf16_grads=False), prox phase, for reference: "
            + ", ".join(
                f"batch {b} {e['ratio_f32_grads']:.2f} ({e['ratio_f32_grads_best']:.2f})"
                for b, e in st["batches"].items()
            )
        )
        print("   XLA cost analysis of one step (load-independent):")
        for b, e in st["batches"].items():
            cp, cj = e["cost_plain"], e["cost_joint"]
            if cp and cj:
                print(
                    f"   batch {b:>5}: plain {cp['bytes'] / 1e6:7.1f} MB {cp['flops'] / 1e9:6.2f}"
                    f" GFLOP | joint {cj['bytes'] / 1e6:7.1f} MB {cj['flops'] / 1e9:6.2f} GFLOP"
                    f" | bytes x{cj['bytes'] / cp['bytes']:.2f}"
                )
        for b, e in st["batches"].items():
            if e.get("extra_bytes_ms") is not None:
                print(
                    f"   batch {b:>5}: streaming bandwidth {e['stream_gbs']:.1f} GB/s; the joint"
                    f" step's extra bytes at that rate {e['extra_bytes_ms']:.1f} ms/step,"
                    f" measured extra ({e['worst_phase']}) {e['extra_ms']:.1f} ms/step"
                )
            fpc = e.get("faults_per_call")
            if fpc:
                print(
                    f"   batch {b:>5}: minor page faults per timed call (fresh pages for its"
                    f" buffers), median: plain {fpc['plain']}, {e['worst_phase']}"
                    f" {fpc[e['worst_phase']]}"
                )
        for b, e in st["batches"].items():
            targets.append(
                {
                    "name": f"step ratio joint/plain, batch {b} (worst: {e['worst_phase']})",
                    "value": e["worst_ratio"],
                    "best": max(e["ratio_best"].values()),
                    "target": STEP_RATIO_TARGET,
                    "op": "<=",
                }
            )
        big = max(st["batches"])
        fl = st["batches"][big].get("flops")
        if fl:
            print(f"\n2. training FLOP/s, batch {big} (6 x batch x params / step time)")
            print(
                f"   matmul peak {fl['peak_gflops']:.1f} GFLOP/s | plain {fl['plain_gflops']:.1f}"
                f" ({fl['plain_fraction']:.2f} of peak) | joint ({fl['joint_phase']})"
                f" {fl['joint_gflops']:.1f} ({fl['joint_fraction']:.2f} of peak)"
            )
            for k in ("plain", "joint"):
                targets.append(
                    {
                        "name": f"FLOP/s fraction of matmul peak, {k}, batch {big}",
                        "value": fl[f"{k}_fraction"],
                        "best": fl[f"{k}_fraction_best"],
                        "target": 0.6,
                        "op": ">=",
                    }
                )

    sw = res.get("sweep")
    if sw:
        ms = sw["ms_per_setting_step"]
        print(
            f"\n3. sweep, 8 settings x {sw['steps_per_setting']} steps, MLP 784-256-256-10, b128;"
            f" vmap and lax.map split over {sw['devices']} device(s)"
        )
        print(
            f"   {sw.get('rounds', 0)} rounds; ms per setting-step: "
            + " | ".join(f"{k} {v:.2f}" for k, v in ms.items())
        )
        lax_map = sw["ratio_lax_map"]
        print(
            f"   throughput vmap/sequential {sw['ratio']:.2f} (best-of {sw['ratio_best']:.2f})"
            + (f"; lax.map/sequential {lax_map:.2f}" if lax_map is not None else "")
            + f"; plain Flax FP32 vmap/sequential {sw['ratio_plain']:.2f}"
        )
        targets.append(
            {"name": "sweep throughput vmap/sequential", "value": sw["ratio"], "target": 1.0}
            | {"op": ">=", "best": sw["ratio_best"]}
        )

    ip = res.get("input")
    if ip:
        print(
            f"\n4. input pipeline, {ip['dataset']}, {ip['examples']} examples, {ip['steps']} steps"
        )
        print(
            f"   {ip.get('rounds', 0)} rounds: epoch {ip['epoch_s']:.2f} s"
            f" | constant batch {ip['constant_s']:.2f} s"
            f" | ratio {ip['ratio']:.3f} (best-of {ip['ratio_best']:.3f})"
            + (f" | streaming {ip['stream_gbs']:.0f} GB/s" if "stream_gbs" in ip else "")
            + (f"  NOTE: {ip['note']}" if ip["note"] else "")
        )
        sh = ip["shuffle_ms"]
        print(
            f"   shuffle per epoch: Feistel permutation {sh['feistel']:.2f} ms"
            f" | sort by random keys {sh['sort']:.2f} ms"
        )
        targets.append(
            {"name": "input: constant-batch time / epoch time", "value": ip["ratio"]}
            | {"target": 0.95, "op": ">=", "best": ip["ratio_best"]}
        )

    gd = res.get("guard")
    if gd:
        ms = gd["ms_per_setting_step"]
        print(
            f"\n5. divergence guard, sweep epoch program, {gd['settings']} settings x"
            f" {gd['steps']} steps, vmapped"
        )
        print(
            f"   {gd.get('rounds', 0)} rounds; ms per setting-step: "
            + " | ".join(f"{k} {v:.3f}" for k, v in ms.items())
            + f" | overhead {100 * gd['overhead']:+.2f}%"
            + f" (best-of {100 * gd['overhead_best']:+.2f}%)"
        )
        targets.append(
            {"name": "divergence guard: extra step time", "value": gd["overhead"]}
            | {"target": 0.02, "op": "<=", "best": gd["overhead_best"]}
        )

    print("\ntargets (CPU targets)" if res["machine"]["backend"] != "cpu" else "\ntargets")
    for t in targets:
        t["status"] = verdict(t["value"], t["target"], t["op"] == ">=", t.get("best"))
        best = f", best-of {t['best']:.3f}" if "best" in t else ""
        goal = f"(target {t['op']} {t['target']})"
        print(f"   {t['status']:5s}  {t['name']}: {t['value']:.3f}{best} {goal}")
    return targets


PARTS: dict[str, Callable[[Sizes], dict]] = {
    "steps": bench_steps,
    "sweep": bench_sweep,
    "input": bench_input,
    "guard": bench_guard,
}
# The parts whose programs split settings over the devices: on a CPU host they run in a child
# process with one device per core (see MULTI_DEVICE_FLAG).
MULTI_DEVICE_PARTS = ("sweep", "guard")


def _multi_device_child(parts: Sequence[str], mode: str) -> dict:
    """Runs ``parts`` in a child process with one JAX device per CPU core.

    Args:
      parts: names from :data:`MULTI_DEVICE_PARTS`.
      mode: ``"full"``, ``"quick"`` or ``"gpu"``.

    Returns:
      The child's results (its JSON file).
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "parts.json")
        cmd = [sys.executable, os.path.abspath(__file__), MULTI_DEVICE_FLAG, "--quiet"]
        cmd += ["--only", ",".join(parts), "--out", out]
        if mode != "full":
            cmd.append(f"--{mode}")
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; see the module docstring.

    Args:
      argv: command-line arguments without the program name.

    Returns:
      Exit status (0; a missed target is a finding, not a failure).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="short run (1 to 2 minutes on 2 CPU cores)"
    )
    mode.add_argument("--gpu", action="store_true", help="sizes for a GPU (about 5 minutes)")
    parser.add_argument("--out", default="bench.json", help="JSON results file")
    parser.add_argument(
        "--only",
        default="steps,sweep,input,guard",
        help="comma-separated parts to run: steps (1 and 2), sweep (3), input (4), guard (5)",
    )
    # Internal: the child process of the multi-device parts, which prints no report.
    parser.add_argument(MULTI_DEVICE_FLAG, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "gpu" if args.gpu else "full"
    sz = SIZES[name]
    if args.gpu and jax.default_backend() == "cpu":
        print("warning: --gpu but no accelerator found; running the GPU sizes on CPU", flush=True)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    res: dict[str, Any] = {"mode": name, "sizes": dataclasses.asdict(sz), "machine": machine_info()}
    t0 = time.perf_counter()
    # On a CPU host with several cores the sweep's parts go to a child with one device per
    # core, after the single-device parts here (the two processes never run at once).
    cpu_host = jax.default_backend() == "cpu" and (os.cpu_count() or 1) > 1
    child = (
        [p for p in MULTI_DEVICE_PARTS if p in parts] if cpu_host and not args.multi_device else []
    )
    for part, fn in PARTS.items():
        if part in parts and part not in child:
            t = time.perf_counter()
            res[part] = fn(sz)
            print(f"[{part} done in {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    if child:
        t = time.perf_counter()
        sub = _multi_device_child(child, name)
        res.update({p: sub[p] for p in child})
        res["machine"]["devices_sweep_parts"] = sub["machine"]["devices"]
        WARMUP.update(sub["warmup_s"])
        ROUNDS.update(sub["rounds_s"])
        FAULTS.update(sub["round_faults"])
        took = time.perf_counter() - t
        print(f"[{', '.join(child)} done in {took:.0f} s, one device per core]", file=sys.stderr)
    res["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["seconds"] = time.perf_counter() - t0
    res["warmup_s"] = dict(WARMUP)
    res["rounds_s"] = dict(ROUNDS)
    res["round_faults"] = dict(FAULTS)
    if not args.quiet:
        res["targets"] = report(res)
        print(
            f"\ntotal {res['seconds']:.0f} s (first calls, mostly compiling:"
            f" {sum(WARMUP.values()):.0f} s); load avg at end {res['machine']['load_avg_end']}"
        )
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, default=str)
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
