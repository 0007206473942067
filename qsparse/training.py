"""Pure training and evaluation steps for a wrapped model, driven by a spec of values.

``train_step(state, batch, spec) -> (state, metrics)`` is one pure function: the optimizer
(inner Adam with warmup + cosine decay, proximal block lasso, gradual pruning, mask keeping)
is built *inside* the traced step from the spec's values, so the same compiled program serves
every bit width, compression, learning rate and prox strength, and ``jax.vmap`` over a
stacked spec trains a sweep. Only shapes and the phase boundaries (:class:`Schedule`) are
static.

The spec is ``{"layers": plan spec, "learning_rate": f32, "prox_strength": f32}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qsparse import data, optim
from qsparse.wrap import Plan

PARAMS = "params"  # the model's parameters inside the trainable tree
QUANT = "quant"  # the quantizers' trainable parameters (LSQ steps, PACT clips)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Static facts of a training run (steps and phase boundaries).

    Attributes:
      total_steps: optimizer steps in the run.
      prune_begin: first pruning step (the block-lasso prox runs before it).
      prune_end: step at which the target compression is reached; masks frozen after it.
      prune_every: steps between mask updates while pruning.
      warmup_steps: linear learning-rate warmup.
      balanced: ``"none"``, ``"rows"`` or ``"columns"`` (:func:`qsparse.sparsity.block_keep`).
      scope: ``"layer"`` or ``"global"`` block budget.
      weight_decay: decoupled weight decay (AdamW) on kernels.
      distill_weight: weight of the distillation loss when teacher logits are given.
      distill_temperature: softmax temperature for distillation.
      dampen: weight of the oscillation-dampening term added to the loss
        (:meth:`qsparse.wrap.Plan.level_penalty`; 0 = off).
    """

    total_steps: int
    prune_begin: int
    prune_end: int
    prune_every: int = 50
    warmup_steps: int = 0
    balanced: bool | str = False
    scope: str = "layer"
    weight_decay: float = 0.0
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    dampen: float = 0.0

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} is not allowed: use >= 1")
        if not 0 <= self.prune_begin <= self.prune_end <= self.total_steps:
            raise ValueError(
                f"prune schedule begin={self.prune_begin}, end={self.prune_end} is not allowed:"
                f" need 0 <= begin <= end <= total_steps={self.total_steps}"
            )
        # The last optimizer step has count total_steps - 1: a schedule that ends at
        # total_steps would never take its final mask update, and miss the target.
        last = self.total_steps - 1
        object.__setattr__(self, "prune_end", min(self.prune_end, last))
        object.__setattr__(self, "prune_begin", min(self.prune_begin, self.prune_end))


class TrainState(NamedTuple):
    """Everything that changes during training.

    Attributes:
      step: int32 step counter.
      params: ``{"params": model params, "quant": quantizer params}``.
      opt_state: the optimizer state (holds the masks).
      model_state: the model's other collections (batch statistics; NNX RNG counters),
        updated by every step and used by evaluation.
      rng: uint32 key data; step ``t`` draws dropout from ``fold_in(rng, t)``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = ()
    rng: Any = ()


def make_spec(layers_spec, *, learning_rate, prox_strength=0.0) -> dict:
    """Assembles a training spec.

    Args:
      layers_spec: :meth:`qsparse.wrap.Plan.init_spec` output.
      learning_rate: peak learning rate (value > 0).
      prox_strength: block-lasso strength ``lambda`` (value >= 0); the prox threshold per step
        is ``learning_rate(step) * prox_strength``.

    Returns:
      The spec dict.
    """
    return {
        "layers": layers_spec,
        "learning_rate": jnp.asarray(learning_rate, jnp.float32),
        "prox_strength": jnp.asarray(prox_strength, jnp.float32),
    }


def lr_schedule(spec, sched: Schedule):
    """Linear warmup then cosine decay to zero, peak ``spec["learning_rate"]``.

    Args:
      spec: the spec.
      sched: the schedule.

    Returns:
      An optax schedule (step -> learning rate).
    """
    peak = spec["learning_rate"]
    warm = max(sched.warmup_steps, 0)

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        w = jnp.minimum(1.0, (step + 1) / max(warm, 1)) if warm else 1.0
        frac = jnp.clip((step - warm) / max(sched.total_steps - warm, 1), 0.0, 1.0)
        return peak * w * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return fn


def make_optimizer(plan: Plan, sched: Schedule, spec) -> optax.GradientTransformation:
    """The optimizer for one spec: Adam(W) + block lasso prox + gradual pruning + masks.

    Args:
      plan: the wrapping plan.
      sched: the schedule.
      spec: the spec (values may be traced).

    Returns:
      An ``optax.GradientTransformation`` over ``{"params", "quant"}`` trees.
    """
    lr = lr_schedule(spec, sched)
    shapes = plan.block_shapes((PARAMS,))
    if not shapes:
        if sched.weight_decay:
            return optax.adamw(lr, weight_decay=sched.weight_decay, mask=_kernels_only)
        return optax.adam(lr)
    # The prox threshold is t * lambda with t the current step size (proximal gradient).
    lam = spec["prox_strength"]
    return optim.block_sparse_adam(
        lr,
        shapes,
        plan.compressions(spec["layers"], (PARAMS,)),
        weight_decay=sched.weight_decay,
        decay_mask=_kernels_only,
        prox_strength=lambda count: lr(count) * lam,
        begin=sched.prune_begin,
        end=sched.prune_end,
        frequency=sched.prune_every,
        balanced=sched.balanced,
        scope="layer" if sched.scope == "layer" else "global",
    )


def _dropout_key(state: TrainState):
    """Step ``t``'s dropout key, ``fold_in(rng, t)`` (a fixed base for states without one)."""
    has = not isinstance(state.rng, tuple)
    base = jax.random.wrap_key_data(state.rng) if has else jax.random.key(0)
    return jax.random.fold_in(base, state.step)


