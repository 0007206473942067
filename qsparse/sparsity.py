"""Block (coarse-grain) structured sparsity: partition, norms, masks, proximal operator.

A kernel is viewed as a matrix ``(fan_in, fan_out)``: a Dense kernel as it is, a Conv kernel
``(kh, kw, cin, cout)`` as ``(kh * kw * cin, cout)``. The matrix is cut into blocks of
``block_shape = (bm, bn)``; block ``(i, j)`` covers rows ``i*bm .. (i+1)*bm - 1`` and columns
``j*bn .. (j+1)*bn - 1``; blocks are numbered row-major. The block shape must divide the
matrix view exactly: a non-dividing shape is an error at set-up (no silent padding), because
a padded block would count index bits and codes for weights that do not exist.

``compression`` is a value (Python number or traced array), so masks for many compression
ratios come out of one compiled program and ``jax.vmap`` over ratios works.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def check_compression(compression, name: str = "compression") -> None:
    """Validates concrete compression ratios (traced values pass unchecked).

    Args:
      compression: number or array; each must be a finite value >= 1.
      name: argument name for the error message.

    Raises:
      ValueError: a ratio below 1 or not finite.
    """
    if isinstance(compression, jax.core.Tracer):
        return
    for v in np.ravel(np.asarray(compression, dtype=np.float64)).tolist():
        if not math.isfinite(v) or v < 1:
            raise ValueError(
                f"{name}={v:g} is not allowed: compression is a ratio >= 1 "
                "(1 = dense, 4 = keep a quarter of the blocks)"
            )


def matrix_shape(shape) -> tuple[int, int]:
    """The ``(fan_in, fan_out)`` matrix view of a kernel shape.

    Args:
      shape: kernel shape, 2-D (Dense) or more (Conv, output channels last).

    Returns:
      ``(prod(shape[:-1]), shape[-1])``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"kernel shape={shape} is not allowed: block sparsity needs >= 2 dims")
    return int(np.prod(shape[:-1])), shape[-1]


def check_block_shape(shape, block_shape, name: str = "block_shape") -> tuple[int, int]:
    """Checks that ``block_shape`` tiles the matrix view of ``shape`` exactly.

    Args:
      shape: kernel shape.
      block_shape: ``(bm, bn)`` positive integers.
      name: argument name for the error message (e.g. the layer path).

    Returns:
      The block grid ``(rows, cols)``.

    Raises:
      ValueError: not two positive integers, or they do not divide the matrix view.
    """
    try:
        bm, bn = (int(b) for b in block_shape)
        ok = all(float(b) == int(b) for b in block_shape)
    except (TypeError, ValueError):
        ok = False
    if not ok or bm < 1 or bn < 1:
        raise ValueError(
            f"{name}={block_shape!r} is not allowed: use two positive integers (bm, bn)"
        )
    m, n = matrix_shape(shape)
    if m % bm or n % bn:
        div_m = [d for d in (1, 2, 4, 8, 16, 32) if m % d == 0]
        div_n = [d for d in (1, 2, 4, 8, 16, 32) if n % d == 0]
        raise ValueError(
            f"{name}={tuple(block_shape)} does not divide the ({m}, {n}) matrix view of a kernel "
            f"of shape {tuple(shape)}: allowed bm divide {m} (e.g. {div_m}), bn divide {n} "
            f"(e.g. {div_n})"
        )
    return m // bm, n // bn


def block_norms(w, block_shape):
    """L2 norm of every block.

    Args:
      w: kernel array.
      block_shape: ``(bm, bn)`` dividing the matrix view.

    Returns:
      Array ``(R, C)`` of block norms.
    """
    check_block_shape(w.shape, block_shape)
    m, n = matrix_shape(w.shape)
    bm, bn = block_shape
    # Sum pooling over each block's rows, then its columns: XLA:CPU runs a sum over the
    # middle axes of the 4-D block view slowly.
    rows = jax.lax.reduce_window(
        jnp.square(w).reshape(m, n), 0.0, jax.lax.add, (bm, 1), (bm, 1), "VALID"
    )
    return jnp.sqrt(jax.lax.reduce_window(rows, 0.0, jax.lax.add, (1, bn), (1, bn), "VALID"))


def expand_block_mask(bmask, block_shape, shape):
    """Expands a ``(R, C)`` block mask to a mask of the kernel's shape.

    Args:
      bmask: ``(R, C)`` 0/1 array.
      block_shape: ``(bm, bn)``.
      shape: the kernel shape.

    Returns:
      0/1 array of ``shape`` and ``bmask``'s dtype.
    """
    bm, bn = block_shape
    r, c = bmask.shape
    # A broadcast (not a repeat): XLA fuses it into the elementwise op that uses the mask, so
    # a block mask applied to a kernel costs no full-size mask read.
    full = jnp.broadcast_to(bmask[:, None, :, None], (r, bm, c, bn))
    return full.reshape(shape)


