"""The block-sparse optimizer: Adam(W) with proximal block lasso, gradual pruning and masks.

:func:`block_sparse_adam` is one ``optax.GradientTransformation`` with a ``NamedTuple``
state; it works under ``jit`` and ``vmap`` (every setting — learning rate, strength,
compression — is a value) and is used with ``optax.apply_updates`` as usual::

    tx = block_sparse_adam(lr, {"params/Dense_0/kernel": (8, 8)}, 4.0,
                           prox_strength=1e-4, begin=1000, end=2000, frequency=50)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

Parameters are addressed by the ``/``-joined path of their keys (``"params/Dense_0/kernel"``);
``block_shapes`` maps such paths to ``(bm, bn)``; other parameters get plain Adam(W).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
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


def _by_path(tree) -> dict:
    return {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _grid(param, block_shape) -> tuple[int, int]:
    """``(R, C)``: blocks per column and per row of the parameter's matrix view."""
    rows, cols = sparsity.matrix_shape(param.shape)
    return rows // block_shape[0], cols // block_shape[1]


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
    balanced: bool | str = False,
    scope: str = "layer",
):
    """Block masks for every sparsified parameter of a tree, one entry per block.

    Args:
      params: parameter tree.
      block_shapes: kernel path -> ``(bm, bn)``.
      compression: ratio (value) or mapping path -> ratio (``scope="layer"`` only).
      balanced: ``"none"``, ``"rows"`` or ``"columns"`` (:func:`qsparse.sparsity.block_keep`;
        per-layer scope only).
      scope: ``"layer"`` (each layer keeps ``1/compression`` of its blocks) or ``"global"``
        (one budget across all sparsified layers).

    Returns:
      params-structured tree: ``(R, C)`` 0/1 block masks, scalar 1 where not sparsified.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope={scope!r} is not allowed: use 'layer' or 'global'")
    sparsity.check_balance(balanced)
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


class BlockSparseAdamState(NamedTuple):
    """State of :func:`block_sparse_adam`: Adam's moments and the pruning masks.

    Attributes:
      adam: ``optax.ScaleByAdamState``; its count is the step count of the whole schedule.
      masks: params-structured tree of 0/1 block masks, ``(R, C)`` per pruned kernel (see
        :func:`expand_mask`); scalar 1 for parameters that are not pruned.
    """

    adam: optax.ScaleByAdamState
    masks: Any


def find_masks(state):
    """The stored block masks of a :func:`block_sparse_adam` state.

    Args:
      state: an optimizer state.

    Returns:
      The mask tree as stored (``(R, C)`` block masks for pruned kernels; see
      :func:`expand_masks` for the parameters' shapes), or ``None`` for another state.
    """
    return state.masks if isinstance(state, BlockSparseAdamState) else None


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
    balanced: bool | str = False,
    scope: str = "layer",
) -> optax.GradientTransformation:
    """Adam(W) with proximal block lasso, gradual block pruning and masks kept.

    Before ``begin`` each step is Adam(W) then the block-lasso prox
    ``w_B <- w_B * max(0, 1 - t / ||w_B||)``, ``t = prox_strength(count)``; from ``begin`` to
    ``end`` the block masks are recomputed every ``frequency`` steps (and at ``end``) on the
    cubic schedule (:func:`compression_schedule`); after ``end`` they are frozen. Pruned blocks
    are exactly zero, get no gradient and keep no Adam moments, so pruning is monotone; each
    update is ``new - params``. Mask updates and block norms sit in ``lax.cond`` branches on
    :func:`any_setting`, real branches under ``vmap`` too.

    Args:
      learning_rate: a value or a schedule ``count -> value``.
      block_shapes: kernel path -> ``(bm, bn)``.
      compression: target ratio >= 1 (value or mapping path -> value).
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon (added to the root of the second moment).
      weight_decay: decoupled weight decay (AdamW), 0 for Adam.
      decay_mask: params-structured tree of bools, or a callable ``params -> tree``, saying
        which parameters decay; None: all.
      prox_strength: block-lasso threshold per step before ``begin``: a value or a schedule
        ``count -> value``.
      begin: first pruning step (the prox runs on the steps before it).
      end: last pruning step (target reached); ``end >= begin``.
      frequency: steps between mask updates (>= 1).
      balanced: ``"none"``, ``"rows"`` or ``"columns"`` (:func:`qsparse.sparsity.block_keep`).
      scope: ``"layer"`` (each layer keeps ``1/compression`` of its blocks) or ``"global"``
        (one budget across all pruned layers).

    Returns:
      An ``optax.GradientTransformation`` with :class:`BlockSparseAdamState`; ``update``
      needs ``params``.

    Example:
      >>> tx = block_sparse_adam(1e-3, {"w": (4, 4)}, 4.0, begin=100, end=500, frequency=50)
    """
    _check_schedule(compression, begin, end, frequency)

    sparsity.check_balance(balanced)

    def init_fn(params):
        _check_paths(params, block_shapes)
        mu, nu = (jax.tree.map(jnp.zeros_like, params) for _ in range(2))  # two buffers
        adam = optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)
        return BlockSparseAdamState(adam=adam, masks=_ones_masks(params, block_shapes))

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError("block_sparse_adam needs params: call update(grads, state, params)")
        count = state.adam.count
        count_inc = optax.safe_increment(count)
        masks = _scheduled_masks(
            params, state.masks, count, block_shapes, compression,
            begin=begin, end=end, frequency=frequency, balanced=balanced, scope=scope,
        )  # fmt: skip
        mu, nu = _masked_moments(grads, state, params, b1, b2)
        lr_t = learning_rate(count) if callable(learning_rate) else learning_rate
        decays = _decay_tree(params, weight_decay, decay_mask)
        stepped = _adam_weights(
            params, mu, nu, masks, decays, count_inc, lr_t,
            b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        )  # fmt: skip
        threshold = prox_strength(count) if callable(prox_strength) else prox_strength
        f = _prox_factors(stepped, params, block_shapes, count < begin, threshold)
        updates = jax.tree_util.tree_map_with_path(partial(_update, stepped, f), params)
        adam = optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)
        return updates, BlockSparseAdamState(adam=adam, masks=masks)

    return optax.GradientTransformation(init_fn, update_fn)


def _decay_tree(params, weight_decay, decay_mask):
    """Which parameters decay (a params-structured tree of bools)."""
    if weight_decay and decay_mask is not None:
        return decay_mask(params) if callable(decay_mask) else decay_mask
    return jax.tree.map(lambda _: bool(weight_decay), params)


def _masked_moments(grads, state, params, b1, b2):
    """Adam's new moments, masked on the way in: pruned weights get no gradient or moments."""

    def moments(g, m, v, old, p):
        old = expand_mask(old, p)
        g = g * old
        return (1 - b1) * g + b1 * (m * old), (1 - b2) * g**2 + b2 * (v * old)

    both = jax.tree.map(moments, grads, state.adam.mu, state.adam.nu, state.masks, params)
    return jax.tree.transpose(jax.tree.structure(params), jax.tree.structure((0, 0)), both)


def _adam_weights(params, mu, nu, masks, decays, count_inc, lr_t, *, b1, b2, eps, weight_decay):
    """The weights Adam(W) lands on, on the kept blocks: path -> array."""
    bc1 = 1 - b1**count_inc
    bc2 = 1 - b2**count_inc
    flat_m, flat_v, flat_p = _by_path(mu), _by_path(nu), _by_path(params)
    flat_mask, flat_decay = _by_path(masks), _by_path(decays)

    def adam_step(path):
        p, m, v = flat_p[path], flat_m[path], flat_v[path]
        d = (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype)) + eps)
        if flat_decay[path]:
            d = d + weight_decay * p
        mask = expand_mask(flat_mask[path].astype(p.dtype), p)
        return ((p - lr_t * d) * mask).astype(p.dtype)

    return {path: adam_step(path) for path in flat_p}


def _prox_factors(stepped, params, block_shapes, active, threshold):
    """The prox's per-block factors of the stepped weights, in a branch skipped after the
    prox phase (all ones there)."""
    flat_p = _by_path(params)

    def factors():
        return {
            k: jnp.where(active, sparsity.prox_block_factor(stepped[k], bs, threshold), 1.0)
            for k, bs in block_shapes.items()
        }

    ones = {k: jnp.ones(_grid(flat_p[k], bs)) for k, bs in block_shapes.items()}
    return jax.lax.cond(any_setting(active), factors, lambda: ones)


def _update(stepped, factors, key_path, p):
    """``new - p`` for one parameter, the prox's block factors applied to ``new``."""
    path = path_str(key_path)
    w = stepped[path]
    if path in factors:
        w = (w * expand_mask(factors[path].astype(w.dtype), w)).astype(w.dtype)
    return w - p
