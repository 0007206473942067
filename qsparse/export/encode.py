"""One covered weight in the payload: codes of the kept blocks, block index and scale(s).

:func:`quantizer` compiles the program that fake-quantizes every kernel exactly as in
training; :func:`encode_weight` checks a quantized kernel is ``code * scale`` and writes it into
a :class:`Payload`, the arrays that follow the manifest back to back.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np

from qsparse import memory as mem
from qsparse import quant
from qsparse.export.format import (
    FULL,
    KERNEL_DTYPES,
    blocks,
    code_levels,
    pack_bits,
    unsigned_codes,
)
from qsparse.wrap import Plan, get_path


class Payload:
    """Collects arrays back to back and their manifest entries.

    Attributes:
      chunks: the arrays' bytes, in payload order.
      entries: their array table entries (``docs/FORMAT.md``).
      size: the payload's bytes so far.
    """

    def __init__(self):
        self.chunks: list[bytes] = []
        self.entries: list[dict] = []
        self.size = 0

    def add(self, name, layer, role, data: bytes, *, dtype, bits, shape, meaning) -> str:
        """Appends one array's bytes and its table entry; returns ``name``."""
        count = int(np.prod(shape)) if len(shape) else 1
        self.entries.append(
            {
                "name": name,
                "layer": layer,
                "role": role,
                "dtype": dtype,
                "bits": int(bits),
                "shape": [int(d) for d in shape],
                "count": count,
                "offset": self.size,
                "nbytes": len(data),
                "crc32": zlib.crc32(data),
                "meaning": meaning,
            }
        )
        self.chunks.append(data)
        self.size += len(data)
        return name

    def add_f32(self, name, layer, role, values, meaning) -> str:
        """Appends ``values`` as little-endian float32; returns ``name``."""
        a = np.asarray(values, np.float32)
        return self.add(
            name,
            layer,
            role,
            a.astype("<f4").tobytes(),
            dtype="float32",
            bits=32,
            shape=a.shape,
            meaning=meaning,
        )

    def add_packed(self, name, layer, role, values, bits, shape, meaning) -> str:
        """Appends unsigned integers bit-packed at ``bits`` each; returns ``name``."""
        return self.add(
            name,
            layer,
            role,
            pack_bits(values, bits),
            dtype="packed",
            bits=bits,
            shape=shape,
            meaning=meaning,
        )

    def layer_nbytes(self, layer: str) -> int:
        """Bytes of the arrays of one layer."""
        return sum(e["nbytes"] for e in self.entries if e["layer"] == layer)


# ---- quantized kernels -----------------------------------------------------------------------

# Plan id -> (plan, jitted quantizer); a few recent plans, so repeated saves compile once.
_QUANTIZERS: dict[int, tuple[Plan, Any]] = {}


def quantizer(plan: Plan):
    """One compiled program: quantized kernels, the steps used, and the memory model.

    Spec values are arguments, not constants, as in training, so the kernels and steps come
    out of the same kind of program as the trained model's; one compilation serves every spec.
    """
    hit = _QUANTIZERS.get(id(plan))
    if hit is not None and hit[0] is plan:
        return hit[1]

    def fn(params, qparams, spec):
        steps = {}
        for name, lp in plan.layers.items():
            r = lp.rule
            if r.scale_mode != "learned":
                steps[name] = quant.weight_step(
                    get_path(params, lp.path),
                    spec[name]["w_bits"],
                    per_channel=r.per_channel,
                    scale_mode=r.scale_mode,
                    zero_level=r.zero_level,
                )
        q = plan.transform_params(params, qparams, spec)
        return {
            "q": q,
            "steps": steps,
            "mem_q": plan.memory(spec, q),
            "mem_p": plan.memory(spec, params),
        }

    jitted = jax.jit(fn)
    if len(_QUANTIZERS) >= 8:
        _QUANTIZERS.pop(next(iter(_QUANTIZERS)))
    _QUANTIZERS[id(plan)] = (plan, jitted)
    return jitted


# ---- one covered weight ----------------------------------------------------------------------