def _cross_entropy(logits, labels):
    """Per-example cross entropy over the last axis (sequence models: mean over positions)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return ce.reshape(ce.shape[0], -1).mean(-1) if ce.ndim > 1 else ce


def _kernels_only(tree):
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: optim.path_str(kp).endswith("kernel"), tree
    )


@jax.custom_batching.custom_vmap
def _per_setting(x, like):
    """``x`` itself; under ``jax.vmap``, ``x`` given the batch axis of ``like`` if it lacks one.

    A sweep shares its data batch between settings while their kernels are batched. JAX then
    folds the settings axis of a kernel into its matmul's output dimension, which costs a
    transpose of the first layer's stacked kernel (forward) and of its gradient (backward)
    on every step: the largest memory traffic of a vmapped step of a small model on a CPU.
    A per-setting copy of the input batch (small) makes every matmul a plain batched one.
    """
    del like
    return x


@_per_setting.def_vmap
def _per_setting_vmap(axis_size, in_batched, x, like):
    del like
    if in_batched[0]:
        return x, True
    return jnp.broadcast_to(x, (axis_size, *x.shape)), True


def init_state(
    model, plan: Plan, sched: Schedule, spec, key, sample_x, *, params=None, model_state=None
) -> TrainState:
    """Initial parameters, model state, quantizer parameters and optimizer state.

    Args:
      model: the model given to :func:`qsparse.wrap.make_plan` (Linen or NNX).
      plan: its plan.
      sched: the schedule.
      spec: the spec (LSQ steps start from its bit widths).
      key: PRNG key for the parameters (Linen) and for dropout.
      sample_x: an input batch (shapes only matter).
      params: start from these model parameters (e.g. a trained FP32 network's) instead of
        fresh ones; the weight quantizers' steps are then initialised from them.
      model_state: start from these other collections (batch statistics) too.

    Returns:
      A :class:`TrainState` at step 0.

    Raises:
      ValueError: ``params`` or ``model_state`` do not have the model's structure and shapes.
    """
    del model  # the plan holds it
    init_key, drop_key = jax.random.split(key)
    fresh, fresh_state = plan.init_variables(init_key, sample_x)
    params = fresh if params is None else _like("params", params, fresh)
    model_state = (
        fresh_state if model_state is None else _like("model_state", model_state, fresh_state)
    )
    tree = {PARAMS: params, QUANT: plan.init_qparams(params, spec["layers"])}
    opt_state = make_optimizer(plan, sched, spec).init(tree)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=tree,
        opt_state=opt_state,
        model_state=model_state,
        rng=jax.random.key_data(drop_key),
    )


def _like(name: str, given, fresh):
    """``given`` as arrays, checked against the structure and shapes of ``fresh``."""
    got = jax.tree_util.tree_flatten_with_path(given)[0]
    want = jax.tree_util.tree_flatten_with_path(fresh)[0]
    if [p for p, _ in got] != [p for p, _ in want]:
        missing = {jax.tree_util.keystr(p) for p, _ in want} ^ {
            jax.tree_util.keystr(p) for p, _ in got
        }
        raise ValueError(
            f"{name} do not match the model's: these paths differ: {sorted(missing)[:3]}"
        )
    for (path, g), (_, f) in zip(got, want):
        if jnp.shape(g) != jnp.shape(f):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has shape {jnp.shape(g)}: the model's is"
                f" {jnp.shape(f)}"
            )
    return jax.tree.map(lambda g, f: jnp.asarray(g, f.dtype), given, fresh)


def logits_fn(model, plan: Plan, params, spec, x, model_state=None):
    """Logits of the wrapped model in evaluation mode.

    Args:
      model: the model given to :func:`qsparse.wrap.make_plan`.
      plan: its plan.
      params: ``{"params", "quant"}`` tree.
      spec: the spec.
      x: input batch.
      model_state: the model's other collections (batch statistics), if any.

    Returns:
      The model's output (``(batch, classes)`` logits).
    """
    return _apply(model, plan, params, spec, x, model_state or None)


def _apply(model, plan: Plan, params, spec, x, model_state, *, train=False, rng=None):
    """``plan.apply`` on a ``{"params", "quant"}`` tree and a spec (train mode: with the
    updated model state)."""
    return plan.apply(
        model,
        params[PARAMS],
        params[QUANT],
        spec["layers"],
        x,
        state=model_state,
        train=train,
        rng=rng,
    )


def make_train_step(model, plan: Plan, sched: Schedule, *, guard: bool = True):
    """Builds the pure training step.

    Args:
      model: the Linen model.
      plan: its plan.
      sched: the schedule.
      guard: report ``finite`` (the divergence guard); ``False`` only to measure its cost.

    Returns:
      ``train_step(state, batch, spec) -> (state, metrics)`` where ``batch`` is
      ``(x, y)`` or ``(x, y, teacher_logits)``; metrics hold ``loss``, ``accuracy`` and
      ``finite`` (False when the loss is NaN/inf). A diverged setting is only flagged: under
      ``vmap`` each setting is independent, so its NaNs cannot reach the others, and a flag
      costs one scalar test instead of a select over the whole state.

      Under ``jax.vmap`` over settings (stacked states and specs, a shared data batch), the
      schedule's skips (mask recomputation only on its steps, the prox only before pruning)
      stay real branches, and the shared batch is copied per setting so every matmul is a
      plain batched one; see :func:`qsparse.optim.any_setting` and ``_per_setting``.
    """

    def loss_fn(params, spec, x, y, teacher, model_state, rng):
        logits, model_state = _apply(model, plan, params, spec, x, model_state, train=True, rng=rng)
        ce = _cross_entropy(logits, y).mean()
        loss = ce
        if teacher is not None and sched.distill_weight:
            t = sched.distill_temperature
            kd = optax.softmax_cross_entropy(logits / t, jax.nn.softmax(teacher / t)).mean()
            loss = (1 - sched.distill_weight) * ce + sched.distill_weight * (t * t) * kd
        if sched.dampen:
            loss = loss + sched.dampen * plan.level_penalty(
                params[PARAMS], params[QUANT], spec["layers"]
            )
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return loss, (acc, model_state)

    def train_step(state: TrainState, batch, spec):
        x = _per_setting(batch[0], jax.tree.leaves(state.params)[0])
        y = batch[1]
        teacher = batch[2] if len(batch) > 2 else None
        rng = _dropout_key(state)
        (loss, (acc, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, spec, x, y, teacher, state.model_state or {}, rng
        )
        tx = make_optimizer(plan, sched, spec)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state._replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            model_state=model_state if state.model_state else state.model_state,
        )
        metrics = {"loss": loss, "accuracy": acc}
        if guard:
            metrics["finite"] = jnp.isfinite(loss)
        return new, metrics

    return train_step


def make_train_epoch(
    model,
    plan: Plan,
    sched: Schedule,
    batch_size: int,
    *,
    guard: bool = True,
    batch_sharding=None,
):
    """One epoch as a single ``lax.scan`` over device-resident data.

    To train, :func:`make_epoch_runner` gives the epoch ready to call in the form that is
    fast on the backend: this scan, or (a convolutional model on a CPU) the same steps as a
    host loop (:func:`make_epoch_steps`).

    Args:
      model: the Linen model.
      plan: its plan.
      sched: the schedule.
      batch_size: examples per step (the remainder of the epoch is dropped).
      guard: track non-finite losses (``all_finite``, ``first_nonfinite_step``); ``False``
        reports every step finite and exists to measure the guard's cost
        (``scripts/bench.py``).
      batch_sharding: data parallelism: a ``jax.sharding.Sharding`` of a batch's leading axis
        (e.g. ``NamedSharding(mesh, P("data"))``); each device gathers and trains on its part
        of every batch, and the compiled program reduces the gradients. ``None``: as placed.

    Returns:
      ``epoch(state, images_u8, labels, key, spec, teacher=None) -> (state, metrics)`` with
      metrics averaged over the epoch, plus ``first_nonfinite_step`` (-1 if none).
    """
    step_fn = make_train_step(model, plan, sched, guard=guard)

    def epoch(state, images, labels, key, spec, teacher=None):
        perm = data.epoch_indices(key, images.shape[0], batch_size)

        def body(st, idx):
            return _gathered_step(step_fn, st, idx, images, labels, spec, teacher, batch_sharding)

        start = state.step
        state, ms = jax.lax.scan(body, state, perm)
        return state, _epoch_metrics(ms, start, guard)

    return epoch


def _gathered_step(step_fn, state, idx, images, labels, spec, teacher, batch_sharding=None):
    """One step on the batch ``idx`` gathered from the device-resident data (both loops)."""
    if batch_sharding is not None:  # each device gathers its own rows from its replica
        idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
    x, y = data.get_batch(images, labels, idx)
    batch = (x, y) if teacher is None else (x, y, teacher[idx])
    return step_fn(state, batch, spec)


def _epoch_metrics(ms, start, guard: bool) -> dict:
    """An epoch's metrics from its per-step ``loss``, ``accuracy`` (and ``finite``) arrays."""
    finite = ms["finite"] if guard else jnp.ones_like(ms["loss"], bool)
    bad = jnp.argmin(finite)  # first False, or 0 when all True
    first_bad = jnp.where(jnp.all(finite), -1, start + bad)
    return {
        "loss": jnp.mean(ms["loss"]),
        "accuracy": jnp.mean(ms["accuracy"]),
        "all_finite": jnp.all(finite),
        "first_nonfinite_step": first_bad,
    }


# ---------------------------------------------------------------------------------------------
# The loop an epoch runs in.

LOOPS = ("auto", "scan", "steps")


def has_conv(plan: Plan) -> bool:
    """Whether the plan's model has a covered convolution."""
    return any("conv_general_dilated" in lp.ops for lp in plan.layers.values())


def pick_loop(plan: Plan, loop: str = "auto", backend: str | None = None) -> str:
    """The form of an epoch (and of a sweep's per-setting loop): ``"scan"`` or ``"steps"``.

    ``"scan"`` runs the epoch as one compiled ``lax.scan`` (:func:`make_train_epoch`): no
    dispatch between steps, what pays for MLPs and on accelerators. ``"steps"`` runs it as a
    host loop of one compiled step (:func:`make_epoch_steps`), which gathers its batch on the
    device as the scan's body does. XLA:CPU runs the convolutions of a training step far
    slower inside a loop body (``scan``, ``fori_loop``, ``lax.map``) than at the top level of
    a program (jax-ml/jax#12868: 12x to 70x for a LeNet step with JAX 0.10.2; a forward pass
    alone, as in :func:`make_eval`, is not affected), so ``"auto"`` picks ``"steps"`` for a model
    with a convolution on the CPU backend and ``"scan"`` everywhere else. This is the one
    place that choice is made.

    Args:
      plan: the model's plan (its layers' ``ops`` tell whether it convolves).
      loop: ``"auto"``, or ``"scan"`` / ``"steps"`` to force a form.
      backend: the backend the epoch runs on (default: JAX's default backend).

    Returns:
      ``"scan"`` or ``"steps"``.

    Raises:
      ValueError: ``loop`` is not one of :data:`LOOPS`.
    """
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r} is not allowed: use one of {LOOPS}")
    if loop != "auto":
        return loop
    backend = backend or jax.default_backend()
    return "steps" if backend == "cpu" and has_conv(plan) else "scan"


