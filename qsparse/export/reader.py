"""The reader: checks a packed file against its manifest, decodes the layers, restores variables.

:func:`load` checks the magic, version, sizes, CRC32s and the manifest against the arrays, and
raises :class:`~qsparse.export.FormatError` (one line) on any mismatch; :func:`restore` turns a
model-layout file back into the variables of the user's own model.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zlib
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from qsparse import memory as mem
from qsparse.export.format import (
    FULL,
    KERNEL_DTYPES,
    VERSION,
    FormatError,
    array_nbytes,
    code_levels,
    fail,
    parse_file,
    read_array,
    signed_codes,
    unblocks,
)
from qsparse.export.infer import PackedModel


@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """One decoded layer.

    Attributes:
      name: layer name.
      kind: ``"dense"`` or ``"conv"``.
      kernel: the decoded dense kernel (float32, or the model-layout entry's ``dtype``;
        zeros in the blocks not stored).
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


def load(path) -> PackedModel:
    """Reads and checks a packed model file.

    Args:
      path: the file written by :func:`~qsparse.export.save`.

    Returns:
      A :class:`~qsparse.export.PackedModel` with the decoded kernels.

    Raises:
      FormatError: bad magic, unsupported version, truncated file, CRC32 mismatch, a
        manifest that disagrees with the arrays, or a graph whose ops do not fit the layers.
    """
    return load_bytes(pathlib.Path(path).read_bytes())


def load_bytes(data: bytes) -> PackedModel:
    """:func:`load` of a file's bytes.

    Args:
      data: the whole file.

    Returns:
      The :class:`~qsparse.export.PackedModel`.

    Raises:
      FormatError: as :func:`load`.
    """
    manifest, payload = parse_file(data)
    if manifest.get("version") != VERSION:
        fail(f"manifest version {manifest.get('version')} disagrees with the header")
    arrays = _check_arrays(manifest, payload)
    try:
        layers = {}
        for lay in manifest["layers"]:
            layers[lay["name"]] = _decode_layer(lay, arrays, payload)
        if len(manifest["input"]["shape"]) < 1:
            fail("manifest input shape is empty")
        if manifest.get("graph") is not None:
            _check_graph_shapes(manifest, layers)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        fail(f"manifest is malformed: {type(e).__name__}: {e}")
    return PackedModel(manifest, layers, len(data), arrays, payload)


# ---- the array table -------------------------------------------------------------------------


def _check_array(a: dict, pos: int, payload: memoryview) -> int:
    """Checks one array table entry that should start at ``pos``; returns its size."""
    count = int(np.prod(a["shape"])) if a["shape"] else 1
    if a["count"] != count:
        fail(f"array {a['name']}: count {a['count']} disagrees with shape {a['shape']}")
    want = array_nbytes(a, count)
    if a["nbytes"] != want:
        fail(f"array {a['name']}: nbytes {a['nbytes']} disagrees with shape (want {want})")
    if a["offset"] != pos:
        fail(f"array {a['name']}: offset {a['offset']} leaves a gap or overlap at {pos}")
    if zlib.crc32(payload[pos : pos + want]) != a["crc32"]:
        fail(f"corrupted payload: CRC32 mismatch (array {a['name']})")
    return want


def _check_arrays(manifest: dict, payload: memoryview) -> dict:
    """Checks that the array table tiles the payload and sizes agree; name -> entry."""
    try:
        arrays = {a["name"]: a for a in manifest["arrays"]}
        pos = 0
        for a in sorted(manifest["arrays"], key=lambda a: a["offset"]):
            pos += _check_array(a, pos, payload)
        if pos != len(payload) or manifest["payload_bytes"] != len(payload):
            fail(f"arrays cover {pos} bytes, the payload has {len(payload)}")
    except (KeyError, TypeError) as e:
        fail(f"manifest array table is malformed: missing or bad field {e}")
    return arrays


# ---- layers ----------------------------------------------------------------------------------