def _signed_codes(q, s, bits: int, zero_level: bool) -> np.ndarray:
    """Signed codes of fake-quantized weights ``q`` (matrix view) with column scales ``s``."""
    x = q / s
    if bits == 1:
        return np.where(x >= 0, 1, -1).astype(np.int64)
    if zero_level:
        return np.rint(x).astype(np.int64)
    return np.rint(x - 0.5).astype(np.int64)


def _weight_scale(lp, qparams, steps) -> np.ndarray:
    """The float32 step(s) the layer's weight quantizer used."""
    if lp.rule.scale_mode == "learned":
        step = np.asarray(qparams[lp.name]["w_step"], np.float32)
        s = np.maximum(np.abs(step), np.float32(1e-8))
    else:
        s = np.asarray(steps[lp.name], np.float32)
    return s.astype(np.float32)


def _add_codes(payload, lp, mat, s, w_bits: int, keep, block_shape, dtype) -> str:
    """Packs the unsigned codes of the kept blocks; ValueError if ``mat`` is not code * scale
    (rounded to ``dtype``)."""
    name, zero_level = lp.name, lp.rule.zero_level
    bm, bn = block_shape
    grid = (mat.shape[0] // bm, mat.shape[1] // bn)
    codes = _signed_codes(mat, s, w_bits, zero_level)
    back = (code_levels(unsigned_codes(codes, w_bits), w_bits, zero_level) * s).astype(np.float32)
    back = back.astype(dtype).astype(np.float32)
    # Only kept blocks are stored; pruned ones are exact zeros (not on a 1-bit or mid-rise
    # grid, and never decoded).
    stored = np.repeat(np.repeat(keep.reshape(grid), bm, 0), bn, 1)
    if not np.array_equal(back[stored], mat[stored]):
        raise ValueError(
            f"layer {name}: the quantized kernel is not code * scale; the scale does "
            "not match the one the quantizer used"
        )
    u = blocks(unsigned_codes(codes, w_bits), bm, bn)[keep]
    return payload.add_packed(
        f"{name}/codes",
        name,
        "codes",
        u,
        w_bits,
        (int(keep.sum()), bm, bn),
        f"unsigned {w_bits}-bit weight codes of the kept blocks",
    )


def _add_index(payload, name: str, keep, grid, sparse: bool) -> tuple[str, dict]:
    """Writes the block index, bitmap or block-CSR, whichever is smaller (none if all kept).

    Returns:
      ``(kind, arrays)``: ``"none"``, ``"bitmap"`` or ``"csr"``, and the array names by role.
    """
    kept = int(keep.sum())
    idx_bits, use_csr = mem.index_bits(grid, kept) if sparse else (0, False)
    index = "none" if not int(idx_bits) else ("csr" if bool(use_csr) else "bitmap")
    arrays = {}
    if index == "bitmap":
        arrays["index_bitmap"] = payload.add_packed(
            f"{name}/index_bitmap",
            name,
            "index_bitmap",
            keep.astype(np.int64),
            1,
            grid,
            "1 bit a block, row-major block order: 1 = kept",
        )
    elif index == "csr":
        keep2 = keep.reshape(grid)
        arrays["index_rowptr"] = payload.add_packed(
            f"{name}/index_rowptr",
            name,
            "index_rowptr",
            np.concatenate([[0], np.cumsum(keep2.sum(1))]),
            mem.bitlen(grid[0] * grid[1]),
            (grid[0] + 1,),
            "block-CSR row pointers: kept blocks before each block row",
        )
        arrays["index_colidx"] = payload.add_packed(
            f"{name}/index_colidx",
            name,
            "index_colidx",
            np.nonzero(keep2)[1],
            mem.bitlen(grid[1] - 1),
            (kept,),
            "block-CSR column index of each kept block",
        )
    return index, arrays


def kernel_dtype(q) -> str:
    """The dtype name a covered kernel is stored and decoded in.

    Args:
      q: the fake-quantized kernel.

    Returns:
      One of :data:`~qsparse.export.format.KERNEL_DTYPES`.

    Raises:
      ValueError: another dtype.
    """
    dtype = str(np.asarray(q).dtype)
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"kernel dtype={dtype} cannot be exported: allowed {KERNEL_DTYPES}")
    return dtype