class EpochSteps(NamedTuple):
    """The epoch of :func:`make_train_epoch` as three pure functions, for a host loop.

    Attributes:
      begin: ``begin(images_u8, key) -> (perm, progress)``: the epoch's batches (the scanned
        epoch's permutation) and the step counter and per-step metric arrays.
      step: ``step(state, progress, perm, images_u8, labels, spec, teacher=None) ->
        (state, progress)``: step ``progress["i"]`` of the epoch, its batch gathered on the
        device from ``perm`` as the scanned body gathers it; ``state`` and ``progress`` can
        be donated.
      end: ``end(state, progress) -> metrics``: the scanned epoch's metrics.
    """

    begin: Any
    step: Any
    end: Any


def make_epoch_steps(
    model,
    plan: Plan,
    sched: Schedule,
    batch_size: int,
    *,
    guard: bool = True,
    batch_sharding=None,
):
    """One epoch as a host loop of steps: :func:`make_train_epoch` without the ``lax.scan``.

    Running ``begin``, then ``step`` once per row of ``perm``, then ``end`` (each jitted)
    computes what the scanned epoch computes, up to the order of float operations that XLA
    picks for a loop body and for a top-level program. :func:`steps_epoch` is that loop.

    Args:
      model: the model given to :func:`qsparse.wrap.make_plan`.
      plan: its plan.
      sched: the schedule.
      batch_size: examples per step (the remainder of the epoch is dropped).
      guard: as in :func:`make_train_epoch`.
      batch_sharding: as in :func:`make_train_epoch`.

    Returns:
      An :class:`EpochSteps`.
    """
    step_fn = make_train_step(model, plan, sched, guard=guard)

    def begin(images, key):
        perm = data.epoch_indices(key, images.shape[0], batch_size)
        n = perm.shape[0]
        progress = {
            "i": jnp.zeros([], jnp.int32),
            "loss": jnp.zeros([n], jnp.float32),
            "accuracy": jnp.zeros([n], jnp.float32),
            "finite": jnp.ones([n], bool),
        }
        return perm, progress

    def step(state, progress, perm, images, labels, spec, teacher=None):
        i = progress["i"]
        state, m = _gathered_step(
            step_fn, state, perm[i], images, labels, spec, teacher, batch_sharding
        )
        progress = {
            "i": i + 1,
            "loss": progress["loss"].at[i].set(m["loss"]),
            "accuracy": progress["accuracy"].at[i].set(m["accuracy"]),
            "finite": progress["finite"].at[i].set(m["finite"] if guard else True),
        }
        return state, progress

    def end(state, progress):
        # Every step advances the step counter by one: the epoch began this many steps ago.
        start = state.step - progress["loss"].shape[0]
        return _epoch_metrics(progress, start, guard)

    return EpochSteps(begin, step, end)