def kept_blocks(n_blocks, compression):
    """Number of blocks kept: ``ceil(n_blocks / compression)``, at least 1.

    Args:
      n_blocks: total blocks (int).
      compression: ratio >= 1 (value).

    Returns:
      int32 array.
    """
    c = jnp.maximum(jnp.asarray(compression, jnp.float32), 1.0)
    return jnp.maximum(jnp.ceil(n_blocks / c), 1).astype(jnp.int32)


def top_k_keep(scores, k):
    """True at the ``k`` largest entries of every row (last axis); ties go to the lower index.

    The ``k``-th largest value comes from a sort; entries above it are kept, and ties at it
    in index order (NaN ranks lowest). ``k`` is a value (traced is fine, so it vmaps over
    compression ratios).

    Args:
      scores: float array ``(..., n)``.
      k: number to keep per row, an int value, clipped to ``[0, n]``.

    Returns:
      bool array of ``scores``' shape.
    """
    x = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    n = x.shape[-1]
    k = jnp.broadcast_to(jnp.clip(jnp.asarray(k, jnp.int32), 0, n), x.shape[:-1])[..., None]
    # k = 0 reads the largest value, which no entry exceeds, and leaves room for none.
    kth = jnp.take_along_axis(jnp.sort(x, axis=-1), jnp.minimum(n - k, n - 1), axis=-1)
    above = x > kth
    tied = x == kth
    room = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    return above | (tied & (jnp.cumsum(tied, axis=-1, dtype=jnp.int32) <= room))


BALANCE = ("none", "rows", "columns")


def check_balance(balanced, name: str = "balanced") -> str:
    """The balance mode ``balanced`` names (``False``/``True`` mean ``"none"``/``"rows"``).

    Args:
      balanced: ``False``, ``True`` or one of :data:`BALANCE`.
      name: argument name for the error message.

    Returns:
      One of :data:`BALANCE`.

    Raises:
      ValueError: anything else.
    """
    if balanced is False or balanced is True:
        return "rows" if balanced else "none"
    if balanced not in BALANCE:
        raise ValueError(
            f"{name}={balanced!r} is not allowed: use one of {BALANCE} ('rows': equal kept "
            "blocks per block row; 'columns': the layer's kept blocks spread evenly over its "
            "block columns)"
        )
    return balanced


def _spread_over_columns(norms, k):
    """Keeps ``k`` blocks in all, ``k // C`` or one more in every block column.

    Each column keeps its ``k // C`` largest blocks; the ``k mod C`` left over go to the
    columns whose next block is largest, one each (ties to the lower index).
    """
    r, c = norms.shape
    x = jnp.where(jnp.isnan(norms), -jnp.inf, norms)
    rank = jnp.argsort(jnp.argsort(-x, axis=0, stable=True), axis=0)  # 0 = largest in column
    base = k // c
    keep = rank < base
    nxt = jnp.where(rank == base, x, -jnp.inf).reshape(-1)
    extra = top_k_keep(nxt, k - base * c).reshape(r, c) & (rank == base)
    return keep | extra


def block_keep(norms, compression, *, balanced: bool | str = False):
    """Block-level keep mask from block norms.

    Args:
      norms: ``(R, C)`` block norms.
      compression: ratio >= 1 (value).
      balanced: ``"none"`` (or ``False``): ``ceil(R * C / compression)`` blocks anywhere;
        ``"rows"`` (or ``True``): ``ceil(C / compression)`` blocks in every block row (the
        coarse-grain hardware layout); ``"columns"``: ``ceil(R * C / compression)`` blocks,
        spread evenly over the block columns (output-channel groups), so no group of output
        channels loses every block while others keep many.

    Returns:
      ``(R, C)`` float32 0/1 mask.
    """
    r, c = norms.shape
    mode = check_balance(balanced)
    if mode == "rows":
        keep = top_k_keep(norms, kept_blocks(c, compression))
    elif mode == "columns":
        keep = _spread_over_columns(norms, kept_blocks(r * c, compression))
    else:
        k = kept_blocks(r * c, compression)
        keep = top_k_keep(norms.reshape(-1), k).reshape(r, c)
    return keep.astype(jnp.float32)


