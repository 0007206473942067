"""Optax transforms that own block sparsity: proximal block lasso, gradual pruning, mask keeping.

Each is a ``GradientTransformation`` with a ``NamedTuple`` state and works under ``jit`` and
``vmap`` (all settings — strength, compression — are values). They compose with
``optax.chain`` around any inner optimizer::

    tx = keep_masks(optax.chain(
        optax.adam(lr),
        proximal_block_lasso(strength, block_shapes, until=begin),
        gradual_block_pruning(block_shapes, compression, begin=begin, end=end, frequency=100),
    ))

or, the same thing, :func:`block_sparse_chain`; :func:`block_sparse_adam` is that chain around
Adam(W) fused into one transform (same results, fewer passes over the weights), which is what
training uses. Parameters are addressed by the ``/``-joined
path of their keys (``"params/Dense_0/kernel"``); ``block_shapes`` maps such paths to
``(bm, bn)``; other parameters are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qsparse import sparsity


def path_str(key_path) -> str:
    """``/``-joined string of a JAX key path (dict keys, attribute names, indices).

    Args:
      key_path: a key path from ``jax.tree_util.tree_map_with_path``.

    Returns:
      e.g. ``"params/Dense_0/kernel"``.
    """
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


class ParamsTransformation(NamedTuple):
    """An optax transform that can also hand back the new parameters themselves.

    ``init`` and ``update`` are those of an ``optax.GradientTransformation`` (it works
    wherever one does); ``apply(grads, state, params) -> (new_params, new_state)`` skips
    the ``params + (new - params)`` of ``optax.apply_updates``: one pass less over every
    parameter per step, and no float rounding in between.

    Attributes:
      init: ``params -> state``.
      update: ``(grads, state, params) -> (updates, state)``.
      apply: ``(grads, state, params) -> (new_params, state)``.
    """

    init: Callable
    update: Callable
    apply: Callable


def apply_step(tx, grads, state, params):
    """One optimizer step: the new parameters and state.

    Args:
      tx: an ``optax.GradientTransformation`` or a :class:`ParamsTransformation`.
      grads: the gradients.
      state: the optimizer state.
      params: the parameters.

    Returns:
      ``(new_params, new_state)``: ``tx.apply`` where the transform has it, else
      ``optax.apply_updates(params, updates)`` after ``tx.update``.
    """
    if isinstance(tx, ParamsTransformation):
        return tx.apply(grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _check_paths(params, block_shapes: Mapping[str, Any]):
    paths = {path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(block_shapes) - paths)
    if missing:
        raise ValueError(
            f"block_shapes names parameters that do not exist: {missing}; "
            f"parameters are {sorted(paths)}"
        )


def _value_for(value, path):
    """A per-parameter value: a mapping by path, or one value for all."""
    if isinstance(value, Mapping):
        return value[path]
    return value


@jax.custom_batching.custom_vmap
def any_setting(pred):
    """``pred`` itself; under ``jax.vmap``, whether it holds for any setting of the batch.

    Under ``vmap`` a ``lax.cond`` on a batched predicate becomes a ``select`` that runs both
    branches for every setting on every step, so a sweep would redo the work a schedule skips
    (mask recomputation, the prox) on every step. Schedule predicates depend only on step
    counts, which the settings of a sweep share, so branching on "any setting" keeps a real
    branch; inside it each setting still follows its own predicate (``jnp.where``), so the
    result is exact even when the counts differ.

    Args:
      pred: boolean scalar.

    Returns:
      ``pred``, or under ``vmap`` the unbatched ``any(pred)``.
    """
    return pred


@any_setting.def_vmap
def _any_setting_vmap(axis_size, in_batched, pred):
    del axis_size
    return (jnp.any(pred) if in_batched[0] else pred), False


def expand_mask(mask, param):
    """A stored mask at the parameter's shape.

    Masks are stored per block, ``(R, C)`` over the kernel's matrix view (scalar 1 for
    parameters that are not pruned); the expansion is a broadcast that XLA fuses into the
    elementwise op using it, so applying a mask reads no full-size mask array.

    Args:
      mask: ``(R, C)`` block mask, a scalar, or already a mask of ``param``'s shape.
      param: the parameter (only its shape is used).

    Returns:
      A mask broadcastable against ``param`` (its shape, or a scalar).
    """
    if mask.ndim == 0 or mask.shape == param.shape:
        return mask
    rows, cols = sparsity.matrix_shape(param.shape)
    r, c = mask.shape
    return sparsity.expand_block_mask(mask, (rows // r, cols // c), param.shape)


def expand_masks(masks, params):
    """:func:`expand_mask` over a tree: params-shaped 0/1 masks (scalar 1 where not pruned).

    Args:
      masks: a stored mask tree (e.g. from :func:`find_masks`).
      params: the parameter tree.

    Returns:
      The mask tree at the parameters' shapes.
    """
    return jax.tree.map(lambda m, p: jnp.broadcast_to(expand_mask(m, p), p.shape), masks, params)


def compression_schedule(step, target, begin, end):
    """Cubic gradual-pruning schedule (Zhu & Gupta, 2017) expressed as compression.

    Sparsity ``s_t = s_f * (1 - (1 - f)**3)`` with ``f = clip((step - begin) / (end - begin))``
    and final sparsity ``s_f = 1 - 1 / target``; compression is ``1 / (1 - s_t)``.

    Args:
      step: current step (value).
      target: final compression ratio >= 1 (value).
      begin: first pruning step.
      end: step at which the target is reached.

    Returns:
      float32 compression ratio at ``step`` (1 before ``begin``, ``target`` from ``end``).
    """
    step = jnp.asarray(step, jnp.float32)
    span = jnp.maximum(jnp.asarray(end - begin, jnp.float32), 1.0)
    frac = jnp.clip((step - begin) / span, 0.0, 1.0)
    frac = jnp.where(step >= end, 1.0, frac)
    s_f = 1.0 - 1.0 / jnp.maximum(jnp.asarray(target, jnp.float32), 1.0)
    s_t = s_f * (1.0 - (1.0 - frac) ** 3)
    return 1.0 / (1.0 - s_t)


class ProxState(NamedTuple):
    """State of :func:`proximal_block_lasso`: the step count."""

    count: jax.Array


def proximal_block_lasso(
    strength, block_shapes: Mapping[str, tuple[int, int]], *, until: int | None = None
) -> optax.GradientTransformation:
    """Proximal step of the block (group) lasso after the inner optimizer.

    The returned update lands each sparsified kernel on ``prox(params + inner_update)`` with
    threshold ``strength`` (i.e. ``t * lambda``: step size times regularisation weight), so
    weak blocks become exactly zero during training, ahead of pruning. Only the per-block
    shrink factors are computed in a branch (``lax.cond``, kept a real branch under ``vmap``
    by :func:`any_setting`); once ``count >= until`` the branch is skipped and the updates
    pass unchanged.

    Args:
      strength: threshold ``t * lambda`` >= 0: a value (may be traced / vmapped) or a
        schedule ``count -> value`` (e.g. following the learning rate).
      block_shapes: kernel path -> ``(bm, bn)``.
      until: apply only while ``count < until`` (e.g. until pruning begins); None: always.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    Example:
      >>> tx = optax.chain(optax.sgd(0.1), proximal_block_lasso(1e-3, {"w": (4, 4)}))
    """

    def init_fn(params):
        _check_paths(params, block_shapes)
        return ProxState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("proximal_block_lasso needs params: call update(u, s, params)")
        count = state.count
        active = jnp.asarray(True) if until is None else count < until
        threshold = strength(count) if callable(strength) else strength
        flat_u = _by_path(updates)
        flat_p = _by_path(params)

        def factors():
            return {
                k: jnp.where(
                    active, sparsity.prox_block_factor(flat_p[k] + flat_u[k], bs, threshold), 1.0
                )
                for k, bs in block_shapes.items()
            }

        if until is None:
            f = factors()
        else:
            ones = {k: jnp.ones(_grid(flat_p[k], bs)) for k, bs in block_shapes.items()}
            f = jax.lax.cond(any_setting(active), factors, lambda: ones)

        def one(kp, u, p):
            path = path_str(kp)
            if path not in f:
                return u
            shrunk = ((p + u) * expand_mask(f[path].astype(p.dtype), p)).astype(p.dtype)
            return jnp.where(active, shrunk - p, u)

        updates = jax.tree_util.tree_map_with_path(one, updates, params)
        return updates, ProxState(count=optax.safe_increment(count))

    return optax.GradientTransformation(init_fn, update_fn)


def _by_path(tree) -> dict:
    return {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _grid(param, block_shape) -> tuple[int, int]:
    """``(R, C)``: blocks per column and per row of the parameter's matrix view."""
    rows, cols = sparsity.matrix_shape(param.shape)
    return rows // block_shape[0], cols // block_shape[1]