def steps_epoch(begin, step, end):
    """The host loop over an epoch's steps, from (jitted) :class:`EpochSteps` functions.

    Each call only dispatches: the batches are gathered on the device and the metrics stay
    there, so nothing waits on the host between steps. Works for stacked settings too (the
    functions of :func:`over_settings`; ``perm`` then has a leading settings axis).

    Args:
      begin: ``begin(images, key) -> (perm, progress)``.
      step: ``step(state, progress, perm, images, labels, spec, *rest) -> (state, progress)``.
      end: ``end(state, progress) -> metrics``.

    Returns:
      ``epoch(state, images_u8, labels, key, spec, *rest) -> (state, metrics)``, the
      signature of :func:`make_train_epoch`'s epoch.
    """

    def epoch(state, images, labels, key, spec, *rest):
        perm, progress = begin(images, key)
        for _ in range(perm.shape[-2]):  # (steps, batch), or (settings, steps, batch)
            state, progress = step(state, progress, perm, images, labels, spec, *rest)
        return state, end(state, progress)

    return epoch


def make_epoch_runner(
    model,
    plan: Plan,
    sched: Schedule,
    batch_size: int,
    *,
    loop: str = "auto",
    guard: bool = True,
    batch_sharding=None,
):
    """A ready-to-call training epoch, in the form :func:`pick_loop` picks.

    Args:
      model: the model given to :func:`qsparse.wrap.make_plan`.
      plan: its plan.
      sched: the schedule.
      batch_size: examples per step (the remainder of the epoch is dropped).
      loop: ``"auto"``, ``"scan"`` or ``"steps"`` (see :func:`pick_loop`).
      guard: as in :func:`make_train_epoch`.
      batch_sharding: as in :func:`make_train_epoch` (data parallelism).

    Returns:
      ``epoch(state, images_u8, labels, key, spec, teacher=None) -> (state, metrics)``, with
      the metrics of :func:`make_train_epoch`; do not wrap it in ``jax.jit`` (it is jitted
      inside, or is a host loop of jitted steps). The state passed in is donated (its
      buffers are reused for the new state): use the returned one. ``epoch.loop`` says which
      form runs.
    """
    form = pick_loop(plan, loop)
    if form == "scan":
        scanned = make_train_epoch(
            model, plan, sched, batch_size, guard=guard, batch_sharding=batch_sharding
        )
        fn = jax.jit(scanned, donate_argnums=0)
    else:
        parts = make_epoch_steps(
            model, plan, sched, batch_size, guard=guard, batch_sharding=batch_sharding
        )
        fn = steps_epoch(
            jax.jit(parts.begin), jax.jit(parts.step, donate_argnums=(0, 1)), jax.jit(parts.end)
        )

    def epoch(state, images, labels, key, spec, teacher=None):
        return fn(state, images, labels, key, spec, teacher)

    epoch.loop = form
    return epoch


