"""The writer: :func:`save` builds the manifest of either layout and writes the file atomically.

Two layouts share the format (``docs/FORMAT.md``): the graph layout (a Dense/Conv chain with
its op graph, which :class:`~qsparse.export.PackedModel` and ``tools/decode_numpy.py`` run on
their own) and the model layout (every parameter and statistic of any model, rebuilt by
:func:`~qsparse.export.restore` for the user's own model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from qsparse import quant
from qsparse.export import encode, reader
from qsparse.export import graph as graphs
from qsparse.export.format import (
    FULL,
    HEADER_SIZE,
    RAW_DTYPES,
    VERSION,
    pack_file,
)
from qsparse.wrap import Plan, get_path

# The memory model's counts stored in the manifest, in this order.
_MEMORY_FIELDS = (
    "weight_memory_bits",
    "fp32_weight_memory_bits",
    "codes_bits",
    "index_bits",
    "scale_bits",
    "other_bits",
)


def _scalar(v) -> float:
    return float(np.asarray(v))


# ---- shared pieces ---------------------------------------------------------------------------


def _ordered(plan: Plan) -> list:
    return sorted(plan.layers.values(), key=lambda lp: lp.order)


def _next_layer(ordered, lp):
    """The layer after ``lp`` in a chain, or None for the last."""
    i = ordered.index(lp)
    return ordered[i + 1] if i + 1 < len(ordered) else None


def _layer_spec(spec) -> Mapping:
    if "layers" in spec and isinstance(spec["layers"], Mapping):
        return spec["layers"]
    return spec


def _quantizer_fields(rule, w_bits: int) -> dict:
    """The manifest fields of a layer's weight quantizer."""
    return {
        "w_bits": w_bits,
        "scale_mode": rule.scale_mode,
        "per_channel": bool(rule.per_channel),
        "zero_level": bool(rule.zero_level),
    }


def _memory_fields(mem_q) -> dict:
    """The manifest's ``memory_model``: the memory model's counts on the stored kernels."""
    return {k: int(mem_q[k]) for k in _MEMORY_FIELDS}


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


# ---- save ------------------------------------------------------------------------------------


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
    its op graph, so :class:`~qsparse.export.PackedModel` and ``tools/decode_numpy.py`` run it
    on their own.
    Any other model is written with every parameter and statistic it has: the covered weights
    packed, everything else at its dtype, and each covered operation's input quantizer;
    :func:`~qsparse.export.restore` rebuilds the variables, and the user's own model runs them
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
    if graph is None and not graphs.is_chain(plan, model):
        return _save_model(path, plan, params, qparams, layer_spec, model_state, input_shape, meta)
    return _save_graph(path, plan, params, qparams, layer_spec, model, input_shape, graph, meta)


# ---- the graph layout ------------------------------------------------------------------------


def _chain_calls(plan: Plan, model, ordered, input_shape) -> list[dict]:
    """The layers' calls, traced from ``model`` (or a Dense chain for ``model=None``)."""
    names = [lp.name for lp in ordered]
    if model is not None:
        calls = graphs.trace_layers(model, input_shape)
    else:
        # A chain of Dense layers: each consumes the previous output.
        calls = graphs.dense_chain_calls(plan, ordered, lambda lp: plan.bias_path(lp) is not None)
    if [c["name"] for c in calls] != names:
        raise ValueError(f"traced layers {[c['name'] for c in calls]} differ from plan {names}")
    return calls


def _chain_graph(graph, model, ordered, calls, input_shape) -> list:
    """The op graph to store: given or built, checked on shapes against the trace."""
    kinds = ["conv" if len(lp.kernel_shape) == 4 else "dense" for lp in ordered]
    names = [lp.name for lp in ordered]
    try:
        return graphs.check_graph(
            graph if graph is not None else graphs.glue_graph(model, names, kinds),
            calls,
            input_shape,
        )
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"graph is malformed: {type(e).__name__}: {e}") from None


def _chain_bits(layer_spec, name: str, nxt) -> tuple[int, int]:
    """A chain layer's weight bits and its output bits (the next layer's input bits)."""
    w_raw = _scalar(layer_spec[name]["w_bits"])
    a_raw = _scalar(layer_spec[nxt.name]["a_bits"]) if nxt is not None else FULL
    quant.check_bits(w_raw, f"{name}.w_bits")
    quant.check_bits(a_raw, f"{name}.a_bits")
    return min(int(w_raw), FULL), min(int(a_raw), FULL)


