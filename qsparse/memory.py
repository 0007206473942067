"""Memory model: every bit a deployed model needs, per layer and in total.

For a layer with kernel ``W`` (matrix view ``m x n``), ``b`` biases, weight bit width ``k``
(``k = 32``: float32, no scale), block shape ``(bm, bn)`` on an ``R x C`` block grid
(``R = m / bm``, ``C = n / bn``) of which ``K`` blocks are kept:

* codes   = ``K * bm * bn * k``                (dense layers: ``m * n * k``)
* index   = ``min(bitmap, csr)`` for block-sparse layers, 0 for dense ones and for block-sparse
  layers that keep every block (the export then writes no index), where
  ``bitmap = R * C`` (one bit a block) and
  ``csr = (R + 1) * bitlen(R * C) + K * max(1, bitlen(C - 1))`` (block-CSR: row pointers of
  ``bitlen(R*C)`` bits, one column index of ``bitlen(C-1)`` bits per kept block).
* scales  = ``32`` per weight scale when ``k < 32`` (one, or ``n`` per-channel), plus ``32``
  for the activation clip when the layer's output is quantized (``a < 32``).
* biases  = ``32 * b``.
* weight memory = codes + index + scales + biases; the FP32 dense reference is
  ``32 * (m * n + b)``; weight compression = reference / weight memory.

Activation memory is for batch-1 inference. Buffers: the input (``input_bits`` per value,
8 for uint8 pixels), and each layer's output at that layer's activation bits (32 where not
quantized, e.g. the logits). Layers run in sequence, so the peak live memory is the largest
``input buffer + output buffer`` of one layer; the total is the sum of all buffers.

Counts are exact integers: numpy int64 for concrete inputs, int32 under ``jit``/``vmap``
(exact up to 2**31 bits, 64M float32 weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FP_BITS = 32
SCALE_BITS = 32
BIAS_BITS = 32


def _xp(*values):
    return jnp if any(isinstance(v, jax.core.Tracer) for v in values) else np


def _int(xp, v):
    return xp.asarray(v).astype(xp.int32 if xp is jnp else xp.int64)


def bitlen(v: int) -> int:
    """Bits needed to write the non-negative integer ``v`` (at least 1).

    Args:
      v: integer >= 0.

    Returns:
      ``max(1, v.bit_length())``.
    """
    return max(1, int(v).bit_length())


def index_bits(grid, kept):
    """Bits of the block index: the smaller of a bitmap and block-CSR.

    Args:
      grid: ``(R, C)`` block grid (static ints).
      kept: kept blocks ``K`` (int or int array).

    Returns:
      ``(bits, use_csr)``: the smaller size and whether block-CSR is the smaller one
      (ties go to the bitmap); ``(0, False)`` when every block is kept.
    """
    r, c = int(grid[0]), int(grid[1])
    xp = _xp(kept)
    kept = _int(xp, kept)
    bitmap = _int(xp, r * c)
    csr = _int(xp, (r + 1) * bitlen(r * c)) + kept * bitlen(c - 1)
    use_csr = csr < bitmap
    bits = xp.where(use_csr, csr, bitmap)
    # Every block kept: no index at all (the layer is stored dense).
    full = kept >= r * c
    return xp.where(full, _int(xp, 0), bits), use_csr & ~full


def layer_memory(
    kernel_shape,
    bias_size: int,
    *,
    w_bits,
    kept=None,
    block_shape=None,
    per_channel: bool = False,
    a_bits=FP_BITS,
    act_quantized: bool = False,
):
    """Weight memory of one layer, broken down.

    Args:
      kernel_shape: the kernel's shape (matrix view taken over all but the last axis).
      bias_size: number of biases (0 for none).
      w_bits: weight bit width (value; ``>= 32`` means float32 with no scale).
      kept: kept blocks ``K``; required when ``block_shape`` is given.
      block_shape: ``(bm, bn)`` for block-sparse layers, ``None`` for dense.
      per_channel: one weight scale per output channel.
      a_bits: the layer's output activation bits (value).
      act_quantized: whether the layer's output goes through the activation quantizer.

    Returns:
      dict of integer arrays: ``codes``, ``index``, ``scales``, ``biases``, ``total``,
      ``fp32``, ``kept_weights``, ``index_is_csr`` (bool).
    """
    m = int(np.prod(kernel_shape[:-1]))
    n = int(kernel_shape[-1])
    xp = _xp(w_bits, kept, a_bits)
    wb = xp.minimum(_int(xp, xp.round(xp.asarray(w_bits, np.float32))), FP_BITS)
    ab = xp.asarray(a_bits, np.float32)
    if block_shape is None:
        kept_w = _int(xp, m * n)
        idx, is_csr = _int(xp, 0), xp.asarray(False)
    else:
        bm, bn = int(block_shape[0]), int(block_shape[1])
        kept_w = _int(xp, kept) * (bm * bn)
        idx, is_csr = index_bits((m // bm, n // bn), kept)
    codes = kept_w * wb
    n_scales = n if per_channel else 1
    scales = xp.where(wb < FP_BITS, _int(xp, SCALE_BITS * n_scales), _int(xp, 0))
    if act_quantized:
        scales = scales + xp.where(ab < FP_BITS, _int(xp, SCALE_BITS), _int(xp, 0))
    biases = _int(xp, BIAS_BITS * int(bias_size))
    total = codes + idx + scales + biases
    return {
        "codes": codes,
        "index": idx,
        "scales": scales,
        "biases": biases,
        "total": total,
        "fp32": _int(xp, FP_BITS * (m * n + int(bias_size))),
        "kept_weights": kept_w,
        "index_is_csr": is_csr,
    }


def activation_memory(
    input_size: int, output_sizes: Sequence[int], a_bits: Sequence, input_bits: int = 8
):
    """Batch-1 activation memory of a chain of layers.

    Args:
      input_size: values in the model input.
      output_sizes: values in each layer's output, in execution order.
      a_bits: each output's bit width (values; ``>= 32`` means float32).
      input_bits: bits per input value (8 for uint8 pixels).

    Returns:
      dict with ``peak`` (largest input+output pair of one layer), ``total`` (all buffers) and
      ``buffers`` (list of each buffer's bits, input first).
    """
    xp = _xp(*a_bits)
    bufs = [_int(xp, input_size * input_bits)]
    for size, bits in zip(output_sizes, a_bits):
        b = xp.minimum(_int(xp, xp.round(xp.asarray(bits, np.float32))), FP_BITS)
        bufs.append(_int(xp, size) * b)
    pairs = xp.stack([bufs[i] + bufs[i + 1] for i in range(len(bufs) - 1)])
    return {"peak": xp.max(pairs), "total": sum(bufs[1:], bufs[0]), "buffers": bufs}


def summarize(layers: dict, activations: dict):
    """Totals over layers and the compression ratio.

    Args:
      layers: name -> :func:`layer_memory` dict.
      activations: :func:`activation_memory` dict.

    Returns:
      dict: ``weight_memory_bits``, ``fp32_weight_memory_bits``, ``weight_compression``,
      ``codes_bits``, ``index_bits``, ``scale_bits``, ``other_bits`` (every parameter and
      statistic that is not a covered weight, at its dtype's bits), ``activation_memory_bits``
      (peak), ``activation_total_bits``, ``total_memory_bits`` (weights + peak activations).
    """

    def tot(key):
        return sum(v.get(key, 0) for v in layers.values())

    weight = tot("total")
    fp32 = tot("fp32")
    xp = _xp(weight)
    return {
        "weight_memory_bits": weight,
        "fp32_weight_memory_bits": fp32,
        "weight_compression": xp.asarray(fp32, np.float32) / xp.asarray(weight, np.float32),
        "codes_bits": tot("codes"),
        "index_bits": tot("index"),
        "scale_bits": tot("scales"),
        "other_bits": tot("other"),
        "activation_memory_bits": activations["peak"],
        "activation_total_bits": activations["total"],
        "total_memory_bits": weight + activations["peak"],
    }