def _array_getter(lay: dict, arrays: dict, payload: memoryview):
    """``get(role, shape=None, bits=None)``: one of the layer's arrays, checked and decoded."""
    name = lay["name"]

    def get(role, shape=None, bits=None):
        key = lay["arrays"].get(role)
        if key is None or key not in arrays:
            fail(f"layer {name}: array {role!r} is missing")
        e = arrays[key]
        if shape is not None and list(e["shape"]) != list(shape):
            fail(f"layer {name}: {role} shape {e['shape']} disagrees with the layer ({shape})")
        if bits is not None and (e["dtype"] != "packed" or e["bits"] != bits):
            fail(f"layer {name}: {role} has {e['bits']} bits, the layer needs {bits}")
        return read_array(e, payload)

    return get


def _csr_keep(name: str, get, grid, k: int) -> np.ndarray:
    """The ``(R*C,)`` kept-block mask of a block-CSR index."""
    r, c = grid
    rowptr = get("index_rowptr", [r + 1], mem.bitlen(r * c))
    cols = get("index_colidx", [k], mem.bitlen(c - 1))
    if rowptr[0] != 0 or np.any(np.diff(rowptr) < 0) or rowptr[-1] != k:
        fail(f"layer {name}: block-CSR row pointers are not 0 .. {k} non-decreasing")
    if np.any(cols >= c):
        fail(f"layer {name}: block-CSR column index >= {c}")
    keep = np.zeros((r, c), bool)
    rows = np.repeat(np.arange(r), np.diff(rowptr))
    keep[rows, cols] = True
    if int(keep.sum()) != k:
        fail(f"layer {name}: block-CSR repeats a column in a row")
    return keep.reshape(-1)


def _decode_keep(lay: dict, get) -> np.ndarray:
    """The ``(R*C,)`` kept-block mask from the layer's index; it must keep ``kept_blocks``."""
    name, index = lay["name"], lay["index"]
    r, c = lay["block_grid"]
    k = lay["kept_blocks"]
    if index == "none":
        if k != r * c:
            fail(f"layer {name}: no index but only {k} of {r * c} blocks kept")
        keep = np.ones(r * c, bool)
    elif index == "bitmap":
        keep = get("index_bitmap", [r, c], 1).reshape(-1).astype(bool)
    elif index == "csr":
        keep = _csr_keep(name, get, (r, c), k)
    else:
        fail(f"layer {name}: index kind {index!r} is not allowed")
    if int(keep.sum()) != k:
        fail(f"layer {name}: the index keeps {int(keep.sum())} blocks, the manifest says {k}")
    return keep


def _decode_matrix(lay: dict, get, keep, w_bits: int):
    """The kernel's matrix view, its signed codes and its scale (both None at 32 bits)."""
    r, c = lay["block_grid"]
    bm, bn = lay["block_shape"]
    k = lay["kept_blocks"]
    if w_bits >= FULL:
        full = np.zeros((r * c, bm, bn), np.float32)
        full[keep] = get("weights", [k, bm, bn])
        return unblocks(full, (r, c), bm, bn), None, None
    u = get("codes", [k, bm, bn], w_bits)
    if lay["zero_level"] and w_bits > 1 and np.any(u == 0):
        fail(f"layer {lay['name']}: code 0 is not a level of the zero-level set")
    scale = get("w_scale", [lay["matrix_shape"][1]] if lay["per_channel"] else [])
    signed = np.zeros((r * c, bm, bn), np.int64)
    signed[keep] = signed_codes(u, w_bits)
    levels = np.zeros((r * c, bm, bn), np.float32)
    levels[keep] = code_levels(u, w_bits, lay["zero_level"])
    mat = (unblocks(levels, (r, c), bm, bn) * scale).astype(np.float32)
    return mat, unblocks(signed, (r, c), bm, bn), scale


def _decode_bias(lay: dict, get, n: int) -> np.ndarray:
    """A layer's float32 biases: stored as they are, or int8 codes times their scale."""
    bias = get("bias", [n])
    bits = lay.get("bias_bits", FULL)
    if bits >= FULL:
        return bias
    if bits != 8 or bias.dtype != np.int8:
        fail(f"layer {lay['name']}: bias_bits={bits} with {bias.dtype} codes (allowed: 8, int8)")
    return bias.astype(np.float32) * get("bias_scale", [])