def _encode_chain_layer(payload, plan, lp, nxt, layer_spec, params, qparams, quantized, call):
    """Writes one layer of a chain (weight, bias, output clip); returns its manifest entry.

    The file stores each layer's output quantizer: the plan's input quantizer of the layer
    after it in the chain (the graph check proves the chain).
    """
    name = lp.name
    w_bits, a_bits = _chain_bits(layer_spec, name, nxt)
    q = get_path(quantized["q"], lp.path)
    arrays, fields = encode.encode_weight(payload, lp, q, w_bits, qparams, quantized["steps"])
    bias_path = plan.bias_path(lp)
    if bias_path is not None:
        bias = get_path(params, bias_path)
        arrays.update(encode.encode_bias(payload, name, name, bias, lp.rule.bias_bits))
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
        "kind": call["kind"],
        "kernel_shape": list(lp.kernel_shape),
        "matrix_shape": fields["matrix_shape"],
        "use_bias": bias_path is not None,
        "bias_bits": lp.rule.bias_bits if bias_path is not None else FULL,
        **_quantizer_fields(lp.rule, w_bits),
        **{k: fields[k] for k in ("block_sparse", "block_shape", "block_grid")},
        "kept_blocks": fields["kept_blocks"],
        "index": fields["index"],
        "act_quantized": act_q,
        "a_bits": a_bits if act_q else FULL,
        "target_compression": _scalar(layer_spec[name]["compression"]),
        "arrays": arrays,
    }
    if call["kind"] == "conv":
        entry.update(strides=call["strides"], padding=call["padding"], pads=call["pads"])
    return entry


def _graph_manifest(input_shape, ordered, model, graph, layers_out, payload, mem_q, meta):
    return {
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
        "memory_model": _memory_fields(mem_q),
        "meta": dict(meta or {}),
    }


def _save_graph(path, plan: Plan, params, qparams, layer_spec, model, input_shape, graph, meta):
    """:func:`save` in the graph layout: a Dense/Conv chain and its op graph."""
    ordered = _ordered(plan)
    input_shape = tuple(int(d) for d in (input_shape or graphs.infer_input_shape(plan)))
    if int(np.prod(input_shape)) != plan.input_size:
        raise ValueError(f"input_shape={input_shape} does not hold {plan.input_size} values")
    calls = _chain_calls(plan, model, ordered, input_shape)
    graph = _chain_graph(graph, model, ordered, calls, input_shape)
    # The module the graph must reproduce (model=None stands for a qsparse.models.MLP).
    reference_model = model if model is not None else graphs.mlp_of(plan, ordered)
    call_of = {c["name"]: c for c in calls}

    quantized = encode.quantizer(plan)(params, qparams, layer_spec)
    mem_q = quantized["mem_q"]
    payload = encode.Payload()
    layers_out, summary = [], {}
    for lp in ordered:
        nxt = _next_layer(ordered, lp)
        entry = _encode_chain_layer(
            payload, plan, lp, nxt, layer_spec, params, qparams, quantized, call_of[lp.name]
        )
        layers_out.append(entry)
        (r, c), index = entry["block_grid"], entry["index"]
        summary[lp.name] = {"kept_blocks": entry["kept_blocks"], "blocks": r * c, "index": index}
    for lay in layers_out:
        lay["memory_bits"] = int(mem_q["layers"][lay["name"]]["total"])
        summary[lay["name"]]["payload_bytes"] = payload.layer_nbytes(lay["name"])
    manifest = _graph_manifest(input_shape, ordered, model, graph, layers_out, payload, mem_q, meta)

    # Read the bytes back and run their graph next to the model: a graph that does not compute
    # what the model computes is refused before anything is written.
    def check(data):
        packed = reader.load_bytes(data)
        graphs.check_against_model(packed, reference_model, plan, params, qparams, layer_spec)

    return _finish(path, manifest, payload, mem_q, quantized["mem_p"], summary, check)


# ---- the model layout ------------------------------------------------------------------------