def over_settings(fn, mesh, batched: Sequence[bool], vectorize: str = "vmap"):
    """``fn`` over a leading settings axis, each device of ``mesh`` taking its own settings.

    The batched arguments are split over the mesh axis ``"settings"`` and the others
    replicated (``jax.shard_map``); each device runs its slice with ``jax.vmap`` of ``fn``
    (one batched program), ``lax.map`` (one setting after another: the numbers of lone
    runs) or ``"unroll"`` (one setting after another, each a copy of ``fn`` in the program:
    no loop, for a step whose convolutions a loop body would slow down on a CPU; see
    :func:`pick_loop`). Inside a device the schedule branches
    (:func:`qsparse.optim.any_setting`) look at that device's settings only, so no step waits
    on a cross-device reduction, as it would under ``jax.jit`` sharding of one global
    ``vmap``. On a CPU host with one device per core
    (``--xla_force_host_platform_device_count``) this runs independent settings on each core.

    Args:
      fn: the per-setting function; every output gets the settings axis.
      mesh: a ``jax.sharding.Mesh`` with a ``"settings"`` axis.
      batched: per positional argument, whether it carries the settings axis.
      vectorize: ``"vmap"``, ``"map"`` or ``"unroll"``.

    Returns:
      The batched function (wrap it in ``jax.jit``); the settings count must divide evenly
      between the devices.
    """
    from jax.sharding import PartitionSpec as P

    if vectorize == "vmap":
        local = jax.vmap(fn, in_axes=tuple(0 if b else None for b in batched))
    elif vectorize == "map":
        at = [i for i, b in enumerate(batched) if b]

        def local(*args):
            def one(xs):
                full = list(args)
                for i, x in zip(at, xs):
                    full[i] = x
                return fn(*full)

            return jax.lax.map(one, tuple(args[i] for i in at))
    elif vectorize == "unroll":
        at = [i for i, b in enumerate(batched) if b]

        def local(*args):
            count = jax.tree.leaves(args[at[0]])[0].shape[0]
            outs = []
            for k in range(count):
                full = list(args)
                for i in at:
                    full[i] = jax.tree.map(lambda x, k=k: x[k], args[i])
                outs.append(fn(*full))
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    else:
        raise ValueError(f"vectorize={vectorize!r}: expected 'vmap', 'map' or 'unroll'")
    # check_vma=False: the optimizer's lax.cond branches mix per-setting and constant values,
    # which the varying-axis type check rejects although each device's program only ever
    # touches its own settings.
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=tuple(P("settings") if b else P() for b in batched),
        out_specs=P("settings"),
        check_vma=False,
    )


