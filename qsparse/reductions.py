"""Sums that XLA:CPU runs as fused elementwise loops instead of reduce operations.

XLA:CPU hands a reduce op to YNNPACK, which cannot fuse the elementwise expression that
produces its input: that expression is written to memory in full and read back, and a
reduction over a middle axis (the rows of a block) runs slowly there. A sum written as a
tree of slice additions is elementwise, so XLA fuses it with its producer into one loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tree_sum(x, axis: int, until: int = 1):
    """Sum over ``axis`` by pairwise additions of its two halves (a tree in that axis).

    The result equals ``jnp.sum(x, axis)`` up to float rounding (the order is pairwise).
    Best for summing out a leading or middle axis; a tiny last axis sums fine this way too.

    Args:
      x: array.
      axis: axis to sum out (non-negative).
      until: stop halving once the axis has at most this many entries (1: sum it out).

    Returns:
      ``x`` summed over ``axis`` (that axis removed), or with ``until > 1`` the partial sums
      (the axis kept, at most ``until`` long).
    """
    if until < 1:
        raise ValueError(f"until={until} is not allowed: use an integer >= 1")
    while x.shape[axis] > until:
        k = x.shape[axis]
        half = k // 2
        lo = jax.lax.slice_in_dim(x, 0, half, axis=axis)
        hi = jax.lax.slice_in_dim(x, half, 2 * half, axis=axis)
        pair = lo + hi
        if k % 2:
            # The odd one out joins the first slot: a select, not a concatenate, so the
            # levels stay one fused loop (a concatenate was written out, and XLA recomputed
            # the levels before it for the odd row: a full-size pass more for 784 rows).
            last = jax.lax.slice_in_dim(x, k - 1, k, axis=axis)
            first = jax.lax.broadcasted_iota(jnp.int32, pair.shape, axis) == 0
            pair = jnp.where(first, pair + last, pair)
        x = pair
    return jnp.squeeze(x, axis) if until == 1 else x