class PruneState(NamedTuple):
    """State of :func:`gradual_block_pruning`.

    Attributes:
      count: step count.
      masks: params-structured tree of 0/1 block masks, ``(R, C)`` per pruned kernel (see
        :func:`expand_mask`); scalar 1 for parameters that are not pruned.
    """

    count: jax.Array
    masks: Any


def _ones_masks(params, block_shapes):
    def one(kp, p):
        path = path_str(kp)
        if path in block_shapes:
            return jnp.ones(_grid(p, block_shapes[path]), jnp.float32)
        return jnp.ones([], jnp.float32)

    return jax.tree_util.tree_map_with_path(one, params)


def compute_block_masks(
    params,
    block_shapes: Mapping[str, tuple[int, int]],
    compression,
    *,
    balanced: bool = False,
    scope: str = "layer",
):
    """Block masks for every sparsified parameter of a tree, one entry per block.

    Args:
      params: parameter tree.
      block_shapes: kernel path -> ``(bm, bn)``.
      compression: ratio (value) or mapping path -> ratio (``scope="layer"`` only).
      balanced: equal kept blocks per block row (per-layer scope only).
      scope: ``"layer"`` (each layer keeps ``1/compression`` of its blocks) or ``"global"``
        (one budget across all sparsified layers).

    Returns:
      params-structured tree: ``(R, C)`` 0/1 block masks, scalar 1 where not sparsified.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope={scope!r} is not allowed: use 'layer' or 'global'")
    flat = _by_path(params)
    if scope == "global":
        if isinstance(compression, Mapping):
            raise ValueError("scope='global' takes one compression value, not a mapping")
        gm = sparsity.global_block_keep(
            {k: flat[k] for k in block_shapes}, block_shapes, compression
        )
    else:
        gm = {
            k: sparsity.block_keep(
                sparsity.block_norms(flat[k], bs), _value_for(compression, k), balanced=balanced
            )
            for k, bs in block_shapes.items()
        }

    def one(kp, p):
        path = path_str(kp)
        return gm[path] if path in gm else jnp.ones([], jnp.float32)

    return jax.tree_util.tree_map_with_path(one, params)


def compute_masks(params, block_shapes, compression, *, balanced=False, scope="layer"):
    """:func:`compute_block_masks` at the parameters' shapes.

    Args:
      params: parameter tree.
      block_shapes: kernel path -> ``(bm, bn)``.
      compression: ratio (value) or mapping path -> ratio (``scope="layer"`` only).
      balanced: equal kept blocks per block row.
      scope: ``"layer"`` or ``"global"``.

    Returns:
      params-shaped tree of float32 0/1 masks (scalar 1 where not sparsified).
    """
    bm = compute_block_masks(params, block_shapes, compression, balanced=balanced, scope=scope)
    return jax.tree.map(expand_mask, bm, params)


def _check_schedule(compression, begin: int, end: int, frequency: int) -> None:
    """Raises a one-line ValueError for a pruning schedule or target that is not allowed."""
    if not (0 <= begin <= end):
        raise ValueError(
            f"prune schedule begin={begin}, end={end} is not allowed: need 0 <= begin <= end"
        )
    if frequency < 1:
        raise ValueError(f"frequency={frequency} is not allowed: use an integer >= 1")
    if not isinstance(compression, Mapping):
        sparsity.check_compression(compression)


def _scheduled_masks(
    params, masks, count, block_shapes, compression, *, begin, end, frequency, balanced, scope
):
    """The block masks after a pruning step at ``count``: recomputed on schedule steps.

    On schedule steps (``begin <= count <= end`` and ``(count - begin) % frequency == 0``, and
    always at ``end``, so the target is reached exactly) the masks are ranked from the block
    norms of ``params`` at the scheduled compression; otherwise ``masks`` is returned. The
    work sits in a ``lax.cond`` on :func:`any_setting` (a real branch also under ``vmap``)
    whose only outputs are the small ``(R, C)`` masks.
    """
    on_schedule = (
        (count >= begin) & (count <= end) & (((count - begin) % frequency == 0) | (count == end))
    )

    def recompute():
        if isinstance(compression, Mapping):
            c_t = {k: compression_schedule(count, v, begin, end) for k, v in compression.items()}
        else:
            c_t = compression_schedule(count, compression, begin, end)
        new = compute_block_masks(params, block_shapes, c_t, balanced=balanced, scope=scope)
        # Under vmap the branch runs when any setting is on schedule; each setting takes its own.
        return jax.tree.map(lambda n, o: jnp.where(on_schedule, n, o), new, masks)

    return jax.lax.cond(any_setting(on_schedule), recompute, lambda: masks)


def gradual_block_pruning(
    block_shapes: Mapping[str, tuple[int, int]],
    compression,
    *,
    begin: int,
    end: int,
    frequency: int = 100,
    balanced: bool = False,
    scope: str = "layer",
) -> optax.GradientTransformation:
    """Gradual block pruning to a target compression on the cubic schedule.

    On schedule steps (``begin <= count <= end`` and ``(count - begin) % frequency == 0``, and
    always at ``end``) the masks are recomputed from the block norms of ``params`` (the
    weights the step starts from) at the scheduled compression (:func:`compression_schedule`);
    otherwise the stored masks are reused (``lax.cond`` on :func:`any_setting`: no mask work
    on other steps, also under ``vmap``). After ``end`` the masks are frozen. The returned
    update lands the parameters on ``mask * (params + update)``, so pruned blocks are exactly
    zero. Ranking ``params`` rather than ``params + update`` keeps the full-size update out of
    the branch's operands, so XLA can fuse the whole update into one pass.

    Args:
      block_shapes: kernel path -> ``(bm, bn)``.
      compression: target ratio >= 1 (value or mapping path -> value).
      begin: first pruning step.
      end: last pruning step (target reached); ``end >= begin``.
      frequency: steps between mask updates (> 0).
      balanced: equal kept blocks per block row.
      scope: ``"layer"`` or ``"global"``.

    Returns:
      An ``optax.GradientTransformation`` with :class:`PruneState`; ``update`` needs params.
    """
    _check_schedule(compression, begin, end, frequency)

    def init_fn(params):
        _check_paths(params, block_shapes)
        return PruneState(count=jnp.zeros([], jnp.int32), masks=_ones_masks(params, block_shapes))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("gradual_block_pruning needs params: call update(u, s, params)")
        # Only the (small) block masks come out of the branch; applying them is a fused
        # elementwise op on every step.
        masks = _scheduled_masks(
            params, state.masks, state.count, block_shapes, compression,
            begin=begin, end=end, frequency=frequency, balanced=balanced, scope=scope,
        )  # fmt: skip
        updates = jax.tree.map(
            lambda p, u, m: ((p + u) * expand_mask(m, p)).astype(p.dtype) - p,
            params,
            updates,
            masks,
        )
        return updates, PruneState(count=optax.safe_increment(state.count), masks=masks)

    return optax.GradientTransformation(init_fn, update_fn)


class KeepMasksState(NamedTuple):
    """State of :func:`keep_masks`.

    Attributes:
      inner_state: the wrapped transform's state.
      masks: fixed masks, or ``None`` to use the masks of a :class:`PruneState` inside.
    """

    inner_state: Any
    masks: Any


def find_masks(state):
    """The stored masks of the first pruning, keep-masks or fused-Adam state inside.

    Args:
      state: an optimizer state (any nesting of tuples, NamedTuples, dicts, lists).

    Returns:
      The mask tree as stored (``(R, C)`` block masks for pruned kernels; see
      :func:`expand_masks` for the parameters' shapes), or ``None`` if there is none.
    """
    if isinstance(state, (PruneState, BlockSparseAdamState)):
        return state.masks
    if isinstance(state, KeepMasksState):
        return state.masks if state.masks is not None else find_masks(state.inner_state)
    children = (
        state.values()
        if isinstance(state, dict)
        else (state if isinstance(state, (tuple, list)) else ())
    )
    for child in children:
        found = find_masks(child)
        if found is not None:
            return found
    return None


def _zero_pruned(node, masks, params):
    """Multiplies every params-shaped subtree of an optimizer state by the masks."""
    if isinstance(node, PruneState):
        return node
    if jax.tree.structure(node) == jax.tree.structure(params):
        return jax.tree.map(
            lambda x, m, p: (x * expand_mask(m, p)).astype(x.dtype) if x.shape == p.shape else x,
            node,
            masks,
            params,
        )
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_zero_pruned(c, masks, params) for c in node))
    if isinstance(node, (tuple, list)):
        return type(node)(_zero_pruned(c, masks, params) for c in node)
    if isinstance(node, dict):
        return {k: _zero_pruned(v, masks, params) for k, v in node.items()}
    return node


def keep_masks(inner: optax.GradientTransformation, masks=None) -> optax.GradientTransformation:
    """Keeps pruned blocks exactly zero and gives them no gradient and no optimizer moments.

    Before the inner update, the gradients and every params-shaped part of the inner state
    (Adam's ``mu`` and ``nu``, momentum, ...) are multiplied by the current masks, so a pruned
    weight neither moves nor keeps a stale moment to come back with (pruning is monotone);
    after it, the parameters land on ``mask * (params + update)`` with the (possibly new)
    masks. Masking on the way in rather than on the way out lets XLA fuse it into the inner
    update: no extra pass over the moments.

    Args:
      inner: the optimizer (chain) to wrap.
      masks: fixed masks (params-shaped 0/1, or ``(R, C)`` block masks as in
        :func:`expand_mask`) for fine-tuning with frozen masks, or ``None`` to follow the masks
        of a :func:`gradual_block_pruning` inside ``inner``.

    Returns:
      An ``optax.GradientTransformation`` with :class:`KeepMasksState`.
    """

    def init_fn(params):
        inner_state = inner.init(params)
        if masks is None and find_masks(inner_state) is None:
            raise ValueError("keep_masks(masks=None) needs a gradual_block_pruning inside inner")
        return KeepMasksState(inner_state=inner_state, masks=masks)

    def current(state):
        return state.masks if state.masks is not None else find_masks(state.inner_state)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("keep_masks needs params: call update(u, s, params)")
        m = current(state)
        updates = jax.tree.map(
            lambda u, mk, p: (u * expand_mask(mk, p)).astype(u.dtype), updates, m, params
        )
        inner_in = _zero_pruned(state.inner_state, m, params)
        updates, inner_state = inner.update(updates, inner_in, params)
        m = state.masks if state.masks is not None else find_masks(inner_state)
        updates = jax.tree.map(
            lambda p, u, mk: ((p + u) * expand_mask(mk, p)).astype(p.dtype) - p, params, updates, m
        )
        return updates, KeepMasksState(inner_state=inner_state, masks=state.masks)

    return optax.GradientTransformation(init_fn, update_fn)


def block_sparse_chain(
    inner: optax.GradientTransformation,
    block_shapes: Mapping[str, tuple[int, int]],
    compression,
    *,
    prox_strength=0.0,
    begin: int,
    end: int,
    frequency: int = 100,
    balanced: bool = False,
    scope: str = "layer",
) -> optax.GradientTransformation:
    """The three phases in one transform: proximal training, gradual pruning, frozen masks.

    Steps ``< begin``: inner update then block-lasso prox. ``begin .. end``: cubic pruning
    with masks recomputed every ``frequency`` steps. ``> end``: masks frozen (fine-tuning).
    Throughout, pruned blocks are exactly zero and their inner moments are reset.

    Args:
      inner: the base optimizer (e.g. ``optax.adam(lr)``).
      block_shapes: kernel path -> ``(bm, bn)``.
      compression: target ratio (value or mapping path -> value).
      prox_strength: block-lasso threshold per step: a value or a schedule ``count -> value``.
      begin: first pruning step.
      end: last pruning step.
      frequency: steps between mask updates.
      balanced: equal kept blocks per block row.
      scope: ``"layer"`` or ``"global"``.

    Returns:
      An ``optax.GradientTransformation``.
    """
    return keep_masks(
        optax.chain(
            inner,
            proximal_block_lasso(prox_strength, block_shapes, until=begin),
            gradual_block_pruning(
                block_shapes,
                compression,
                begin=begin,
                end=end,
                frequency=frequency,
                balanced=balanced,
                scope=scope,
            ),
        )
    )


class BlockSparseAdamState(NamedTuple):
    """State of :func:`block_sparse_adam`: Adam's moments and the pruning masks.

    Attributes:
      adam: ``optax.ScaleByAdamState``; its count is the step count of the whole schedule.
      masks: params-structured ``(R, C)`` block masks, as in :class:`PruneState`.
    """

    adam: optax.ScaleByAdamState
    masks: Any


def block_sparse_adam(
    learning_rate,
    block_shapes: Mapping[str, tuple[int, int]],
    compression,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask=None,
    prox_strength=0.0,
    begin: int,
    end: int,
    frequency: int = 100,
    balanced: bool = False,
    scope: str = "layer",
) -> ParamsTransformation:
    """:func:`block_sparse_chain` around Adam(W), fused into one transform for speed.

    The same algorithm as ``block_sparse_chain(optax.adamw(lr, b1, b2, eps, weight_decay,
    mask=decay_mask), ...)`` (``optax.adam`` when ``weight_decay`` is 0), equal up to float
    rounding; what differs is what XLA has to keep in memory. In the chain, the Adam update
    is an array that the prox's branch takes as an operand, so it is written out in full,
    scaled in a second pass and read again by the prox and the final update. Here each
    parameter's whole Adam step is one fused loop over ``params, mu, nu`` that writes the new
    weights (on the kept blocks), as in plain Adam; in the prox phase a branch per kernel then
    shrinks those new weights from their own block norms.

    Its :meth:`ParamsTransformation.apply` returns the new parameters themselves; ``update``
    returns ``new - params`` for optax's ``apply_updates``, which adds ``params`` back in one
    more pass over every parameter (and equals the new parameters up to float rounding).
    :func:`apply_step` takes whichever the transform offers.

    Args:
      learning_rate: a value or a schedule ``count -> value`` (the count before this step).
      block_shapes: kernel path -> ``(bm, bn)``.
      compression: target ratio (value or mapping path -> value).
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon (added to the root of the second moment).
      weight_decay: decoupled weight decay (AdamW), 0 for Adam.
      decay_mask: params-structured tree of bools, or a callable ``params -> tree``, saying
        which parameters decay; None: all.
      prox_strength: block-lasso threshold per step before ``begin``: a value or a schedule
        ``count -> value``.
      begin: first pruning step (the prox runs on the steps before it).
      end: last pruning step.
      frequency: steps between mask updates.
      balanced: equal kept blocks per block row.
      scope: ``"layer"`` or ``"global"``.

    Returns:
      A :class:`ParamsTransformation` with :class:`BlockSparseAdamState`; ``update`` and
      ``apply`` need params.
    """
    _check_schedule(compression, begin, end, frequency)

    def init_fn(params):
        _check_paths(params, block_shapes)
        count = jnp.zeros([], jnp.int32)
        adam = optax.ScaleByAdamState(
            count=count,
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )
        return BlockSparseAdamState(adam=adam, masks=_ones_masks(params, block_shapes))

    def apply_fn(grads, state, params=None):
        if params is None:
            raise ValueError("block_sparse_adam needs params: call update/apply(g, s, params)")
        count = state.adam.count
        masks = state.masks

        # Masked on the way in (as keep_masks does): pruned weights get no gradient and keep
        # no stale moment, and the masking fuses into the moment updates.
        def moments(g, m, v, mk, p):
            mk = expand_mask(mk, p)
            g = g * mk
            return (1 - b1) * g + b1 * (m * mk), (1 - b2) * g**2 + b2 * (v * mk)

        both = jax.tree.map(moments, grads, state.adam.mu, state.adam.nu, masks, params)
        outer = jax.tree.structure(params)
        mu, nu = jax.tree.transpose(outer, jax.tree.structure((0, 0)), both)
        count_inc = optax.safe_increment(count)
        bc1 = 1 - b1**count_inc
        bc2 = 1 - b2**count_inc
        lr_t = learning_rate(count) if callable(learning_rate) else learning_rate
        if weight_decay and decay_mask is not None:
            decays = decay_mask(params) if callable(decay_mask) else decay_mask
        else:
            decays = jax.tree.map(lambda _: bool(weight_decay), params)
        flat_decay = _by_path(decays)
        new_masks = _scheduled_masks(
            params, masks, count, block_shapes, compression,
            begin=begin, end=end, frequency=frequency, balanced=balanced, scope=scope,
        )  # fmt: skip

        # The whole Adam step of a parameter is one fused loop over params, mu and nu, as in
        # plain Adam, landing on the kept blocks.
        def adam_step(kp, p, m, v, mk):
            d = (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype)) + eps)
            if flat_decay[path_str(kp)]:
                d = d + weight_decay * p
            return ((p - lr_t * d) * expand_mask(mk.astype(p.dtype), p)).astype(p.dtype)

        stepped = jax.tree_util.tree_map_with_path(adam_step, params, mu, nu, new_masks)

        # The prox shrinks those new weights block by block. It is one branch per kernel
        # (lax.cond on any_setting: skipped after the prox phase, also under vmap) that takes
        # the new weights and returns them shrunk, or unchanged (no copy) when skipped. Its
        # block norms then read one array, where norms of params + update recomputed the Adam
        # step from three; the new weights are written anyway, as the parameters.
        active = count < begin
        threshold = prox_strength(count) if callable(prox_strength) else prox_strength

        def shrink(bs):
            def prox(w):
                f = jnp.where(active, sparsity.prox_block_factor(w, bs, threshold), 1.0)
                return w * expand_mask(f.astype(w.dtype), w)

            return prox

        prox_on = any_setting(active)
        flat = _by_path(stepped)
        shrunk = {
            k: jax.lax.cond(prox_on, shrink(bs), lambda w: w, flat[k])
            for k, bs in block_shapes.items()
        }
        new_params = jax.tree_util.tree_map_with_path(
            lambda kp, w: shrunk.get(path_str(kp), w), stepped
        )
        adam = optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)
        return new_params, BlockSparseAdamState(adam=adam, masks=new_masks)

    def update_fn(grads, state, params=None):
        new_params, state = apply_fn(grads, state, params)
        return jax.tree.map(lambda n, p: n - p, new_params, params), state

    return ParamsTransformation(init_fn, update_fn, apply_fn)