def encode_weight(
    payload, lp, q, w_bits: int, qparams, steps, dtype="float32"
) -> tuple[dict, dict]:
    """Writes one covered weight: codes (or float32 values) of the kept blocks, index, scale.

    Args:
      payload: the :class:`Payload` being written.
      lp: the layer's plan.
      q: the fake-quantized weight as the trained model uses it.
      w_bits: its bit width (32: float32 values).
      qparams: the quantizer parameters (learned steps).
      steps: the steps of the statistics-based quantizers, by layer.
      dtype: the kernel's dtype: ``code * scale`` in float32 is rounded to it (bfloat16
        parameters hold rounded values).

    Returns:
      ``(arrays, fields)``: the array names by role and the manifest fields that describe
      the stored weight (matrix shape, blocks, kept blocks, index kind).

    Raises:
      ValueError: the weight is not ``code * scale`` for the scale its quantizer used.
    """
    name, rule = lp.name, lp.rule
    q = np.asarray(q, np.float32)
    m, n = q.reshape(-1, q.shape[-1]).shape
    mat = q.reshape(m, n)
    sparse = rule.block_shape is not None
    bm, bn = (int(rule.block_shape[0]), int(rule.block_shape[1])) if sparse else (m, n)
    grid = (m // bm, n // bn)
    all_blocks = blocks(mat, bm, bn)
    keep = np.any(all_blocks != 0, axis=(1, 2)) if sparse else np.ones(1, bool)
    arrays: dict[str, str] = {}
    if w_bits >= FULL:
        arrays["weights"] = payload.add_f32(
            f"{name}/weights",
            name,
            "weights",
            all_blocks[keep],
            "float32 weights of the kept blocks (row-major block order, row-major inside)",
        )
    else:
        s = _weight_scale(lp, qparams, steps)
        arrays["codes"] = _add_codes(payload, lp, mat, s, w_bits, keep, (bm, bn), dtype)
    index, index_arrays = _add_index(payload, name, keep, grid, sparse)
    arrays.update(index_arrays)
    if w_bits < FULL:
        arrays["w_scale"] = payload.add_f32(
            f"{name}/w_scale",
            name,
            "w_scale",
            s,
            "weight step: value = level * step (per output channel if shape [n])",
        )
    fields = {
        "matrix_shape": [m, n],
        "block_sparse": sparse,
        "block_shape": [bm, bn],
        "block_grid": list(grid),
        "kept_blocks": int(keep.sum()),
        "index": index,
    }
    return arrays, fields


def encode_bias(payload, key: str, layer, b, bits: int) -> dict:
    """Writes a covered layer's biases: float32, or int8 codes and their float32 scale.

    The codes are ``round(b / s)`` with ``s = quant.bias_scale(b, bits)``, what
    :func:`qsparse.quant.quantize_bias` trains with, so ``float32(code) * s`` is the trained
    bias bit for bit.

    Args:
      payload: the payload.
      key: the arrays' name prefix (``{key}/bias``, ``{key}/bias_scale``).
      layer: the layer name of the array table entries (None for a model-layout tensor).
      b: the float32 biases.
      bits: the rule's ``bias_bits`` (:data:`qsparse.quant.BIAS_BITS`).

    Returns:
      ``{"bias": name}``, plus ``"bias_scale"`` for int8 codes.
    """
    b = np.asarray(b, np.float32)
    if bits >= FULL:
        return {"bias": payload.add_f32(f"{key}/bias", layer, "bias", b, "float32 biases")}
    s = quant.bias_scale(b, bits)
    codes = np.asarray(jax.numpy.round(b / s)).astype(np.int8)
    return {
        "bias": payload.add(
            f"{key}/bias",
            layer,
            "bias",
            codes.astype("<i1").tobytes(),
            dtype="int8",
            bits=8,
            shape=codes.shape,
            meaning="int8 bias codes: bias = float32(code) * bias_scale",
        ),
        "bias_scale": payload.add_f32(
            f"{key}/bias_scale", layer, "bias_scale", np.asarray(s), "scale of the int8 biases"
        ),
    }