def _decode_layer(lay: dict, arrays: dict, payload: memoryview) -> PackedLayer:
    """Checks one layer's shapes and arrays and decodes its kernel."""
    name = lay["name"]
    get = _array_getter(lay, arrays, payload)
    m, n = lay["matrix_shape"]
    bm, bn = lay["block_shape"]
    r, c = lay["block_grid"]
    k, w_bits = lay["kept_blocks"], lay["w_bits"]
    if int(np.prod(lay["kernel_shape"])) != m * n or r * bm != m or c * bn != n or k > r * c:
        fail(f"layer {name}: kernel, block and grid shapes disagree")
    keep = _decode_keep(lay, get)
    dtype = lay.get("dtype", "float32")
    if dtype not in KERNEL_DTYPES:
        fail(f"layer {name}: dtype {dtype!r} is not allowed (allowed: {KERNEL_DTYPES})")
    mat, codes, scale = _decode_matrix(lay, get, keep, w_bits)
    bias = _decode_bias(lay, get, n) if lay["use_bias"] else None
    clip = get("a_clip", []) if lay["act_quantized"] else None
    return PackedLayer(
        name=name,
        kind=lay["kind"],
        kernel=mat.reshape(lay["kernel_shape"]).astype(jnp.dtype(dtype)),
        bias=bias,
        codes=codes,
        scale=scale,
        keep=keep.reshape(r, c),
        a_bits=int(lay["a_bits"]),
        a_clip=clip,
        entry=lay,
    )


# ---- the graph on shapes ---------------------------------------------------------------------


def _pair(v, name: str, least: int) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(a, int) for a in v)):
        fail(f"{name} {v!r} is not a pair of integers")
    if min(v) < least:
        fail(f"{name} {v!r} has a value below {least}")
    return v[0], v[1]


