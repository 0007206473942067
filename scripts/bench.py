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
   For reference, in the prox phase: the same step with float32 backward matmuls
   (``bf16_grads=False``), and with float32 matmuls throughout (``int_matmul=False``): the
   bfloat16 matmuls pay only on a CPU that multiplies bfloat16 natively (AVX-512 BF16, AMX).
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

**ResNet step** (``--only resnet``, not in the default parts): qsparse's joint training step of
``configs/resnet.py`` (ResNet-8 with BatchNorm, 4-bit weights and activations, 2X blocks,
learned steps and clips) over a plain Flax + optax Adam step of the same
``qsparse.models.ResNet`` with its batch statistics, batch 128, timed as part 1 times the MLP
(every phase, the worst the headline) except that on a CPU each timed call is a host loop of
the jitted step, as experiments.train runs a convolutional model there (XLA:CPU runs
convolutions far slower inside a ``lax.scan``); target: at most 1.3.

**CNN epoch** (``--only cnn``, not in the default parts): ``configs/lenet.py``'s network
(LeNet 32/64, 4-bit weights and activations, 2X blocks) measured the way training runs it:
epochs over the first Fashion-MNIST batches through ``training.make_epoch_runner`` (on a CPU a
host loop of the jitted step) and through the sweep's chunk program, per setting, against a
plain Flax + optax loop of a jitted step on the same device-resident data, batch 128 (target:
at most 1.2); and epochs of ``experiments.train`` against the plain loop's epoch plus its
test-split evaluation (target: at most 1.3). On a CPU the epochs are a fixed number of steps,
not the whole 468 (the report says so): two whole epochs of each side would take most of the
10 minutes.

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

``--only steps,sweep,input,guard`` runs a subset; ``--quick`` is a short run. Each comparison
stops after 75 s of rounds once it has its minimum, so a slow machine still finishes within
about 10 minutes; ``--gpu`` sizes the scans for an accelerator.
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
# the default single device, as experiments.train runs (with several host devices a
# single-device program's speed was unsteady).
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
# Reference forms of the joint step, timed in the prox phase beside the headline: name ->
# joint_plan flags.
REFERENCE_STEPS = {
    "float32 grads": dict(bf16_grads=False),
    "float32 matmuls": dict(int_matmul=False, bf16_grads=False),
}


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
    # Rounds enough for medians that hold still on a shared machine; the rows nearest their
    # targets get the most. Each stops after 75 s of rounds once it has 9.
    "full": Sizes(
        step_reps={128: 21, 1024: 9},
        min_reps=9,
        budget_s=75.0,
        step_batches=(128, 1024),
        # Long enough that each call's fresh output pages weigh little, as in a training
        # epoch; short enough that a slow machine finishes within 10 minutes.
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
# Program name -> the process's minor page faults during each timed call (fresh output pages
# cost time that is no part of a training step's cost).
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


def plain_step(model: nn.Module, tx):
    """The plain FP32 step ``(state, (x, y)) -> (state, metrics)`` of a params-only model, with
    the same metrics as qsparse's step, so both sides do the same bookkeeping."""

    def step(state, batch):
        params, opt_state = state
        x, y = batch

        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, jnp.mean(jnp.argmax(logits, -1) == y)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "accuracy": acc, "finite": jnp.isfinite(loss)}
        return (optax.apply_updates(params, updates), opt_state), metrics

    return step


def plain_setup(hidden, sample_x):
    """Plain FP32 Adam step ``(state, batch) -> (state, metrics)`` and its initial state."""
    model = PlainMLP(hidden=tuple(hidden))
    params = model.init(jax.random.key(0), sample_x)["params"]
    tx = optax.adam(LEARNING_RATE)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return plain_step(model, tx), (params, tx.init(params)), n_params