def make_eval(model, plan: Plan, batch_size: int = 1000):
    """Exact accuracy and loss over a whole split, as one ``lax.scan``.

    Args:
      model: the model given to :func:`qsparse.wrap.make_plan`.
      plan: its plan.
      batch_size: evaluation batch (the last batch is padded and masked out).

    Returns:
      ``evaluate(params, spec, images_u8, labels, model_state=None) -> {"accuracy",
      "loss"}`` (``model_state``: the train state's, for batch statistics).
    """

    def evaluate(params, spec, images, labels, model_state=None):
        n = images.shape[0]
        steps = -(-n // batch_size)
        idx = jnp.arange(steps * batch_size)
        weight = (idx < n).astype(jnp.float32).reshape(steps, batch_size)
        idx = jnp.minimum(idx, n - 1).reshape(steps, batch_size)

        def body(carry, inp):
            i, w = inp
            x = data.normalize(images[i])
            logits = logits_fn(model, plan, params, spec, x, model_state)
            ce = _cross_entropy(logits, labels[i])
            correct = (jnp.argmax(logits, -1) == labels[i]).astype(jnp.float32)
            return (carry[0] + jnp.sum(correct * w), carry[1] + jnp.sum(ce * w)), None

        (correct, loss), _ = jax.lax.scan(body, (0.0, 0.0), (idx, weight))
        return {"accuracy": correct / n, "loss": loss / n}

    return evaluate


def make_recalibrate(model, plan: Plan):
    """BatchNorm re-estimation: moving averages replaced by plain means at fixed weights.

    Low-bit weights flip between levels from step to step, so a moving average of batch
    statistics mixes many slightly different networks and can mismatch the final one (Nagel et
    al., "Overcoming Oscillations in Quantization-Aware Training", 2022). Every floating-point
    leaf of the model's other collections that the model updates as an exponential moving
    average (``new = m * old + (1 - m) * value``, as ``nn.BatchNorm`` and ``nnx.BatchNorm``
    do) becomes the mean of its batch values over the given batches, computed in training
    mode at the given weights; ``m`` is read from the model itself (one batch from all zeros and
    from all ones). Other leaves (RNG counters, anything not such an average) are kept. The
    parameters, and so training, are not changed.

    Args:
      model: the model given to :func:`qsparse.wrap.make_plan`.
      plan: its plan.

    Returns:
      ``recalibrate(params, spec, model_state, batches) -> model_state``: ``batches`` a
      non-empty sequence of input batches as the model takes them (training-sized: the
      statistics are per batch).
    """

    @jax.jit
    def values(params, spec, base, x):
        return _apply(model, plan, params, spec, x, base, train=True, rng=jax.random.key(0))[1]

    def averaged(leaf):
        return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)

    def recalibrate(params, spec, model_state, batches):
        if not model_state:
            return model_state
        if not len(batches):
            raise ValueError("batches is empty: give at least one input batch")

        def fill(v):
            return jax.tree.map(lambda x: jnp.full_like(x, v) if averaged(x) else x, model_state)

        zeros = fill(0.0)
        # From all zeros the update is (1 - m) * value; from all ones it adds m.
        m = jax.tree.map(
            lambda a, b: a - b,
            values(params, spec, fill(1.0), batches[0]),
            values(params, spec, zeros, batches[0]),
        )
        ema = jax.tree.map(
            lambda x, mm: averaged(x) and bool(jnp.all((mm > -1e-6) & (mm < 1 - 1e-6))),
            model_state,
            m,
        )
        total = jax.tree.map(jnp.zeros_like, model_state)
        for x in batches:
            got = values(params, spec, zeros, x)
            total = jax.tree.map(
                lambda t, g, mm, e: t + g / (1 - mm) if e else t, total, got, m, ema
            )
        return jax.tree.map(
            lambda x, t, e: (t / len(batches)).astype(x.dtype) if e else x,
            model_state,
            total,
            ema,
        )

    return recalibrate


def masks_of(state: TrainState):
    """The current block masks at the parameters' shapes, or None for a dense run.

    Args:
      state: a train state.

    Returns:
      The params-shaped 0/1 mask tree (over ``{"params", "quant"}``) from the optimizer state.
    """
    masks = optim.find_masks(state.opt_state)
    return None if masks is None else optim.expand_masks(masks, state.params)