def _encode_model_layer(payload, lp, layer_spec, qparams, quantized) -> dict:
    """Writes one covered weight and its input clip; returns its manifest entry."""
    name = lp.name
    w_bits = min(int(_scalar(layer_spec[name]["w_bits"])), FULL)
    a_bits = min(int(_scalar(layer_spec[name]["a_bits"])), FULL)
    q = get_path(quantized["q"], lp.path)
    dtype = encode.kernel_dtype(q)
    arrays, fields = encode.encode_weight(
        payload, lp, q, w_bits, qparams, quantized["steps"], dtype
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
    return {
        "name": name,
        "kind": lp.ops[0],
        "path": list(lp.path),
        "kernel_shape": list(lp.kernel_shape),
        "dtype": dtype,
        "use_bias": False,
        **_quantizer_fields(lp.rule, w_bits),
        **fields,
        "act_quantized": False,
        "a_bits": FULL,
        "input": {"a_bits": a_bits if act_q else FULL, "signed": bool(lp.a_signed)},
        "target_compression": _scalar(layer_spec[name]["compression"]),
        "arrays": arrays,
    }


def _add_tensors(payload, plan: Plan, params, model_state) -> list[dict]:
    """Writes every parameter that is not a covered weight, and the inference state, as is."""
    covered = {lp.path for lp in plan.layers.values()}
    bias_bits = {plan.bias_path(lp): lp.rule.bias_bits for lp in plan.layers.values()}
    state = model_state or {}
    leaves = [("params", p, get_path(params, p)) for p in plan.params_shapes if p not in covered]
    leaves += [(p[0], p[1:], get_path(state, p)) for p in plan.state_shapes]
    tensors = []
    for collection, p, value in leaves:
        if collection == "params" and bias_bits.get(p, FULL) < FULL:  # int8 codes and a scale
            key = "/".join(map(str, (collection, *p)))
            arrays = encode.encode_bias(payload, key, None, value, bias_bits[p])
            tensors.append(
                {
                    "collection": collection,
                    "path": list(p),
                    "array": arrays["bias"],
                    "scale": arrays["bias_scale"],
                }
            )
            continue
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
    return tensors


def _save_model(path, plan: Plan, params, qparams, layer_spec, model_state, input_shape, meta):
    """:func:`save` in the model layout: every parameter and statistic of any model."""
    for name in plan.layers:
        for key in ("w_bits", "a_bits"):
            quant.check_bits(_scalar(layer_spec[name][key]), f"{name}.{key}")
    quantized = encode.quantizer(plan)(params, qparams, layer_spec)
    payload = encode.Payload()
    layers_out, summary = [], {}
    for lp in _ordered(plan):
        entry = _encode_model_layer(payload, lp, layer_spec, qparams, quantized)
        layers_out.append(entry)
        summary[lp.name] = {"kept_blocks": entry["kept_blocks"], "index": entry["index"]}
    tensors = _add_tensors(payload, plan, params, model_state)
    mem_q = quantized["mem_q"]
    manifest = {
        "format": "qsparse-packed",
        "version": VERSION,
        "layout": "model",
        "bit_order": "lsb-first",
        "byte_order": "little",
        "input": {"shape": list(input_shape) if input_shape is not None else [plan.input_size]},
        "graph": None,
        "layers": layers_out,
        "tensors": tensors,
        "arrays": payload.entries,
        "payload_bytes": payload.size,
        "memory_model": _memory_fields(mem_q),
        "meta": dict(meta or {}),
    }
    return _finish(path, manifest, payload, mem_q, quantized["mem_p"], summary)


# ---- the file --------------------------------------------------------------------------------


def _payload_bits(payload: encode.Payload, mem_q) -> int:
    """The payload's exact bit count; RuntimeError unless the memory model counts the same."""
    payload_bits = sum(e["count"] * e["bits"] for e in payload.entries)
    if payload_bits != int(mem_q["weight_memory_bits"]):
        # Cannot happen unless this writer and qsparse.memory disagree: refuse to write.
        raise RuntimeError(
            f"payload has {payload_bits} bits, the memory model counts "
            f"{int(mem_q['weight_memory_bits'])}: the writer and qsparse.memory disagree"
        )
    return int(payload_bits)


def _finish(path, manifest, payload, mem_q, mem_p, summary, check=None) -> dict:
    """Checks the payload against the memory model, writes the file, returns :func:`save`'s
    dict. ``check(data)`` may refuse the file's bytes before anything is written."""
    payload_bits = _payload_bits(payload, mem_q)
    man = json.dumps(manifest, default=_json_default, separators=(",", ":")).encode()
    data = pack_file(man, b"".join(payload.chunks))
    if check is not None:
        check(data)
    _write_atomic(path, data)
    fp32_bytes = int(mem_q["fp32_weight_memory_bits"]) // 8
    return {
        "path": str(path),
        "payload_bytes": payload.size,
        "payload_bits": payload_bits,
        "weight_memory_bits": int(mem_q["weight_memory_bits"]),
        "weight_memory_bytes": int(mem_q["weight_memory_bits"]) / 8,
        "memory_model_bits_params": int(mem_p["weight_memory_bits"]),
        "file_bytes": len(data),
        "header_bytes": HEADER_SIZE + len(man),
        "fp32_bytes": fp32_bytes,
        "compression": fp32_bytes / max(payload.size, 1),
        "memory_compression": float(mem_q["weight_compression"]),
        "file_compression": fp32_bytes / len(data),
        "layers": summary,
    }


def _write_atomic(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary name, so a crash leaves no half file."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