def joint_plan(
    model: nn.Module, sample_x, *, int_matmul: bool = True, bf16_grads: bool = True, **overrides
):
    """The joint setting on every layer: 2-bit weights and activations, 4X blocks (8,8) on
    hidden layers and (8,2) on the logits layer, learned weight steps and clips, and (as
    ``configs/joint.py``) the forward matmuls after the first layer on integer codes
    (``int_matmul``; False: float32 matmuls of the fake-quantized operands), their backward
    matmuls in bfloat16 (``bf16_grads``; False: float32 gradients)."""
    common = dict(w_bits=2, a_bits=2, compression=4, scale_mode="learned", learn_clip=True)
    codes = dict(int_matmul=True, bf16_grads=bf16_grads) if int_matmul else {}
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
    # For reference, not targets, in the prox phase: the same joint step with float32 backward
    # matmuls in the integer-code layers, and with no integer-code matmuls at all (bfloat16
    # matmuls pay only where the CPU multiplies bfloat16 natively).
    for ref, flags in REFERENCE_STEPS.items():
        f_plan, f_spec = joint_plan(model, xy[0], **flags)
        f_run = scan_steps(training.make_train_step(model, f_plan, timed), n)
        f_state = phase_states(
            training.init_state(model, f_plan, timed, f_spec, jax.random.key(0), xy[0]), sched
        )["prox"]
        programs[f"prox, {ref}"] = lambda f_run=f_run, f_state=f_state, f_spec=f_spec: f_run(
            f_state, xy, f_spec
        )
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
        "ratio_reference": {
            ref: [
                paired_ratio(t[f"prox, {ref}"], t["plain"]),
                best_ratio(t[f"prox, {ref}"], t["plain"]),
            ]
            for ref in REFERENCE_STEPS
        },
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
    """The input comparison's data and programs.

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
    n, steps, note = len(labels), su["steps"], su["note"]
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    programs = {
        # A fresh key per call: every timed epoch is shuffled anew, as in training.
        "epoch": lambda: epoch(state, images, labels, next(keys), spec),
        "constant": lambda: const(state, fixed, spec),
        # The machine's streaming bandwidth in the same rounds: the epoch's extra memory
        # traffic costs more when it is low.
        "stream": stream_program(),
    }
    t = race(programs, sz.input_reps, tag="input/", min_reps=sz.min_reps, budget_s=sz.budget_s)
    return {
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


# --- ResNet step (--only resnet) -------------------------------------------------------------

RESNET_RATIO_TARGET = 1.3  # ResNet's joint step / the plain Flax ResNet step, batch 128
# Steps per timed call and rounds, per mode. On 2 CPU cores a ResNet-8 step at batch 128 on
# 28x28 images takes 0.3-0.5 s (as a top-level program; see loop_steps): 2 steps a call, and
# 21 rounds of the five programs took about 70 s here, within the 75 s budget.
RESNET_STEPS = {"full": 2, "quick": 1, "gpu": 200}
RESNET_REPS = {"full": 21, "quick": 3, "gpu": 7}


def loop_steps(step: Callable, n: int, plan) -> Callable:
    """``run(state, batch, *args)``: ``n`` steps on one batch, in the form training runs them.

    The form is :func:`qsparse.training.pick_loop`'s for ``plan``: a host loop of the one
    jitted step for a convolutional model on the CPU (jax-ml/jax#12868), the dispatch it adds
    the same on both sides; else :func:`scan_steps`.
    """
    if training.pick_loop(plan) == "scan":
        return scan_steps(step, n)
    one = jax.jit(step)

    def run(state, batch, *args):
        for _ in range(n):
            state, m = one(state, batch, *args)
        return state, m["loss"]

    run.step = one  # for cost_of: one compiled step
    return run


def resnet_setup(batch: int = 128):
    """configs/resnet.py's network and plan (its rules: 4-bit weights and activations, 2X
    blocks, learned steps and clips) with a joint spec, and the plain Flax + optax Adam step
    of the same ``qsparse.models.ResNet`` with its batch statistics.

    Args:
      batch: batch size of the synthetic 28x28x1 batch.

    Returns:
      A dict: ``model``, ``plan``, ``spec``, ``xy`` (the batch), ``plain_step``,
      ``plain_state`` (``(params, batch_stats, adam state)``), ``params`` (their count),
      ``config``.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # configs/ is a directory of the repository, not a package
        sys.path.insert(0, root)
    from configs import resnet as resnet_config
    from experiments import common

    config = resnet_config.get_config()
    xy = synthetic_batch(batch)
    model = common.build_model(config, 10)
    plan, _ = common.build_plan(config, model, xy[0].shape[1:])
    spec = training.make_spec(
        plan.init_spec(),
        learning_rate=LEARNING_RATE,
        prox_strength=config.sparsity.prox_strength,
    )
    variables = model.init(jax.random.key(0), xy[0][:1], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(LEARNING_RATE)

    def plain_step(state, batch_):
        params, batch_stats, opt_state = state
        x, y = batch_

        def loss_fn(p):
            logits, new = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (jnp.mean(jnp.argmax(logits, -1) == y), new["batch_stats"])

        (loss, (acc, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        # Same metrics as qsparse's step, so both sides do the same bookkeeping.
        metrics = {"loss": loss, "accuracy": acc, "finite": jnp.isfinite(loss)}
        return (optax.apply_updates(params, updates), batch_stats, opt_state), metrics

    return {
        "model": model,
        "plan": plan,
        "spec": spec,
        "xy": xy,
        "plain_step": plain_step,
        "plain_state": (params, batch_stats, tx.init(params)),
        "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)),
        "config": config,
    }


def bench_resnet(sz: Sizes) -> dict:
    """ResNet's joint step against the plain Flax ResNet step, batch 128, every phase.

    The joint step is :func:`qsparse.training.make_train_step` of configs/resnet.py's network
    and plan (ResNet-8 with BatchNorm; 4-bit weights and activations, 2X blocks, learned LSQ
    steps and PACT clips, the prox before pruning, masks), the plain step Flax + optax Adam on
    the same ``qsparse.models.ResNet`` and its batch statistics; both run the same steps on
    the same batch (:func:`loop_steps`), timed as :func:`step_batch` times the MLP: phases of
    :data:`STEP_SCHEDULE`, the pruning phase with its mask update amortized, the worst phase
    the headline.
    """
    mode = next(k for k, v in SIZES.items() if v == sz)
    n, reps, batch = RESNET_STEPS[mode], RESNET_REPS[mode], 128
    sched = STEP_SCHEDULE
    timed = dataclasses.replace(sched, prune_every=max(sched.prune_every, n + 1))
    su = resnet_setup(batch)
    model, plan, spec, xy = su["model"], su["plan"], su["spec"], su["xy"]
    p_run = loop_steps(su["plain_step"], n, plan)
    p_state = su["plain_state"]
    j_state = training.init_state(model, plan, timed, spec, jax.random.key(0), xy[0][:1])
    j_run = loop_steps(training.make_train_step(model, plan, timed), n, plan)
    # One step's cost (a scan's analysis counts its body once: one step too).
    cost = {
        "plain": cost_of(getattr(p_run, "step", p_run), p_state, xy),
        "joint": cost_of(getattr(j_run, "step", j_run), j_state, xy, spec),
    }
    states = phase_states(j_state, sched)
    programs = {"plain": lambda: p_run(p_state, xy)}
    for name, st in states.items():
        programs[name] = lambda st=st: j_run(st, xy, spec)
    e_run = loop_steps(
        training.make_train_step(model, plan, dataclasses.replace(timed, prune_every=1)), n, plan
    )
    programs["prune, update every step"] = lambda: e_run(states["prune"], xy, spec)
    t = race(programs, reps, tag="resnet/", min_reps=sz.min_reps, budget_s=sz.budget_s)
    upd = [(e - a) / n for e, a in zip(t["prune, update every step"], t["prune"])]
    t["prune"] = [a + u * n / sched.prune_every for a, u in zip(t["prune"], upd)]
    phases = ("prox", "prune", "finetune")
    ratios = {k: paired_ratio(t[k], t["plain"]) for k in phases}
    worst = max(ratios, key=ratios.get)
    c = su["config"]
    return {
        "model": f"resnet-{c.model.depth} {tuple(c.model.channels)}",
        "setting": f"w{c.quant.w_bits}/a{c.quant.a_bits} {c.sparsity.compression:g}x blocks",
        "batch": batch,
        "steps_per_call": n,
        "rounds": len(t["plain"]),
        "params": su["params"],
        "ms_per_step": {k: 1e3 * med(t[k]) / n for k in ("plain", *phases)},
        "mask_update_ms": 1e3 * med(upd),
        "ratio": ratios,
        "ratio_best": {k: best_ratio(t[k], t["plain"]) for k in phases},
        "worst_phase": worst,
        "worst_ratio": ratios[worst],
        "cost_plain": cost["plain"],
        "cost_joint": cost["joint"],
        "loop": "host" if hasattr(j_run, "step") else "scan",
        "compiles": {
            "plain": compiles(getattr(p_run, "step", p_run)),
            "joint": compiles(getattr(j_run, "step", j_run)),
        },
    }


def report_resnet(rn: dict) -> list[dict]:
    """Prints the ResNet step comparison; returns its target row."""
    ms, r, rb = rn["ms_per_step"], rn["ratio"], rn["ratio_best"]
    print(
        f"\nResNet step (--only resnet): configs/resnet.py, {rn['model']}, {rn['params']}"
        f" params, {rn['setting']}, batch {rn['batch']}, {rn['steps_per_call']} steps per call"
        f" ({rn['loop']} loop)"
    )
    print(
        f"   {rn['rounds']} rounds; ms/step: plain {ms['plain']:.1f} | prox {ms['prox']:.1f}"
        f" | prune* {ms['prune']:.1f} | finetune {ms['finetune']:.1f}"
        f" | mask update {rn['mask_update_ms']:.1f} ms"
    )
    print(
        "   ratio prox/prune/finetune: median (best-of) "
        + " / ".join(f"{r[k]:.2f} ({rb[k]:.2f})" for k in ("prox", "prune", "finetune"))
    )
    cp, cj = rn["cost_plain"], rn["cost_joint"]
    if cp and cj:
        print(
            f"   XLA cost of one step: plain {cp['bytes'] / 1e6:.1f} MB {cp['flops'] / 1e9:.2f}"
            f" GFLOP | joint {cj['bytes'] / 1e6:.1f} MB {cj['flops'] / 1e9:.2f} GFLOP"
        )
    return [
        {
            "name": f"ResNet's joint step / the plain Flax ResNet step, batch {rn['batch']}"
            f" (worst: {rn['worst_phase']})",
            "value": rn["worst_ratio"],
            "best": max(rb.values()),
            "target": RESNET_RATIO_TARGET,
            "op": "<=",
        }
    ]


# --- CNN epoch (--only cnn) ------------------------------------------------------------------

CNN_RATIO_TARGET = 1.2  # configs/lenet.py's network: qsparse's training loop / plain step loop
CNN_TRAIN_TARGET = 1.3  # an experiments.train epoch of configs/lenet.py / the plain loop's
# The settings (w_bits, a_bits, compression) of the sweep's chunk: configs/lenet.py's first.
CNN_SWEEP_SETTINGS = ((4, 4, 2), (2, 2, 4), (8, 8, 2), (4, 2, 4))
# Per mode: steps of each timed epoch of the loop comparison (None: the whole split), its
# rounds and the settings of the sweep's chunk; steps per epoch of the experiments.train
# comparison (None: the whole split) and its epochs (the first compiles). On 2 CPU cores a
# LeNet 32/64 step at batch 128 takes 0.15-0.25 s, so two whole Fashion-MNIST epochs (468
# steps) of experiments.train and two of the plain loop would take most of the bench's 10
# minutes: the CPU modes time a fixed number of steps per epoch, and the report says so.
CNN_SIZES = {
    "full": {"steps": 8, "reps": 9, "settings": 2, "train_steps": 48, "train_epochs": 3},
    "quick": {"steps": 4, "reps": 3, "settings": 2, "train_steps": 12, "train_epochs": 2},
    "gpu": {"steps": None, "reps": 5, "settings": 4, "train_steps": None, "train_epochs": 3},
}


def fashion_mnist() -> tuple[qdata.Dataset, str]:
    """Fashion-MNIST, or synthetic data of its shape and a note saying so."""
    try:
        return qdata.load("fashion_mnist"), ""
    except (FileNotFoundError, ModuleNotFoundError, OSError) as e:
        note = f"fashion_mnist unavailable ({type(e).__name__}): synthetic data used"
        return qdata.load("synthetic", synthetic_size=(60000, 10000)), note


def first_batches(ds: qdata.Dataset, steps: int | None, batch: int) -> qdata.Dataset:
    """``ds`` with its training split cut to its first ``steps`` batches (None: all of it)."""
    if steps is None:
        return ds
    n = steps * batch
    return dataclasses.replace(ds, train_x=ds.train_x[:n], train_y=ds.train_y[:n])


def plain_cnn(model: nn.Module, sample_x, batch: int = 128) -> dict:
    """The reference training loop in plain Flax + optax, as one writes it for a CNN on a CPU.

    A jitted Adam FP32 step that gathers its batch from the device-resident uint8 images
    (state donated), stepped from the host over a jitted shuffle of the epoch; a jitted
    evaluation batch, looped over the test split.

    Returns:
      A dict: ``state`` (params, Adam state), ``epoch(state, images, labels, key) -> (state,
      per-step metrics)``, ``evaluate(params, images, labels) -> accuracy``.
    """
    import functools

    params = model.init(jax.random.key(0), sample_x)["params"]
    tx = optax.adam(LEARNING_RATE)

    one = plain_step(model, tx)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, images, labels, idx):
        return one(state, (images[idx].astype(jnp.float32) / 255.0, labels[idx]))

    @functools.partial(jax.jit, static_argnums=1)
    def shuffle(key, n):
        return jax.random.permutation(key, n)[: n // batch * batch].reshape(-1, batch)

    def epoch(state, images, labels, key):
        order = shuffle(key, images.shape[0])
        ms = []
        for i in range(order.shape[0]):
            state, m = step(state, images, labels, order[i])
            ms.append(m)
        return state, ms

    @jax.jit
    def correct(params, x, y):
        logits = model.apply({"params": params}, x.astype(jnp.float32) / 255.0)
        return jnp.sum(jnp.argmax(logits, -1) == y)

    def evaluate(params, images, labels, size=1000):
        n = images.shape[0]
        hits = [
            correct(params, images[i : i + size], labels[i : i + size]) for i in range(0, n, size)
        ]
        return sum(hits) / n

    return {"state": (params, tx.init(params)), "epoch": epoch, "evaluate": evaluate}


def bench_cnn(sz: Sizes) -> dict:
    """configs/lenet.py's network through qsparse's training loop against a plain Flax loop.

    1. Loop: epochs of :data:`CNN_SIZES` steps over the first Fashion-MNIST batches, through
       :func:`qsparse.training.make_epoch_runner` (the form training picks: on a CPU a host
       loop of the jitted step) and through the sweep's chunk program
       (``experiments.sweep.make_program``, per setting, ``map`` and ``vmap``), against the
       plain loop of :func:`plain_cnn`; batch 128, device-resident data, qsparse's states
       placed at the start of the pruning phase of the config's schedule.
    2. experiments.train: epochs of configs/lenet.py through ``train_and_evaluate`` (the
       epoch time it measures: the epoch, the test-split evaluation, fetching the metrics)
       against the plain loop's epochs plus their evaluation of the test split, timed before
       and after it; the first epoch of each (compiling) is left out.
    """
    import contextlib
    import io
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # configs/ is a directory of the repository, not a package
        sys.path.insert(0, root)
    from configs import lenet
    from experiments import common, sweep
    from experiments import train as train_mod

    mode = next(k for k, v in SIZES.items() if v == sz)
    cs = CNN_SIZES[mode]
    ds, note = fashion_mnist()
    config = lenet.get_config()
    batch = config.batch_size
    run = common.build_run(config, ds)  # the whole split's schedule, as training runs it
    part = first_batches(ds, cs["steps"], batch)
    images, labels = jax.device_put((part.train_x, part.train_y))
    steps = len(part.train_y) // batch
    keys = iter(jax.random.split(jax.random.key(1), 100000))
    at = run.sched.prune_begin

    # 1. The loop: qsparse's epoch, the sweep's per-setting loop, the plain loop.
    spec = common.make_spec(run)
    ours = training.make_epoch_runner(run.model, run.plan, run.sched, batch)
    plain = plain_cnn(run.model, qdata.normalize(images[:1]), batch)
    n_set = cs["settings"]
    values = CNN_SWEEP_SETTINGS[:n_set]
    mesh = Mesh(np.array(jax.devices()[:1]), ("settings",))
    per, rep = NamedSharding(mesh, P("settings")), NamedSharding(mesh, P())
    spec_list = [common.make_spec(run, w_bits=w, a_bits=a, compression=c) for w, a, c in values]
    progs = {v: sweep.make_program(run, ("lenet",), mesh, v) for v in ("map", "vmap")}

    def chunk_state():  # fresh arrays per program: each donates its own
        states = [at_step(common.init_state(run, sp, i), at) for i, sp in enumerate(spec_list)]
        return jax.device_put(sweep.stack(states), per)

    box = {"qsparse": at_step(common.init_state(run, spec, 0), at), "plain": plain["state"]}
    box.update({f"sweep {v}": chunk_state() for v in progs})
    specs = jax.device_put(sweep.stack(spec_list), per)
    images_r, labels_r = jax.device_put((images, labels), rep)

    def run_ours():
        box["qsparse"], m = ours(box["qsparse"], images, labels, next(keys), spec)
        return box["qsparse"], m

    def run_plain():
        box["plain"], ms = plain["epoch"](box["plain"], images, labels, next(keys))
        return box["plain"], ms

    def run_chunk(v):
        k = jax.device_put(jax.random.split(next(keys), n_set), per)
        name = f"sweep {v}"
        box[name], m = progs[v].epoch(box[name], images_r, labels_r, k, specs)
        return box[name], m

    programs = {"plain": run_plain, "qsparse": run_ours}
    programs.update({f"sweep {v}": (lambda v=v: run_chunk(v)) for v in progs})
    t = race(programs, cs["reps"], tag="cnn/", min_reps=min(5, cs["reps"]), budget_s=sz.budget_s)
    per_step = {k: [s / steps for s in v] for k, v in t.items()}
    for v in progs:
        per_step[f"sweep {v}"] = [s / n_set for s in per_step[f"sweep {v}"]]
    ratio = {k: paired_ratio(per_step[k], per_step["plain"]) for k in programs if k != "plain"}
    best = {k: best_ratio(per_step[k], per_step["plain"]) for k in ratio}

    # 2. experiments.train against the plain loop, epochs over the first train_steps batches.
    tpart = first_batches(ds, cs["train_steps"], batch)
    epochs = cs["train_epochs"]
    tx_, ty_ = jax.device_put((tpart.train_x, tpart.train_y))
    vx, vy = jax.device_put((ds.test_x, ds.test_y))
    box["plain epoch"] = plain_cnn(run.model, qdata.normalize(tx_[:1]), batch)["state"]  # fresh

    def plain_epochs(count):
        """Epochs of the plain loop, each its steps, its test accuracy and its metrics fetched
        (as experiments.train times an epoch): ``(seconds, of which evaluating)`` each."""
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            box["plain epoch"], ms = plain["epoch"](box["plain epoch"], tx_, ty_, next(keys))
            jax.block_until_ready((box["plain epoch"], ms))
            t1 = time.perf_counter()
            jax.device_get((ms, plain["evaluate"](box["plain epoch"][0], vx, vy)))
            out.append((time.perf_counter() - t0, time.perf_counter() - t1))
        return out

    c = lenet.get_config()
    c.num_epochs = epochs
    c.sparsity.prune_begin_epoch, c.sparsity.prune_end_epoch = 1, max(1, epochs - 1)
    # The plain loop's epochs before and after experiments.train's (its first compiles), so
    # that a drift in the machine's load weighs on both sides.
    plain_s = plain_epochs(epochs)[1:]
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
        res = train_mod.train_and_evaluate(c, os.path.join(d, "lenet"), dataset=tpart)
    plain_s += plain_epochs(epochs - 1)
    train_steps = len(tpart.train_y) // batch
    train_s = [train_steps / row["steps_per_second"] for row in res["history"]][1:]
    return {
        "model": f"lenet {tuple(config.model.channels)} dense {tuple(config.model.hidden)}",
        "setting": f"w{config.quant.w_bits}/a{config.quant.a_bits}"
        f" {config.sparsity.compression:g}x blocks",
        "dataset": ds.name,
        "note": note,
        "backend": jax.default_backend(),
        "batch": batch,
        "loop": ours.loop,
        "steps_per_epoch": steps,
        "full_epoch_steps": len(ds.train_y) // batch,
        "rounds": len(t["plain"]),
        "sweep_settings": [list(v) for v in values],
        "ms_per_step": {k: 1e3 * med(v) for k, v in per_step.items()},
        "ratio": ratio,
        "ratio_best": best,
        "train": {
            "steps_per_epoch": train_steps,
            "epochs": epochs,
            "plain_s": [a for a, _ in plain_s],
            "plain_eval_s": [b for _, b in plain_s],
            "train_s": train_s,
            "ratio": med(train_s) / med([a for a, _ in plain_s]),
            "ratio_best": min(train_s) / min(a for a, _ in plain_s),
            "test_accuracy": res["test_accuracy"],
        },
    }


def report_cnn(cn: dict) -> list[dict]:
    """Prints the CNN comparison; returns its target rows."""
    ms, r, rb, tr = cn["ms_per_step"], cn["ratio"], cn["ratio_best"], cn["train"]
    full = cn["full_epoch_steps"]
    print(
        f"\nCNN (--only cnn): configs/lenet.py, {cn['model']}, {cn['setting']}, {cn['dataset']},"
        f" batch {cn['batch']}; qsparse's epoch runs as a {cn['loop']} loop"
        + (f"  NOTE: {cn['note']}" if cn["note"] else "")
    )
    cut = "" if cn["steps_per_epoch"] == full else f" (a fixed {cn['steps_per_epoch']} of {full})"
    print(
        f"   epochs of {cn['steps_per_epoch']} steps{cut}, {cn['rounds']} rounds; ms per step"
        f" (sweep: per setting-step, chunk of {len(cn['sweep_settings'])}): "
        + " | ".join(f"{k} {v:.1f}" for k, v in ms.items())
    )
    print(
        "   ratio to plain: median (best-of) "
        + " | ".join(f"{k} {r[k]:.2f} ({rb[k]:.2f})" for k in r)
    )
    tfull = tr["steps_per_epoch"] == full
    print(
        f"   experiments.train epoch (epoch + test evaluation) of {tr['steps_per_epoch']} steps"
        + ("" if tfull else f" (a fixed number of steps, not the whole {full}-step epoch)")
        + ": "
        + " / ".join(f"{s:.2f}" for s in tr["train_s"])
        + " s | plain (before and after) "
        + " / ".join(f"{s:.2f}" for s in tr["plain_s"])
        + " s, of which evaluating "
        + " / ".join(f"{s:.2f}" for s in tr["plain_eval_s"])
        + f" s | ratio {tr['ratio']:.2f} (best-of {tr['ratio_best']:.2f})"
    )
    if cn.get("backend") == "cpu":
        print(
            f"   the sweep's loop with vectorize='vmap' ({r['sweep vmap']:.2f} per setting, a"
            " reference, not a target) batches each convolution over the settings (a grouped"
            " convolution); on a CPU 'map' runs them one after another, each a plain one"
        )
    what = "" if tfull else f" ({tr['steps_per_epoch']} steps)"
    return [
        {
            "name": "CNN: qsparse's epoch / the plain loop's, per step",
            "value": r["qsparse"],
            "best": rb["qsparse"],
            "target": CNN_RATIO_TARGET,
            "op": "<=",
        },
        {
            "name": "CNN: the sweep's loop (map) per setting / the plain loop",
            "value": r["sweep map"],
            "best": rb["sweep map"],
            "target": CNN_RATIO_TARGET,
            "op": "<=",
        },
        {
            "name": f"CNN: an experiments.train epoch{what} / the plain loop's",
            "value": tr["ratio"],
            "best": tr["ratio_best"],
            "target": CNN_TRAIN_TARGET,
            "op": "<=",
        },
    ]


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


def report_steps(st: dict) -> list[dict]:
    """Prints parts 1 and 2 (step time, training FLOP/s); returns their target rows."""
    targets = []
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
    for ref, flags in REFERENCE_STEPS.items():
        print(
            f"   the joint step with {ref} ({', '.join(f'{k}={v}' for k, v in flags.items())}),"
            " prox phase, for reference: "
            + ", ".join(
                f"batch {b} {e['ratio_reference'][ref][0]:.2f} ({e['ratio_reference'][ref][1]:.2f})"
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
    return targets


def report(res: dict) -> list[dict]:
    """Prints the tables; returns the target rows."""
    m = res["machine"]
    print(f"machine : {m['devices']} backend={m['backend']} cpu_count={m['cpu_count']}")
    print(f"          {m['platform']}; load avg at start {m['load_avg_start']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print(f"mode    : {res['mode']}; timing: jitted lax.scan of N steps per call for both sides,")
    print("          compile excluded, round-robin rounds, median of per-round ratios")
    targets = []

    if res.get("steps"):
        targets += report_steps(res["steps"])

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

    if res.get("resnet"):
        targets += report_resnet(res["resnet"])
    if res.get("cnn"):
        targets += report_cnn(res["cnn"])

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
    "resnet": bench_resnet,  # not in --only's default: ask for it
    "cnn": bench_cnn,  # not in --only's default either
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
        help="comma-separated parts to run: steps (1 and 2), sweep (3), input (4), guard (5),"
        " resnet (the ResNet step; not run by default), cnn (the LeNet epoch; not run by"
        " default)",
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