def block_mask(w, block_shape, compression, *, balanced: bool | str = False):
    """0/1 mask of ``w``'s shape keeping the blocks of largest L2 norm.

    Keeps ``ceil(n_blocks / compression)`` blocks (per layer), or with ``balanced="rows"``
    ``ceil(C / compression)`` blocks in each of the ``R`` block rows, or with
    ``balanced="columns"`` ``ceil(n_blocks / compression)`` spread evenly over the columns.
    Ties go to the block that comes first in row-major order, so counts are exact.

    Args:
      w: kernel (Dense ``(in, out)`` or Conv ``(kh, kw, cin, cout)``).
      block_shape: ``(bm, bn)`` dividing the matrix view (else ValueError).
      compression: ratio >= 1, a value (may be traced / vmapped).
      balanced: ``"none"``, ``"rows"`` or ``"columns"`` (:func:`block_keep`).

    Returns:
      float32 mask of ``w.shape``.

    Example:
      >>> w = jax.random.normal(jax.random.key(0), (64, 32))
      >>> masks = jax.vmap(lambda c: block_mask(w, (8, 8), c))(jnp.array([1., 2., 4.]))
    """
    check_compression(compression)
    norms = block_norms(w, block_shape)
    return expand_block_mask(
        block_keep(norms, compression, balanced=balanced), block_shape, w.shape
    )


def global_block_keep(weights: Mapping, block_shapes: Mapping, compression):
    """Block-level keep masks ranking all blocks of several layers together (one budget).

    Norms are divided by ``sqrt(bm * bn)`` so layers with different block shapes compete on
    root-mean-square magnitude. Keeps ``ceil(total_blocks / compression)`` blocks in all.

    Args:
      weights: name -> kernel.
      block_shapes: name -> ``(bm, bn)`` (same keys).
      compression: ratio >= 1 (value).

    Returns:
      name -> ``(R, C)`` float32 0/1 block mask.
    """
    check_compression(compression)
    names = list(weights)
    norms = {
        k: block_norms(weights[k], block_shapes[k]) / math.sqrt(np.prod(block_shapes[k]))
        for k in names
    }
    flat = jnp.concatenate([norms[k].reshape(-1) for k in names])
    keep = top_k_keep(flat, kept_blocks(flat.size, compression)).astype(jnp.float32)
    out, start = {}, 0
    for k in names:
        size = norms[k].size
        out[k] = keep[start : start + size].reshape(norms[k].shape)
        start += size
    return out


def global_block_masks(weights: Mapping, block_shapes: Mapping, compression):
    """Masks ranking all blocks of several layers together: :func:`global_block_keep` expanded.

    Args:
      weights: name -> kernel.
      block_shapes: name -> ``(bm, bn)`` (same keys).
      compression: ratio >= 1 (value).

    Returns:
      name -> float32 mask of the kernel's shape.
    """
    keep = global_block_keep(weights, block_shapes, compression)
    return {k: expand_block_mask(keep[k], block_shapes[k], weights[k].shape) for k in keep}


def prox_block_factor(w, block_shape, threshold):
    """Per-block shrink factor of the block-lasso prox: ``max(0, 1 - threshold / ||w_B||)``.

    Args:
      w: kernel.
      block_shape: ``(bm, bn)`` dividing the matrix view.
      threshold: ``t * lambda`` >= 0 (value).

    Returns:
      ``(R, C)`` factors in ``[0, 1]`` (0: the block is zeroed).
    """
    norms = block_norms(w, block_shape)
    return jnp.maximum(0.0, 1.0 - threshold / jnp.maximum(norms, 1e-12))


def prox_block_lasso(w, block_shape, threshold):
    """Proximal operator of the block (group) lasso ``threshold * sum_B ||w_B||_2``.

    ``w_B <- w_B * max(0, 1 - threshold / ||w_B||)``: blocks with norm below ``threshold``
    become exactly zero, the others shrink towards zero by ``threshold`` in norm.

    Args:
      w: kernel.
      block_shape: ``(bm, bn)`` dividing the matrix view.
      threshold: ``t * lambda`` (step size times regularisation strength), a value >= 0.

    Returns:
      The shrunk kernel, same shape.
    """
    factor = prox_block_factor(w, block_shape, threshold)
    return w * expand_block_mask(factor.astype(w.dtype), block_shape, w.shape)


def block_sparsity(w, block_shape):
    """Fraction of blocks that are entirely zero.

    Args:
      w: kernel.
      block_shape: ``(bm, bn)``.

    Returns:
      float32 scalar in ``[0, 1]``.
    """
    return jnp.mean((block_norms(w, block_shape) == 0).astype(jnp.float32))