def _max_pool_shape(op: dict, where: str, shape: tuple) -> tuple:
    wh, ww = _pair(op["window"], f"{where} window", 1)
    sh, sw = _pair(op["strides"], f"{where} strides", 1)
    if len(shape) != 4 or wh > shape[1] or ww > shape[2]:
        fail(f"{where}: window {[wh, ww]} does not fit input shape {shape}")
    return (1, (shape[1] - wh) // sh + 1, (shape[2] - ww) // sw + 1, shape[3])


def _mean_shape(op: dict, where: str, shape: tuple) -> tuple:
    axes = op["axes"]
    ok = isinstance(axes, list) and all(isinstance(a, int) for a in axes)
    if not ok or len(set(axes)) != len(axes) or not all(0 < a < len(shape) for a in axes):
        fail(f"{where}: axes {axes!r} are not distinct axes 1..{len(shape) - 1}")
    return tuple(d for j, d in enumerate(shape) if j not in axes)


def _dense_shape(lay: PackedLayer, where: str, shape: tuple) -> tuple:
    k = lay.kernel.shape
    if len(shape) != 2 or shape[1] != k[0]:
        fail(f"{where}: layer {lay.name} takes (N, {k[0]}), the graph gives {shape}")
    return (1, k[1])


def _conv_shape(lay: PackedLayer, where: str, shape: tuple) -> tuple:
    k = lay.kernel.shape
    (sh, sw) = _pair(lay.entry["strides"], f"layer {lay.name} strides", 1)
    pads = lay.entry["pads"]
    if not (isinstance(pads, list) and len(pads) == 2):
        fail(f"layer {lay.name}: pads {pads!r} are not [[top, bottom], [left, right]]")
    (t, b), (le, r) = (_pair(pd, f"layer {lay.name} pads", 0) for pd in pads)
    if len(shape) != 4 or shape[3] != k[2]:
        fail(f"{where}: layer {lay.name} takes (N, H, W, {k[2]}), the graph gives {shape}")
    h, w = shape[1] + t + b - k[0], shape[2] + le + r - k[1]
    if h < 0 or w < 0:
        fail(f"{where}: layer {lay.name}'s {k[0]}x{k[1]} kernel exceeds its input {shape}")
    return (1, h // sh + 1, w // sw + 1, k[3])


def _op_shape(op: dict, where: str, shape: tuple, layers: dict) -> tuple:
    """The shape after one graph op; FormatError where the op does not fit its input."""
    kind = op["op"]
    if kind == "flatten":
        return (1, int(np.prod(shape[1:])))
    if kind == "relu":
        return shape
    if kind == "max_pool":
        return _max_pool_shape(op, where, shape)
    if kind == "mean":
        return _mean_shape(op, where, shape)
    if kind in ("dense", "conv"):
        lay = layers.get(op["layer"])
        if lay is None or lay.kind != kind:
            fail(f"{where} names no {kind} layer of the manifest: {op['layer']!r}")
        return (_dense_shape if kind == "dense" else _conv_shape)(lay, where, shape)
    fail(f"{where}: op {kind!r} is not allowed")


def _check_graph_shapes(manifest: dict, layers: dict) -> None:
    """Walks the graph on shapes against the decoded layers: each op must fit its input, each
    layer run once in the manifest's order, and the last op give ``(N, num_classes)``."""
    shape = (1, *manifest["input"]["shape"])
    if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        fail(f"manifest input shape {manifest['input']['shape']} is not a list of sizes")
    used = []
    for i, op in enumerate(manifest["graph"]):
        shape = _op_shape(op, f"graph op {i} ({op['op']})", shape, layers)
        if op["op"] in ("dense", "conv"):
            used.append(layers[op["layer"]].name)
    if used != list(layers):
        fail(f"graph runs layers {used}, the manifest lists {list(layers)} (each once, in order)")
    last = layers[used[-1]].kernel.shape[-1] if used else None
    if len(shape) != 2 or shape[1] != manifest.get("num_classes", last):
        fail(f"graph ends with shape {shape}, not (N, num_classes)")


# ---- restore ---------------------------------------------------------------------------------


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
      path: a file written by :func:`~qsparse.export.save` in the model layout (or its
        :class:`~qsparse.export.PackedModel`).

    Returns:
      The :class:`Restored` pieces.

    Raises:
      FormatError: a damaged file, or one in the graph layout (use ``PackedModel``).
    """
    packed = path if isinstance(path, PackedModel) else load(path)
    man = packed.manifest
    if man.get("layout") != "model":
        fail("this file is in the graph layout: run it with qsparse.export.load(path).predict")
    params: dict = {}
    state: dict = {}
    qparams: dict = {}
    spec: dict = {}
    for lay in man["layers"]:
        name = lay["name"]
        params = _put(params, tuple(lay["path"]), jnp.asarray(packed.layers[name].kernel))
        qparams[name] = _restored_qparams(packed, lay)
        spec[name] = {
            "w_bits": jnp.asarray(lay["w_bits"], jnp.float32),
            "a_bits": jnp.asarray(lay["input"]["a_bits"], jnp.float32),
            "compression": jnp.asarray(lay["target_compression"], jnp.float32),
        }
    for t in man["tensors"]:
        value = packed.raw(t["array"])
        if "scale" in t:  # int8 bias codes
            value = value.astype(np.float32) * packed.raw(t["scale"])
        value = jnp.asarray(value)
        if t["collection"] == "params":
            params = _put(params, tuple(t["path"]), value)
        else:
            state = _put(state, (t["collection"], *t["path"]), value)
    return Restored(params, state, qparams, spec)


def _restored_qparams(packed: PackedModel, lay: dict) -> dict:
    """A model-layout layer's ``{"w_step", "a_clip"}`` as the file stores them."""
    name = lay["name"]
    entry = {}
    if lay["scale_mode"] == "learned" and packed.layers[name].scale is not None:
        entry["w_step"] = jnp.asarray(packed.layers[name].scale)
    if "a_clip" in lay["arrays"]:
        entry["a_clip"] = jnp.asarray(packed.raw(lay["arrays"]["a_clip"]))
    else:
        entry["a_clip"] = jnp.asarray(1.0, jnp.float32)  # unused at 32 bits
    return entry


def _put(tree: dict, path: tuple, value) -> dict:
    """``tree`` (nested dicts, built up in place) with ``value`` at ``path``."""
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    return tree
