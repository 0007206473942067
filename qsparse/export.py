"""Bit-packed model files: writer, reader, and inference from the packed form.

A wrapped model (a :class:`qsparse.wrap.Plan`, its trained ``{"params", "quant"}`` tree and a
concrete layer spec) is written as ONE file whose payload holds exactly what the memory model
(:mod:`qsparse.memory`) counts: per layer the k-bit weight codes of the kept blocks only,
bit-packed as one continuous little-endian (LSB-first) bit stream, the block index (bitmap or
block-CSR, whichever is smaller; none when every block is kept), float32 scales, float32
biases and the float32 activation clip. The payload's size equals ``weight_memory_bits / 8``
up to byte rounding of each array; :func:`save` returns both numbers.

File layout (``docs/FORMAT.md`` is the full specification, enough to decode with numpy alone;
``tools/decode_numpy.py`` is a decoder written from it)::

    32-byte header | manifest (UTF-8 JSON) | payload (the arrays, back to back)

:func:`load` checks the magic, version, sizes, CRC32s and the manifest against the arrays, and
raises :class:`FormatError` (one line) on any mismatch. :class:`PackedModel` decodes the
kernels and runs the model with the same Flax/JAX ops as :func:`qsparse.training.logits_fn`,
so its logits are the trained model's (bit-identical in the tests; XLA may reorder a sum).

The quantizers keep pruned (exactly zero) weights at zero at every bit width, 1-bit and
mid-rise included, so pruned blocks are never stored and decoded kernels equal the trained
fake-quantized kernels bit for bit.

Example:
  >>> info = save("model.qsp", plan, state.params, spec["layers"], model=model)
  >>> packed = load("model.qsp")
  >>> packed.accuracy(ds.test_x, ds.test_y)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qsparse import memory as mem
from qsparse import models, quant
from qsparse.wrap import Plan, get_path, module_path

MAGIC = b"\x89QSPARSE"
VERSION = 1
# magic, version, manifest length, manifest CRC32, payload length, payload CRC32.
_HEADER = struct.Struct("<8sIIIQI")
HEADER_SIZE = _HEADER.size  # 32
FULL = quant.FULL_PRECISION
# Parameters and statistics that are not covered weights are stored as they are, little-endian.
RAW_DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int32", "uint32")


class FormatError(ValueError):
    """A packed model file is malformed: bad magic or version, truncated, or corrupted."""


# ---- bit packing -----------------------------------------------------------------------------


def pack_bits(values, bits: int) -> bytes:
    """Packs unsigned integers into a continuous LSB-first bit stream.

    Element ``i`` occupies stream bits ``i*bits .. (i+1)*bits - 1``, its least significant bit
    first; stream bit ``j`` is bit ``j % 8`` (value ``1 << (j % 8)``) of byte ``j // 8``. The
    unused high bits of the last byte are zero.

    Args:
      values: non-negative integers, each ``< 2**bits`` (any shape; flattened row-major).
      bits: bits per value, 1..31.

    Returns:
      ``ceil(len(values) * bits / 8)`` bytes.

    Raises:
      ValueError: a value does not fit in ``bits`` bits.
    """
    v = np.asarray(values, np.int64).ravel()
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"values in [{v.min()}, {v.max()}] do not fit in {bits} unsigned bits")
    stream = ((v[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(stream.ravel(), bitorder="little").tobytes()


def unpack_bits(data, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    Args:
      data: the packed bytes (at least ``ceil(count * bits / 8)``).
      bits: bits per value.
      count: number of values.

    Returns:
      int64 array of ``count`` values.
    """
    buf = np.frombuffer(data, np.uint8)
    stream = np.unpackbits(buf, bitorder="little", count=count * bits)
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    return stream.reshape(count, bits).astype(np.int64) @ weights


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` values packed at ``bits`` bits each."""
    return (count * bits + 7) // 8


# ---- codes -----------------------------------------------------------------------------------


def unsigned_codes(c, bits: int) -> np.ndarray:
    """Signed codes -> the unsigned codes stored in the file.

    Args:
      c: signed integer codes (binary: -1/+1; else -n..n, or -2**(b-1)..2**(b-1)-1 mid-rise).
      bits: weight bits (1..31).

    Returns:
      int64 ``u``: ``(c + 1) / 2`` for ``bits == 1``, else ``c + 2**(bits - 1)``.
    """
    c = np.asarray(c, np.int64)
    return (c + 1) // 2 if bits == 1 else c + (1 << (bits - 1))


def signed_codes(u, bits: int) -> np.ndarray:
    """Inverse of :func:`unsigned_codes`.

    Args:
      u: unsigned codes.
      bits: weight bits.

    Returns:
      int64 ``c``: ``2u - 1`` for ``bits == 1``, else ``u - 2**(bits - 1)``.
    """
    u = np.asarray(u, np.int64)
    return 2 * u - 1 if bits == 1 else u - (1 << (bits - 1))


def code_levels(u, bits: int, zero_level: bool = True) -> np.ndarray:
    """The level multiplier (value / scale) of unsigned codes, float32.

    ``bits == 1``: ``2u - 1`` (``{-1, +1}``). ``zero_level``: ``u - 2**(bits-1)`` (``-n .. n``,
    ``n = 2**(bits-1) - 1``; ``u = 0`` unused). Mid-rise: ``u - 2**(bits-1) + 1/2``.

    Args:
      u: unsigned codes (integer array).
      bits: weight bits.
      zero_level: the level set.

    Returns:
      float32 array of the same shape.
    """
    u = np.asarray(u, np.int64)
    if bits == 1:
        return (2 * u - 1).astype(np.float32)
    v = (u - (1 << (bits - 1))).astype(np.float32)
    return v if zero_level else v + np.float32(0.5)


def _signed_codes(q, s, bits: int, zero_level: bool) -> np.ndarray:
    """Signed codes of fake-quantized weights ``q`` (matrix view) with column scales ``s``."""
    x = q / s
    if bits == 1:
        return np.where(x >= 0, 1, -1).astype(np.int64)
    if zero_level:
        return np.rint(x).astype(np.int64)
    return np.rint(x - 0.5).astype(np.int64)


# ---- the model's architecture ----------------------------------------------------------------


def _tuple2(v, default):
    if v is None:
        return default
    if isinstance(v, int):
        return (v, v)
    return tuple(int(a) for a in v)


def _trace_layers(model: nn.Module, input_shape: Sequence[int]) -> list[dict]:
    """Shapes and attributes of each Dense/Conv call, from one shape-only trace."""
    calls: list[dict] = []

    def recorder(next_fun, args, kw, context):
        y = next_fun(*args, **kw)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.Conv)):
            rec = {
                "name": module_path(mod),
                "kind": "conv" if isinstance(mod, nn.Conv) else "dense",
                "in_shape": tuple(int(d) for d in args[0].shape),
                "out_shape": tuple(int(d) for d in y.shape),
                "use_bias": bool(mod.use_bias),
            }
            if isinstance(mod, nn.Conv):
                ks = tuple(mod.kernel_size)
                if (
                    _tuple2(mod.kernel_dilation, (1, 1)) != (1, 1)
                    or _tuple2(mod.input_dilation, (1, 1)) != (1, 1)
                    or mod.feature_group_count != 1
                    or len(ks) != 2
                    or not mod.shared_weights
                ):
                    raise ValueError(
                        f"layer {rec['name']}: only 2-D convolutions without dilation or groups "
                        "can be exported"
                    )
                strides = _tuple2(mod.strides, (1, 1))
                padding = mod.padding
                if isinstance(padding, str):
                    if padding.upper() not in ("SAME", "VALID"):
                        raise ValueError(
                            f"layer {rec['name']}: padding={padding!r} cannot be exported; "
                            "use 'SAME', 'VALID' or explicit pads"
                        )
                    pads = jax.lax.padtype_to_pads(
                        rec["in_shape"][1:3], ks, strides, padding.upper()
                    )
                else:
                    pads = nn.linear.canonicalize_padding(padding, 2)
                rec.update(
                    strides=list(strides),
                    padding=padding if isinstance(padding, str) else "EXPLICIT",
                    pads=[[int(lo), int(hi)] for lo, hi in pads],
                )
            calls.append(rec)
        return y

    def init(x):
        with nn.intercept_methods(recorder):
            return model.init(jax.random.key(0), x)

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return calls


def _glue_graph(model: nn.Module | None, names: Sequence[str], kinds: Sequence[str]) -> list:
    """The op list of the models in :mod:`qsparse.models` (layers named in execution order)."""

    def layer(i):
        return {"op": kinds[i], "layer": names[i]}

    pool = {"op": "max_pool", "window": [2, 2], "strides": [2, 2]}
    if model is None or isinstance(model, models.MLP):
        if any(k != "dense" for k in kinds):
            raise ValueError("model=None is only allowed for MLPs (Dense layers only)")
        graph: list = [{"op": "flatten"}]
        for i in range(len(names)):
            graph.append(layer(i))
            if i < len(names) - 1:
                graph.append({"op": "relu"})
        return graph
    if isinstance(model, models.LeNet):
        n_conv = len(model.channels)
        graph = []
        for i in range(n_conv):
            graph += [layer(i), {"op": "relu"}, dict(pool)]
        return graph + [{"op": "flatten"}, layer(n_conv), {"op": "relu"}, layer(n_conv + 1)]
    if isinstance(model, models.VGG):
        graph, i = [], 0
        for _ in model.stages:
            graph += [layer(i), {"op": "relu"}, layer(i + 1), {"op": "relu"}, dict(pool)]
            i += 2
        # VGG averages over space when more than 4x4 is left, else flattens (see models.VGG);
        # the placeholder is resolved from the traced shapes in _check_graph.
        return graph + [{"op": "vgg_head"}, layer(i), {"op": "relu"}, layer(i + 1)]
    raise ValueError(
        f"model of class {type(model).__name__} has no known architecture: pass graph=[...] "
        "(ops: flatten, dense, conv, relu, max_pool, mean; see docs/FORMAT.md)"
    )


def _check_graph(graph: list, calls: list[dict], input_shape) -> list:
    """Runs the graph on shapes; checks each layer sees the traced input shape."""
    by_name = {c["name"]: c for c in calls}
    shape = (1, *input_shape)
    out = []
    for op in graph:
        kind = op["op"]
        if kind == "vgg_head":
            op = {"op": "mean", "axes": [1, 2]} if shape[1] > 4 else {"op": "flatten"}
            kind = op["op"]
        if kind == "flatten":
            shape = (1, int(np.prod(shape[1:])))
        elif kind == "relu":
            pass
        elif kind == "max_pool":
            (wh, ww), (sh, sw) = op["window"], op["strides"]
            shape = (1, (shape[1] - wh) // sh + 1, (shape[2] - ww) // sw + 1, shape[3])
        elif kind == "mean":
            shape = tuple(d for i, d in enumerate(shape) if i not in op["axes"])
        elif kind in ("dense", "conv"):
            c = by_name.get(op["layer"])
            if c is None or c["kind"] != kind:
                raise ValueError(f"graph op {op} names no {kind} layer of the model")
            if tuple(shape) != c["in_shape"]:
                raise ValueError(
                    f"graph gives layer {op['layer']} input shape {shape}, the model gives "
                    f"{c['in_shape']}: the graph does not describe this model"
                )
            shape = c["out_shape"]
        else:
            raise ValueError(f"graph op {kind!r} is not allowed")
        out.append(dict(op))
    used = [op["layer"] for op in out if "layer" in op]
    if used != [c["name"] for c in calls]:
        raise ValueError(
            f"graph runs layers {used}, the model runs {[c['name'] for c in calls]} "
            "(each once, in this order)"
        )
    return out


def _mlp_of(plan: Plan, ordered) -> models.MLP:
    """The :class:`qsparse.models.MLP` that ``model=None`` stands for, from the plan's layers."""
    if [lp.name for lp in ordered] != [f"Dense_{i}" for i in range(len(ordered))] or any(
        len(lp.kernel_shape) != 2 for lp in ordered
    ):
        raise ValueError(
            "model=None stands for a qsparse.models.MLP (layers Dense_0 .. Dense_n), the plan "
            f"has layers {[lp.name for lp in ordered]}: pass model="
        )
    return models.MLP(
        hidden=tuple(int(lp.kernel_shape[-1]) for lp in ordered[:-1]),
        num_classes=int(ordered[-1].kernel_shape[-1]),
    )


# Export runs the packed graph next to the model on this many random inputs; a few may differ
# (an activation quantizer can round a value the other way after a reordered float32 sum).
_CHECK_EXAMPLES = 64
_CHECK_MAY_DIFFER = 4
# (plan, model, jitted plan.apply) of recent exports, so repeated saves compile once.
_REFERENCES: list[tuple[Plan, nn.Module, Any]] = []


def _reference(plan: Plan, model: nn.Module):
    """``fn(params, qparams, spec, x) -> logits`` of the trained (fake-quantized) model."""
    for p, m, fn in _REFERENCES:
        if p is plan and (m is model or m == model):
            return fn
    fn = jax.jit(lambda params, qparams, spec, x: plan.apply(model, params, qparams, spec, x))
    if len(_REFERENCES) >= 8:
        _REFERENCES.pop(0)
    _REFERENCES.append((plan, model, fn))
    return fn


def _check_against_model(packed, model, plan, params, qparams, spec) -> None:
    """Runs the packed graph and the model on one random batch; ValueError where they differ.

    The inputs are random images on the uint8 grid (``u8 / 255``, as in training). An example
    differs when one of its logits is off by more than ``1e-4 * max(1, max |model logit|)``;
    more than ``_CHECK_MAY_DIFFER`` such examples and the graph is refused.
    """
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (_CHECK_EXAMPLES, *packed.input_shape), dtype=np.uint8)
    x = jnp.asarray(u8).astype(jnp.float32) / 255.0
    ref = np.asarray(_reference(plan, model)(params, qparams, spec, x), np.float64)
    got = np.asarray(packed.predict(x), np.float64)
    if got.shape != ref.shape:
        bad, worst = _CHECK_EXAMPLES, math.inf
    else:
        diff = np.abs(got - ref)
        tol = 1e-4 * max(1.0, float(np.max(np.abs(ref), initial=0.0)))
        bad = int(np.sum(np.any(~(diff <= tol), axis=1)))  # NaN differs
        worst = float(np.max(diff, initial=0.0))
    if bad > _CHECK_MAY_DIFFER:
        ops = ", ".join(
            f"{op['op']} {op['layer']}" if "layer" in op else op["op"] for op in packed.graph
        )
        agree = int(np.sum(got.argmax(-1) == ref.argmax(-1))) if got.shape == ref.shape else 0
        raise ValueError(
            f"graph does not describe the model: its logits {got.shape[1:]} differ from the "
            f"model's {ref.shape[1:]} on {bad} of {_CHECK_EXAMPLES} random inputs (max |diff| "
            f"{worst:.3g}, same prediction on {agree}); graph ops: {ops}"
        )


def _infer_input_shape(plan: Plan) -> tuple[int, ...]:
    first = min(plan.layers.values(), key=lambda lp: lp.order)
    if len(first.kernel_shape) == 2:
        return (plan.input_size,)
    cin = first.kernel_shape[-2]
    side = math.isqrt(plan.input_size // cin)
    if side * side * cin != plan.input_size:
        raise ValueError("input_shape cannot be inferred (input is not square): pass it")
    return (side, side, cin)


# ---- writing ---------------------------------------------------------------------------------


def _blocks(mat: np.ndarray, bm: int, bn: int) -> np.ndarray:
    """``(R*C, bm, bn)`` blocks of a matrix in row-major block order."""
    m, n = mat.shape
    return mat.reshape(m // bm, bm, n // bn, bn).transpose(0, 2, 1, 3).reshape(-1, bm, bn)


def _unblocks(blocks: np.ndarray, grid, bm: int, bn: int) -> np.ndarray:
    r, c = grid
    return blocks.reshape(r, c, bm, bn).transpose(0, 2, 1, 3).reshape(r * bm, c * bn)


def _scalar(v) -> float:
    return float(np.asarray(v))


class _Payload:
    """Collects arrays back to back and their manifest entries."""

    def __init__(self):
        self.chunks: list[bytes] = []
        self.entries: list[dict] = []
        self.size = 0

    def add(self, name, layer, role, data: bytes, *, dtype, bits, shape, meaning) -> str:
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


# Plan id -> (plan, jitted quantizer); a few recent plans, so repeated saves compile once.
_QUANTIZERS: dict[int, tuple[Plan, Any]] = {}


def _quantizer(plan: Plan):
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


def _encode_weight(payload, lp, q, w_bits: int, qparams, steps) -> tuple[dict, dict]:
    """Writes one covered weight: codes (or float32 values) of the kept blocks, index, scale.

    Args:
      payload: the :class:`_Payload` being written.
      lp: the layer's plan.
      q: the fake-quantized weight as the trained model uses it.
      w_bits: its bit width (32: float32 values).
      qparams: the quantizer parameters (learned steps).
      steps: the steps of the statistics-based quantizers, by layer.

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
    blocks = _blocks(mat, bm, bn)
    keep = np.any(blocks != 0, axis=(1, 2)) if sparse else np.ones(1, bool)
    kept = int(keep.sum())
    arrays: dict[str, str] = {}

    if w_bits >= FULL:
        arrays["weights"] = payload.add_f32(
            f"{name}/weights",
            name,
            "weights",
            blocks[keep],
            "float32 weights of the kept blocks (row-major block order, row-major inside)",
        )
    else:
        if rule.scale_mode == "learned":
            step = np.asarray(qparams[name]["w_step"], np.float32)
            s = np.maximum(np.abs(step), np.float32(1e-8))
        else:
            s = np.asarray(steps[name], np.float32)
        s = s.astype(np.float32)
        codes = _signed_codes(mat, s, w_bits, rule.zero_level)
        back = (code_levels(unsigned_codes(codes, w_bits), w_bits, rule.zero_level) * s).astype(
            np.float32
        )
        # Only kept blocks are stored; pruned ones are exact zeros (not on a 1-bit or
        # mid-rise grid, and never decoded).
        stored = np.repeat(np.repeat(keep.reshape(grid), bm, 0), bn, 1)
        exact = np.array_equal(back[stored], mat[stored])
        if not exact:
            raise ValueError(
                f"layer {name}: the quantized kernel is not code * scale; the scale does "
                "not match the one the quantizer used"
            )
        u = _blocks(unsigned_codes(codes, w_bits), bm, bn)[keep]
        arrays["codes"] = payload.add_packed(
            f"{name}/codes",
            name,
            "codes",
            u,
            w_bits,
            (kept, bm, bn),
            f"unsigned {w_bits}-bit weight codes of the kept blocks",
        )
    idx_bits, use_csr = mem.index_bits(grid, kept) if sparse else (0, False)
    index = "none" if not int(idx_bits) else ("csr" if bool(use_csr) else "bitmap")
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
        rowptr = np.concatenate([[0], np.cumsum(keep2.sum(1))])
        cols = np.nonzero(keep2)[1]
        arrays["index_rowptr"] = payload.add_packed(
            f"{name}/index_rowptr",
            name,
            "index_rowptr",
            rowptr,
            mem.bitlen(grid[0] * grid[1]),
            (grid[0] + 1,),
            "block-CSR row pointers: kept blocks before each block row",
        )
        arrays["index_colidx"] = payload.add_packed(
            f"{name}/index_colidx",
            name,
            "index_colidx",
            cols,
            mem.bitlen(grid[1] - 1),
            (kept,),
            "block-CSR column index of each kept block",
        )
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
        "kept_blocks": kept,
        "index": index,
    }
    return arrays, fields


def _has_bias(plan: Plan, lp) -> bool:
    return (*lp.path[:-1], "bias") in plan.params_shapes


def _next_layer(ordered, lp):
    """The layer after ``lp`` in a chain, or None for the last."""
    i = ordered.index(lp)
    return ordered[i + 1] if i + 1 < len(ordered) else None


def _layer_spec(spec) -> Mapping:
    if "layers" in spec and isinstance(spec["layers"], Mapping):
        return spec["layers"]
    return spec


def save(
    path,
    plan: Plan,
    params_tree,
    spec,
    *,
    model: nn.Module | None = None,
    model_state=None,
    input_shape: Sequence[int] | None = None,
    graph: list | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict:
    """Writes the bit-packed model file.

    Two layouts share the format. A chain of Dense/Conv layers with ReLU, pooling and flatten
    (``qsparse.models``' MLP, LeNet, VGG, or any model given with ``graph=``) is written with
    its op graph, so :class:`PackedModel` and ``tools/decode_numpy.py`` run it on their own.
    Any other model is written with every parameter and statistic it has: the covered weights
    packed, everything else at its dtype, and each covered operation's input quantizer;
    :func:`restore` rebuilds the variables, and the user's own model runs them
    (``plan.apply(..., quantized=True)``).

    Each wrapped kernel is fake-quantized exactly as in training (``plan.transform_params``);
    the blocks that are not entirely zero after quantization are kept and stored as unsigned
    k-bit codes (float32 values for 32-bit layers), with the block index, the weight scale(s)
    the quantizer used, the biases and the activation clip. The payload is what
    ``plan.memory(spec, q)`` counts, ``q`` being the quantized kernels; on a trained model
    that is ``plan.memory(spec, params)`` unless quantization emptied or filled blocks
    (``memory_model_bits_params`` below).

    Args:
      path: output file.
      plan: the model's :class:`~qsparse.wrap.Plan`.
      params_tree: ``{"params": flax params, "quant": quantizer params}``
        (:attr:`qsparse.training.TrainState.params`).
      spec: the concrete layer spec ``{layer: {"w_bits", "a_bits", "compression"}}`` (a full
        training spec with a ``"layers"`` entry is accepted too).
      model: the Linen module (``MLP``, ``LeNet`` or ``VGG`` of :mod:`qsparse.models`); its
        architecture (convolution strides and pads, pooling, flattening) goes to the manifest.
        ``None`` stands for a :class:`qsparse.models.MLP` (Dense layers only). Any other
        model (or one with batch statistics) is written in the model layout.
      model_state: the model's other collections (batch statistics), for the model layout.
      input_shape: one example's shape, e.g. ``(8, 8, 1)``; default: inferred from the plan
        (square images for conv models).
      graph: explicit op list for other models (see ``docs/FORMAT.md``). Every graph, given or
        built, is checked against a shape trace of ``model``, then run next to the model on 64
        random inputs: a graph that does not compute what the model computes is refused.
      meta: JSON-serialisable extra facts stored in the manifest (data set, accuracy, ...).

    Returns:
      dict: ``payload_bytes`` (the arrays), ``payload_bits`` (their exact bit count, before
      byte rounding), ``weight_memory_bits`` and ``weight_memory_bytes`` (the memory model on
      the stored kernels; ``payload_bits`` equals it), ``memory_model_bits_params`` (the memory
      model on ``params`` as given), ``file_bytes``, ``header_bytes`` (header + manifest),
      ``fp32_bytes`` (dense float32 model), ``compression`` (``fp32_bytes / payload_bytes``),
      ``file_compression`` (``fp32_bytes / file_bytes``), ``layers`` (per layer: kept blocks,
      index kind, payload bytes).

    Raises:
      ValueError: unsupported model, bad bit widths, a kernel not on its quantization grid, or
        a graph that does not describe the model (its logits differ from the model's on the
        random inputs; no file is written).
    """
    layer_spec = _layer_spec(spec)
    plan.check_spec(layer_spec)  # bits in the allowed set, compression >= 1, one line
    params, qparams = params_tree["params"], params_tree.get("quant", {})
    ordered = sorted(plan.layers.values(), key=lambda lp: lp.order)
    if graph is None and not _is_chain(plan, model):
        return _save_model(path, plan, params, qparams, layer_spec, model_state, input_shape, meta)
    input_shape = tuple(int(d) for d in (input_shape or _infer_input_shape(plan)))
    if int(np.prod(input_shape)) != plan.input_size:
        raise ValueError(f"input_shape={input_shape} does not hold {plan.input_size} values")

    kinds = ["conv" if len(lp.kernel_shape) == 4 else "dense" for lp in ordered]
    names = [lp.name for lp in ordered]
    if model is not None:
        calls = _trace_layers(model, input_shape)
    else:
        # A chain of Dense layers: each consumes the previous output.
        calls, shape = [], (1, plan.input_size)
        for lp in ordered:
            if len(lp.kernel_shape) != 2:
                raise ValueError("model=None is only allowed for MLPs: pass model=")
            out = (1, lp.kernel_shape[-1])
            calls.append({"name": lp.name, "kind": "dense", "in_shape": shape, "out_shape": out})
            calls[-1]["use_bias"] = _has_bias(plan, lp)
            shape = out
    if [c["name"] for c in calls] != names:
        raise ValueError(f"traced layers {[c['name'] for c in calls]} differ from plan {names}")
    try:
        graph = _check_graph(
            graph if graph is not None else _glue_graph(model, names, kinds), calls, input_shape
        )
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"graph is malformed: {type(e).__name__}: {e}") from None
    # The module the graph must reproduce (model=None stands for a qsparse.models.MLP).
    reference_model = model if model is not None else _mlp_of(plan, ordered)
    call_of = {c["name"]: c for c in calls}

    quantized = _quantizer(plan)(params, qparams, layer_spec)
    qtree = quantized["q"]
    payload = _Payload()
    layers_out, summary = [], {}
    for lp in ordered:
        name, rule = lp.name, lp.rule
        # The file stores each layer's output quantizer: the plan's input quantizer of the
        # layer after it in the chain (the graph check below proves the chain).
        nxt = _next_layer(ordered, lp)
        w_raw = _scalar(layer_spec[name]["w_bits"])
        a_raw = _scalar(layer_spec[nxt.name]["a_bits"]) if nxt is not None else FULL
        quant.check_bits(w_raw, f"{name}.w_bits")
        quant.check_bits(a_raw, f"{name}.a_bits")
        w_bits, a_bits = min(int(w_raw), FULL), min(int(a_raw), FULL)
        arrays, fields = _encode_weight(
            payload, lp, get_path(qtree, lp.path), w_bits, qparams, quantized["steps"]
        )
        kept, grid, index = fields["kept_blocks"], fields["block_grid"], fields["index"]
        if _has_bias(plan, lp):
            arrays["bias"] = payload.add_f32(
                f"{name}/bias",
                name,
                "bias",
                np.asarray(get_path(params, (*lp.path[:-1], "bias")), np.float32),
                "float32 biases",
            )
        act_q = nxt is not None and nxt.act_quantized and not nxt.a_signed and a_bits < FULL
        if act_q:
            clip = np.asarray(qparams[nxt.name]["a_clip"], np.float32)
            arrays["a_clip"] = payload.add_f32(
                f"{name}/a_clip",
                name,
                "a_clip",
                np.maximum(np.abs(clip), np.float32(1e-6)),
                f"activation clip c: round(clip(y, 0, c) / d) * d, d = c / {2**a_bits - 1}",
            )
        entry = {
            "name": name,
            "kind": call_of[name]["kind"],
            "kernel_shape": list(lp.kernel_shape),
            "matrix_shape": fields["matrix_shape"],
            "use_bias": _has_bias(plan, lp),
            "w_bits": w_bits,
            "scale_mode": rule.scale_mode,
            "per_channel": bool(rule.per_channel),
            "zero_level": bool(rule.zero_level),
            "block_sparse": fields["block_sparse"],
            "block_shape": fields["block_shape"],
            "block_grid": fields["block_grid"],
            "kept_blocks": kept,
            "index": index,
            "act_quantized": act_q,
            "a_bits": a_bits if act_q else FULL,
            "target_compression": _scalar(layer_spec[name]["compression"]),
            "arrays": arrays,
        }
        if entry["kind"] == "conv":
            c = call_of[name]
            entry.update(strides=c["strides"], padding=c["padding"], pads=c["pads"])
        layers_out.append(entry)
        summary[name] = {"kept_blocks": kept, "blocks": grid[0] * grid[1], "index": index}

    mem_q, mem_p = quantized["mem_q"], quantized["mem_p"]
    for lay in layers_out:
        lay["memory_bits"] = int(mem_q["layers"][lay["name"]]["total"])
        nbytes = sum(e["nbytes"] for e in payload.entries if e["layer"] == lay["name"])
        summary[lay["name"]]["payload_bytes"] = nbytes
    manifest = {
        "format": "qsparse-packed",
        "version": VERSION,
        "bit_order": "lsb-first",
        "byte_order": "little",
        "input": {"shape": list(input_shape), "dtype": "float32", "uint8_scale": 1.0 / 255.0},
        "num_classes": int(ordered[-1].kernel_shape[-1]),
        "model": _model_fields(model),
        "graph": graph,
        "layers": layers_out,
        "arrays": payload.entries,
        "payload_bytes": payload.size,
        "memory_model": {
            "weight_memory_bits": int(mem_q["weight_memory_bits"]),
            "fp32_weight_memory_bits": int(mem_q["fp32_weight_memory_bits"]),
            "codes_bits": int(mem_q["codes_bits"]),
            "index_bits": int(mem_q["index_bits"]),
            "scale_bits": int(mem_q["scale_bits"]),
            "other_bits": int(mem_q["other_bits"]),
        },
        "meta": dict(meta or {}),
    }

    # Read the bytes back and run their graph next to the model: a graph that does not compute
    # what the model computes is refused before anything is written.
    def check(data):
        _check_against_model(_load_bytes(data), reference_model, plan, params, qparams, layer_spec)

    return _finish(path, manifest, payload, mem_q, mem_p, summary, check)


def _is_chain(plan: Plan, model) -> bool:
    """Whether the model is one the graph layout describes (no state, Dense/Conv chain)."""
    if plan.state_shapes or any(lp.ops != (lp.ops[0],) for lp in plan.layers.values()):
        return False
    if any(
        lp.reads_input and lp.act_quantized and lp.rule.a_bits < FULL for lp in plan.layers.values()
    ):
        return False
    return model is None or isinstance(model, (models.MLP, models.LeNet, models.VGG))


def _save_model(path, plan: Plan, params, qparams, layer_spec, model_state, input_shape, meta):
    """:func:`save` in the model layout: every parameter and statistic of any model."""
    for name in plan.layers:
        for key in ("w_bits", "a_bits"):
            quant.check_bits(_scalar(layer_spec[name][key]), f"{name}.{key}")
    quantized = _quantizer(plan)(params, qparams, layer_spec)
    qtree = quantized["q"]
    payload = _Payload()
    layers_out, summary = [], {}
    ordered = sorted(plan.layers.values(), key=lambda lp: lp.order)
    for lp in ordered:
        name, rule = lp.name, lp.rule
        w_bits = min(int(_scalar(layer_spec[name]["w_bits"])), FULL)
        a_bits = min(int(_scalar(layer_spec[name]["a_bits"])), FULL)
        arrays, fields = _encode_weight(
            payload, lp, get_path(qtree, lp.path), w_bits, qparams, quantized["steps"]
        )
        act_q = lp.act_quantized and a_bits < FULL
        if act_q:
            arrays["a_clip"] = payload.add_f32(
                f"{name}/a_clip",
                name,
                "a_clip",
                np.asarray(qparams[name]["a_clip"], np.float32),
                "input clip c of the layer's matmuls / convolutions (quantize_activation)",
            )
        layers_out.append(
            {
                "name": name,
                "kind": lp.ops[0],
                "path": list(lp.path),
                "kernel_shape": list(lp.kernel_shape),
                "use_bias": False,
                "w_bits": w_bits,
                "scale_mode": rule.scale_mode,
                "per_channel": bool(rule.per_channel),
                "zero_level": bool(rule.zero_level),
                **fields,
                "act_quantized": False,
                "a_bits": FULL,
                "input": {"a_bits": a_bits if act_q else FULL, "signed": bool(lp.a_signed)},
                "target_compression": _scalar(layer_spec[name]["compression"]),
                "arrays": arrays,
            }
        )
        summary[name] = {"kept_blocks": fields["kept_blocks"], "index": fields["index"]}
    covered = {lp.path for lp in plan.layers.values()}
    tensors = []
    state = model_state or {}
    leaves = [("params", p, get_path(params, p)) for p in plan.params_shapes if p not in covered]
    leaves += [(p[0], p[1:], get_path(state, p)) for p in plan.state_shapes]
    for collection, p, value in leaves:
        a = np.asarray(value)
        dtype = str(a.dtype)
        if dtype not in RAW_DTYPES:
            raise ValueError(
                f"{collection}/{'/'.join(map(str, p))} has dtype {dtype}: the format stores"
                f" {RAW_DTYPES}"
            )
        key = "/".join(map(str, (collection, *p)))
        payload.add(
            key,
            None,
            "tensor",
            a.astype(a.dtype.newbyteorder("<")).tobytes(),
            dtype=dtype,
            bits=a.dtype.itemsize * 8,
            shape=a.shape,
            meaning="stored as it is",
        )
        tensors.append({"collection": collection, "path": list(p), "array": key})
    mem_q = quantized["mem_q"]
    in_shape = list(input_shape) if input_shape is not None else [plan.input_size]
    manifest = {
        "format": "qsparse-packed",
        "version": VERSION,
        "layout": "model",
        "bit_order": "lsb-first",
        "byte_order": "little",
        "input": {"shape": in_shape},
        "graph": None,
        "layers": layers_out,
        "tensors": tensors,
        "arrays": payload.entries,
        "payload_bytes": payload.size,
        "memory_model": {
            k: int(mem_q[k])
            for k in (
                "weight_memory_bits",
                "fp32_weight_memory_bits",
                "codes_bits",
                "index_bits",
                "scale_bits",
                "other_bits",
            )
        },
        "meta": dict(meta or {}),
    }
    return _finish(path, manifest, payload, mem_q, quantized["mem_p"], summary)


def _finish(path, manifest, payload, mem_q, mem_p, summary, check=None) -> dict:
    """Checks the payload against the memory model, writes the file, returns :func:`save`'s
    dict. ``check(data)`` may refuse the file's bytes before anything is written."""
    payload_bits = sum(e["count"] * e["bits"] for e in payload.entries)
    if payload_bits != int(mem_q["weight_memory_bits"]):
        # Cannot happen unless this writer and qsparse.memory disagree: refuse to write.
        raise RuntimeError(
            f"payload has {payload_bits} bits, the memory model counts "
            f"{int(mem_q['weight_memory_bits'])}: the writer and qsparse.memory disagree"
        )
    man = json.dumps(manifest, default=_json_default, separators=(",", ":")).encode()
    body = b"".join(payload.chunks)
    header = _HEADER.pack(MAGIC, VERSION, len(man), zlib.crc32(man), len(body), zlib.crc32(body))
    if check is not None:
        check(header + man + body)
    _write_atomic(path, header + man + body)
    fp32_bytes = int(mem_q["fp32_weight_memory_bits"]) // 8
    file_bytes = len(header) + len(man) + len(body)
    return {
        "path": str(path),
        "payload_bytes": payload.size,
        "payload_bits": int(payload_bits),
        "weight_memory_bits": int(mem_q["weight_memory_bits"]),
        "weight_memory_bytes": int(mem_q["weight_memory_bits"]) / 8,
        "memory_model_bits_params": int(mem_p["weight_memory_bits"]),
        "file_bytes": file_bytes,
        "header_bytes": len(header) + len(man),
        "fp32_bytes": fp32_bytes,
        "compression": fp32_bytes / max(payload.size, 1),
        "memory_compression": float(mem_q["weight_compression"]),
        "file_compression": fp32_bytes / file_bytes,
        "layers": summary,
    }


def _write_atomic(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary name, so a crash leaves no half file."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Restored(NamedTuple):
    """A model-layout file decoded into the pieces :meth:`qsparse.wrap.Plan.apply` takes.

    Attributes:
      params: the ``params`` collection, covered weights decoded to their quantized values.
      model_state: the other collections (batch statistics).
      qparams: ``{layer: {"a_clip", "w_step"}}`` as the file stores them.
      spec: ``{layer: {"w_bits", "a_bits", "compression"}}``.
    """

    params: dict
    model_state: dict
    qparams: dict
    spec: dict


def restore(path) -> Restored:
    """Reads a model-layout file back into variables for the user's own model.

    ``plan.apply(model, r.params, r.qparams, r.spec, x, state=r.model_state, quantized=True)``
    with the plan of the same model and rules then computes what the trained model computes in
    evaluation.

    Args:
      path: a file written by :func:`save` in the model layout (or its :class:`PackedModel`).

    Returns:
      The :class:`Restored` pieces.

    Raises:
      FormatError: a damaged file, or one in the graph layout (use :class:`PackedModel`).
    """
    packed = path if isinstance(path, PackedModel) else load(path)
    man = packed.manifest
    if man.get("layout") != "model":
        _fail("this file is in the graph layout: run it with qsparse.export.load(path).predict")
    params: dict = {}
    state: dict = {}
    qparams: dict = {}
    spec: dict = {}
    for lay in man["layers"]:
        name = lay["name"]
        params = _put(params, tuple(lay["path"]), jnp.asarray(packed.layers[name].kernel))
        entry = {}
        if lay["scale_mode"] == "learned" and packed.layers[name].scale is not None:
            entry["w_step"] = jnp.asarray(packed.layers[name].scale)
        if "a_clip" in lay["arrays"]:
            entry["a_clip"] = jnp.asarray(packed.raw(lay["arrays"]["a_clip"]))
        else:
            entry["a_clip"] = jnp.asarray(1.0, jnp.float32)  # unused at 32 bits
        qparams[name] = entry
        spec[name] = {
            "w_bits": jnp.asarray(lay["w_bits"], jnp.float32),
            "a_bits": jnp.asarray(lay["input"]["a_bits"], jnp.float32),
            "compression": jnp.asarray(lay["target_compression"], jnp.float32),
        }
    for t in man["tensors"]:
        value = jnp.asarray(packed.raw(t["array"]))
        if t["collection"] == "params":
            params = _put(params, tuple(t["path"]), value)
        else:
            state = _put(state, (t["collection"], *t["path"]), value)
    return Restored(params, state, qparams, spec)


def _put(tree: dict, path: tuple, value) -> dict:
    """``tree`` (nested dicts, built up in place) with ``value`` at ``path``."""
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    return tree


def _model_fields(model) -> dict:
    """The Linen module's class and dataclass fields (informative; the graph is normative)."""
    if model is None:
        return {"class": None}
    fields = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        v = getattr(model, f.name)
        if isinstance(v, (int, float, str, bool, type(None))):
            fields[f.name] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(a, (int, float)) for a in v):
            fields[f.name] = list(v)
    return {"class": type(model).__name__, "fields": fields}


def _json_default(o):
    if isinstance(o, (np.generic, jax.Array)) and np.ndim(o) == 0:
        return np.asarray(o).item()
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    raise TypeError(f"meta value of type {type(o).__name__} is not JSON-serialisable")


# ---- reading ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """One decoded layer.

    Attributes:
      name: layer name.
      kind: ``"dense"`` or ``"conv"``.
      kernel: the decoded dense kernel (float32, zeros in the blocks not stored).
      bias: float32 biases or ``None``.
      codes: signed integer codes (kernel's matrix view ``(m, n)``, 0 outside kept blocks;
        ``None`` for 32-bit layers).
      scale: the weight step(s) (``None`` for 32-bit layers).
      keep: ``(R, C)`` bool block mask of the stored blocks.
      a_bits: activation bits (32 = ReLU only, or no activation quantizer).
      a_clip: activation clip (``None`` when not quantized).
      entry: the layer's manifest entry.
    """

    name: str
    kind: str
    kernel: np.ndarray
    bias: np.ndarray | None
    codes: np.ndarray | None
    scale: np.ndarray | None
    keep: np.ndarray
    a_bits: int
    a_clip: np.ndarray | None
    entry: dict


class PackedModel:
    """A model read from a packed file, ready for inference.

    Attributes:
      manifest: the parsed manifest.
      layers: layer name -> :class:`PackedLayer`, in execution order.
      graph: the op list.
      input_shape: one example's shape.
      file_bytes: the file's size.
      payload_bytes: the size of its arrays.
    """

    def __init__(self, manifest: dict, layers: dict, file_bytes: int, table=None, payload=None):
        self._table, self._payload = table or {}, payload
        self.manifest = manifest
        self.layers = layers
        self.graph = manifest.get("graph")
        self.input_shape = tuple(manifest["input"]["shape"])
        self.file_bytes = file_bytes
        self.payload_bytes = int(manifest["payload_bytes"])
        conv = {
            n: (tuple(lay.entry["strides"]), tuple(tuple(p) for p in lay.entry["pads"]))
            for n, lay in self.layers.items()
            if lay.kind == "conv" and self.graph is not None
        }
        # Static and hashable, so models of the same structure share one compiled program.
        self._program = json.dumps({"graph": self.graph, "conv": conv}, sort_keys=True)

    def raw(self, array: str) -> np.ndarray:
        """One array of the payload, decoded by its table entry (name as in the manifest)."""
        return _read(self._table[array], self._payload)

    @property
    def kernels(self) -> dict[str, np.ndarray]:
        """Layer name -> decoded kernel."""
        return {k: v.kernel for k, v in self.layers.items()}

    def _arrays(self):
        return {
            name: {
                "kernel": jnp.asarray(lay.kernel),
                "bias": None if lay.bias is None else jnp.asarray(lay.bias),
                "a_bits": jnp.asarray(lay.a_bits, jnp.float32),
                "a_clip": None if lay.a_clip is None else jnp.asarray(lay.a_clip),
            }
            for name, lay in self.layers.items()
        }

    def predict(self, x, batch_size: int | None = None) -> np.ndarray:
        """Logits for a float batch (pixels in ``[0, 1]``, as the model was trained on).

        Args:
          x: ``(N, *input_shape)`` (or ``(N, prod(input_shape))``) float array, numpy or jnp.
          batch_size: run in chunks of this many examples (``None``: all at once).

        Returns:
          ``(N, num_classes)`` float32 numpy logits.
        """
        if self.graph is None:
            raise ValueError(
                "this file holds a model without a graph: run it through your own model with"
                " qsparse.export.restore(path) and plan.apply(..., quantized=True)"
            )
        x = jnp.asarray(x, jnp.float32)
        x = x.reshape((x.shape[0], *self.input_shape))
        arrays = self._arrays()
        if batch_size is None or x.shape[0] <= batch_size:
            return np.asarray(_forward(self._program, arrays, x))
        outs = [
            np.asarray(_forward(self._program, arrays, x[i : i + batch_size]))
            for i in range(0, x.shape[0], batch_size)
        ]
        return np.concatenate(outs)

    def accuracy(self, x_uint8, y, batch_size: int = 1000) -> float:
        """Top-1 accuracy on uint8 images (scaled by 1/255 as in training).

        Args:
          x_uint8: ``(N, H, W, C)`` uint8 images.
          y: ``(N,)`` integer labels.
          batch_size: evaluation chunk size.

        Returns:
          The fraction classified correctly.
        """
        x = jnp.asarray(x_uint8).astype(jnp.float32) / 255.0
        logits = self.predict(x, batch_size=batch_size)
        return float(np.mean(np.argmax(logits, -1) == np.asarray(y)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(program: str, arrays, x):
    """Runs the graph with the same Flax modules and quantizer calls as the trained model."""
    prog = json.loads(program)
    for op in prog["graph"]:
        kind = op["op"]
        if kind == "flatten":
            x = x.reshape((x.shape[0], -1))
        elif kind == "relu":
            x = nn.relu(x)
        elif kind == "max_pool":
            x = nn.max_pool(x, tuple(op["window"]), strides=tuple(op["strides"]))
        elif kind == "mean":
            x = jnp.mean(x, axis=tuple(op["axes"]))
        else:
            a = arrays[op["layer"]]
            variables = {"kernel": a["kernel"]}
            if a["bias"] is not None:
                variables["bias"] = a["bias"]
            features = a["kernel"].shape[-1]
            if kind == "dense":
                mod = nn.Dense(features, use_bias=a["bias"] is not None)
            else:
                strides, pads = prog["conv"][op["layer"]]
                mod = nn.Conv(
                    features,
                    tuple(a["kernel"].shape[:2]),
                    strides=tuple(strides),
                    padding=[tuple(p) for p in pads],
                    use_bias=a["bias"] is not None,
                )
            x = mod.apply({"params": variables}, x)
            if a["a_clip"] is not None:
                x = quant.quantize_activation(x, a["a_bits"], a["a_clip"])
    return x


def _fail(msg: str):
    raise FormatError(msg)


def _parse_header(data: bytes) -> tuple[dict, memoryview]:
    """Checks header, sizes and CRCs; returns the manifest and the payload."""
    if len(data) < len(MAGIC) and data == MAGIC[: len(data)]:
        _fail(f"truncated file: {len(data)} bytes, the header alone needs {HEADER_SIZE}")
    if data[: len(MAGIC)] != MAGIC:
        _fail(f"bad magic {bytes(data[:8])!r}: not a qsparse packed model (expected {MAGIC!r})")
    if len(data) < HEADER_SIZE:
        _fail(f"truncated file: {len(data)} bytes, the header alone needs {HEADER_SIZE}")
    _, version, man_len, man_crc, pay_len, pay_crc = _HEADER.unpack_from(data)
    if version != VERSION:
        _fail(f"format version {version} is not supported: this reader reads version {VERSION}")
    need = HEADER_SIZE + man_len + pay_len
    if len(data) < need:
        _fail(f"truncated file: {len(data)} bytes, the header announces {need}")
    if len(data) > need:
        _fail(f"{len(data) - need} unexpected trailing bytes after the payload")
    view = memoryview(data)
    man = view[HEADER_SIZE : HEADER_SIZE + man_len]
    if zlib.crc32(man) != man_crc:
        _fail("corrupted manifest: CRC32 mismatch")
    try:
        manifest = json.loads(bytes(man).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(f"manifest is not valid JSON: {e}")
    if not isinstance(manifest, dict):
        _fail("manifest is not a JSON object")
    payload = view[HEADER_SIZE + man_len :]
    if zlib.crc32(payload) != pay_crc:
        _fail(f"corrupted payload: CRC32 mismatch{_bad_array(manifest, payload)}")
    return manifest, payload


def _bad_array(manifest: dict, payload: memoryview) -> str:
    """Names the first array whose CRC32 fails, for the error message."""
    try:
        for a in manifest["arrays"]:
            if zlib.crc32(payload[a["offset"] : a["offset"] + a["nbytes"]]) != a["crc32"]:
                return f" (array {a['name']})"
    except (KeyError, TypeError):
        pass
    return ""


def _check_arrays(manifest: dict, payload: memoryview) -> dict:
    """Checks that the array table tiles the payload and sizes agree; name -> entry."""
    try:
        arrays = {a["name"]: a for a in manifest["arrays"]}
        pos = 0
        for a in sorted(manifest["arrays"], key=lambda a: a["offset"]):
            count = int(np.prod(a["shape"])) if a["shape"] else 1
            if a["count"] != count:
                _fail(f"array {a['name']}: count {a['count']} disagrees with shape {a['shape']}")
            if a["dtype"] in RAW_DTYPES:
                want = np.dtype(jnp.dtype(a["dtype"])).itemsize * count
            elif a["dtype"] == "packed":
                want = packed_nbytes(count, a["bits"])
            else:
                _fail(f"array {a['name']}: dtype {a['dtype']!r} is not allowed")
            if a["nbytes"] != want:
                _fail(f"array {a['name']}: nbytes {a['nbytes']} disagrees with shape (want {want})")
            if a["offset"] != pos:
                _fail(f"array {a['name']}: offset {a['offset']} leaves a gap or overlap at {pos}")
            if zlib.crc32(payload[pos : pos + want]) != a["crc32"]:
                _fail(f"corrupted payload: CRC32 mismatch (array {a['name']})")
            pos += want
        if pos != len(payload) or manifest["payload_bytes"] != len(payload):
            _fail(f"arrays cover {pos} bytes, the payload has {len(payload)}")
    except (KeyError, TypeError) as e:
        _fail(f"manifest array table is malformed: missing or bad field {e}")
    return arrays


def _read(entry: dict, payload: memoryview) -> np.ndarray:
    raw = payload[entry["offset"] : entry["offset"] + entry["nbytes"]]
    if entry["dtype"] == "float32":
        return np.frombuffer(raw, "<f4").astype(np.float32).reshape(entry["shape"])
    if entry["dtype"] in RAW_DTYPES:
        dt = np.dtype(jnp.dtype(entry["dtype"])).newbyteorder("<")
        return np.frombuffer(raw, dt).astype(dt.newbyteorder("=")).reshape(entry["shape"])
    bits, count = entry["bits"], entry["count"]
    tail = count * bits
    if tail % 8 and np.frombuffer(raw, np.uint8)[-1] >> (tail % 8):
        _fail(f"array {entry['name']}: unused bits of the last byte are not zero")
    return unpack_bits(raw, bits, count).reshape(entry["shape"])


def _decode_layer(lay: dict, arrays: dict, payload: memoryview) -> PackedLayer:
    name = lay["name"]

    def get(role, shape=None, bits=None):
        key = lay["arrays"].get(role)
        if key is None or key not in arrays:
            _fail(f"layer {name}: array {role!r} is missing")
        e = arrays[key]
        if shape is not None and list(e["shape"]) != list(shape):
            _fail(f"layer {name}: {role} shape {e['shape']} disagrees with the layer ({shape})")
        if bits is not None and (e["dtype"] != "packed" or e["bits"] != bits):
            _fail(f"layer {name}: {role} has {e['bits']} bits, the layer needs {bits}")
        return _read(e, payload)

    m, n = lay["matrix_shape"]
    bm, bn = lay["block_shape"]
    r, c = lay["block_grid"]
    k, w_bits = lay["kept_blocks"], lay["w_bits"]
    if int(np.prod(lay["kernel_shape"])) != m * n or r * bm != m or c * bn != n or k > r * c:
        _fail(f"layer {name}: kernel, block and grid shapes disagree")
    index = lay["index"]
    if index == "none":
        if k != r * c:
            _fail(f"layer {name}: no index but only {k} of {r * c} blocks kept")
        keep = np.ones(r * c, bool)
    elif index == "bitmap":
        keep = get("index_bitmap", [r, c], 1).reshape(-1).astype(bool)
    elif index == "csr":
        rowptr = get("index_rowptr", [r + 1], mem.bitlen(r * c))
        cols = get("index_colidx", [k], mem.bitlen(c - 1))
        if rowptr[0] != 0 or np.any(np.diff(rowptr) < 0) or rowptr[-1] != k:
            _fail(f"layer {name}: block-CSR row pointers are not 0 .. {k} non-decreasing")
        if np.any(cols >= c):
            _fail(f"layer {name}: block-CSR column index >= {c}")
        keep = np.zeros((r, c), bool)
        rows = np.repeat(np.arange(r), np.diff(rowptr))
        keep[rows, cols] = True
        if int(keep.sum()) != k:
            _fail(f"layer {name}: block-CSR repeats a column in a row")
        keep = keep.reshape(-1)
    else:
        _fail(f"layer {name}: index kind {index!r} is not allowed")
    if int(keep.sum()) != k:
        _fail(f"layer {name}: the index keeps {int(keep.sum())} blocks, the manifest says {k}")

    codes = scale = None
    if w_bits >= FULL:
        vals = get("weights", [k, bm, bn])
        full = np.zeros((r * c, bm, bn), np.float32)
        full[keep] = vals
        mat = _unblocks(full, (r, c), bm, bn)
    else:
        u = get("codes", [k, bm, bn], w_bits)
        if lay["zero_level"] and w_bits > 1 and np.any(u == 0):
            _fail(f"layer {name}: code 0 is not a level of the zero-level set")
        scale = get("w_scale", [n] if lay["per_channel"] else [])
        signed = np.zeros((r * c, bm, bn), np.int64)
        signed[keep] = signed_codes(u, w_bits)
        codes = _unblocks(signed, (r, c), bm, bn)
        levels = np.zeros((r * c, bm, bn), np.float32)
        levels[keep] = code_levels(u, w_bits, lay["zero_level"])
        mat = (_unblocks(levels, (r, c), bm, bn) * scale).astype(np.float32)
    bias = get("bias", [n]) if lay["use_bias"] else None
    clip = get("a_clip", []) if lay["act_quantized"] else None
    return PackedLayer(
        name=name,
        kind=lay["kind"],
        kernel=mat.reshape(lay["kernel_shape"]),
        bias=bias,
        codes=codes,
        scale=scale,
        keep=keep.reshape(r, c),
        a_bits=int(lay["a_bits"]),
        a_clip=clip,
        entry=lay,
    )


def _pair(v, name: str, least: int) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(a, int) for a in v)):
        _fail(f"{name} {v!r} is not a pair of integers")
    if min(v) < least:
        _fail(f"{name} {v!r} has a value below {least}")
    return v[0], v[1]


def _check_graph_shapes(manifest: dict, layers: dict) -> None:
    """Walks the graph on shapes against the decoded layers: each op must fit its input, each
    layer run once in the manifest's order, and the last op give ``(N, num_classes)``."""
    shape = (1, *manifest["input"]["shape"])
    if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        _fail(f"manifest input shape {manifest['input']['shape']} is not a list of sizes")
    used = []
    for i, op in enumerate(manifest["graph"]):
        kind = op["op"]
        where = f"graph op {i} ({kind})"
        if kind == "flatten":
            shape = (1, int(np.prod(shape[1:])))
        elif kind == "relu":
            pass
        elif kind == "max_pool":
            wh, ww = _pair(op["window"], f"{where} window", 1)
            sh, sw = _pair(op["strides"], f"{where} strides", 1)
            if len(shape) != 4 or wh > shape[1] or ww > shape[2]:
                _fail(f"{where}: window {[wh, ww]} does not fit input shape {shape}")
            shape = (1, (shape[1] - wh) // sh + 1, (shape[2] - ww) // sw + 1, shape[3])
        elif kind == "mean":
            axes = op["axes"]
            ok = isinstance(axes, list) and all(isinstance(a, int) for a in axes)
            if not ok or len(set(axes)) != len(axes) or not all(0 < a < len(shape) for a in axes):
                _fail(f"{where}: axes {axes!r} are not distinct axes 1..{len(shape) - 1}")
            shape = tuple(d for j, d in enumerate(shape) if j not in axes)
        elif kind in ("dense", "conv"):
            lay = layers.get(op["layer"])
            if lay is None or lay.kind != kind:
                _fail(f"{where} names no {kind} layer of the manifest: {op['layer']!r}")
            k = lay.kernel.shape
            if kind == "dense":
                if len(shape) != 2 or shape[1] != k[0]:
                    _fail(f"{where}: layer {lay.name} takes (N, {k[0]}), the graph gives {shape}")
                shape = (1, k[1])
            else:
                (sh, sw) = _pair(lay.entry["strides"], f"layer {lay.name} strides", 1)
                pads = lay.entry["pads"]
                if not (isinstance(pads, list) and len(pads) == 2):
                    _fail(f"layer {lay.name}: pads {pads!r} are not [[top, bottom], [left, right]]")
                (t, b), (le, r) = (_pair(pd, f"layer {lay.name} pads", 0) for pd in pads)
                if len(shape) != 4 or shape[3] != k[2]:
                    _fail(
                        f"{where}: layer {lay.name} takes (N, H, W, {k[2]}), "
                        f"the graph gives {shape}"
                    )
                h, w = shape[1] + t + b - k[0], shape[2] + le + r - k[1]
                if h < 0 or w < 0:
                    _fail(
                        f"{where}: layer {lay.name}'s {k[0]}x{k[1]} kernel exceeds "
                        f"its input {shape}"
                    )
                shape = (1, h // sh + 1, w // sw + 1, k[3])
            used.append(lay.name)
        else:
            _fail(f"{where}: op {kind!r} is not allowed")
    if used != list(layers):
        _fail(f"graph runs layers {used}, the manifest lists {list(layers)} (each once, in order)")
    last = layers[used[-1]].kernel.shape[-1] if used else None
    if len(shape) != 2 or shape[1] != manifest.get("num_classes", last):
        _fail(f"graph ends with shape {shape}, not (N, num_classes)")


def load(path) -> PackedModel:
    """Reads and checks a packed model file.

    Args:
      path: the file written by :func:`save`.

    Returns:
      A :class:`PackedModel` with the decoded kernels.

    Raises:
      FormatError: bad magic, unsupported version, truncated file, CRC32 mismatch, a
        manifest that disagrees with the arrays, or a graph whose ops do not fit the layers.
    """
    return _load_bytes(pathlib.Path(path).read_bytes())


def _load_bytes(data: bytes) -> PackedModel:
    """:func:`load` of a file's bytes."""
    manifest, payload = _parse_header(data)
    if manifest.get("version") != VERSION:
        _fail(f"manifest version {manifest.get('version')} disagrees with the header")
    arrays = _check_arrays(manifest, payload)
    try:
        layers = {}
        for lay in manifest["layers"]:
            layers[lay["name"]] = _decode_layer(lay, arrays, payload)
        if len(manifest["input"]["shape"]) < 1:
            _fail("manifest input shape is empty")
        if manifest.get("graph") is not None:
            _check_graph_shapes(manifest, layers)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        _fail(f"manifest is malformed: {type(e).__name__}: {e}")
    return PackedModel(manifest, layers, len(data), arrays, payload)
