"""The op graph of the graph layout: traced from the model, built, and proved against it.

A chain of Dense/Conv layers with ReLU, pooling and flatten is written with its op list (see
``docs/FORMAT.md``). The writer traces the model once on shapes (:func:`trace_layers`), builds
the graph of the models in :mod:`qsparse.models` (:func:`glue_graph`) or takes the user's,
walks it on shapes against the trace (:func:`check_graph`), and finally runs the packed file
next to the model on random inputs (:func:`check_against_model`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qsparse import models
from qsparse.export.format import FULL
from qsparse.wrap import Plan, module_path

# Export runs the packed graph next to the model on this many random inputs; a few may differ
# (an activation quantizer can round a value the other way after a reordered float32 sum).
_CHECK_EXAMPLES = 64
_CHECK_MAY_DIFFER = 4
# (plan, model, jitted plan.apply) of recent exports, so repeated saves compile once.
_REFERENCES: list[tuple[Plan, nn.Module, Any]] = []


def is_chain(plan: Plan, model) -> bool:
    """Whether the model is one the graph layout describes (no state, Dense/Conv chain).

    Args:
      plan: the model's plan.
      model: the Linen module, or ``None`` for an MLP.

    Returns:
      True for a stateless chain of MLP, LeNet or VGG whose layers each run one operation
      and whose input is not quantized.
    """
    if plan.state_shapes or any(lp.ops != (lp.ops[0],) for lp in plan.layers.values()):
        return False
    if any(
        lp.reads_input and lp.act_quantized and lp.rule.a_bits < FULL for lp in plan.layers.values()
    ):
        return False
    return model is None or isinstance(model, (models.MLP, models.LeNet, models.VGG))


def infer_input_shape(plan: Plan) -> tuple[int, ...]:
    """One example's shape from the first layer: a vector, or a square image for convs.

    Args:
      plan: the model's plan.

    Returns:
      ``(input_size,)`` or ``(side, side, channels)``.

    Raises:
      ValueError: a conv model whose input is not square.
    """
    first = min(plan.layers.values(), key=lambda lp: lp.order)
    if len(first.kernel_shape) == 2:
        return (plan.input_size,)
    cin = first.kernel_shape[-2]
    side = math.isqrt(plan.input_size // cin)
    if side * side * cin != plan.input_size:
        raise ValueError("input_shape cannot be inferred (input is not square): pass it")
    return (side, side, cin)


# ---- the model's layers, from a trace --------------------------------------------------------


def _tuple2(v, default):
    if v is None:
        return default
    if isinstance(v, int):
        return (v, v)
    return tuple(int(a) for a in v)


def _conv_fields(mod: nn.Conv, name: str, in_shape: tuple) -> dict:
    """Strides, padding and explicit pads of a traced 2-D convolution."""
    ks = tuple(mod.kernel_size)
    if (
        _tuple2(mod.kernel_dilation, (1, 1)) != (1, 1)
        or _tuple2(mod.input_dilation, (1, 1)) != (1, 1)
        or mod.feature_group_count != 1
        or len(ks) != 2
        or not mod.shared_weights
    ):
        raise ValueError(
            f"layer {name}: only 2-D convolutions without dilation or groups can be exported"
        )
    strides = _tuple2(mod.strides, (1, 1))
    padding = mod.padding
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"layer {name}: padding={padding!r} cannot be exported; "
                "use 'SAME', 'VALID' or explicit pads"
            )
        pads = jax.lax.padtype_to_pads(in_shape[1:3], ks, strides, padding.upper())
    else:
        pads = nn.linear.canonicalize_padding(padding, 2)
    return {
        "strides": list(strides),
        "padding": padding if isinstance(padding, str) else "EXPLICIT",
        "pads": [[int(lo), int(hi)] for lo, hi in pads],
    }


def trace_layers(model: nn.Module, input_shape: Sequence[int]) -> list[dict]:
    """Shapes and attributes of each Dense/Conv call, from one shape-only trace.

    Args:
      model: the Linen module.
      input_shape: one example's shape.

    Returns:
      One dict per call in execution order: ``name``, ``kind``, ``in_shape``, ``out_shape``,
      ``use_bias`` and, for convolutions, ``strides``, ``padding`` and ``pads``.

    Raises:
      ValueError: a convolution the format cannot describe (dilation, groups, padding mode).
    """
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
                rec.update(_conv_fields(mod, rec["name"], rec["in_shape"]))
            calls.append(rec)
        return y

    def init(x):
        with nn.intercept_methods(recorder):
            return model.init(jax.random.key(0), x)

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return calls


def dense_chain_calls(plan: Plan, ordered, has_bias) -> list[dict]:
    """The calls :func:`trace_layers` would give for ``model=None``: Dense layers in a chain.

    Args:
      plan: the model's plan.
      ordered: its layers in execution order.
      has_bias: ``lp -> bool``.

    Returns:
      One dict per layer, as :func:`trace_layers`.

    Raises:
      ValueError: a layer that is not Dense.
    """
    calls, shape = [], (1, plan.input_size)
    for lp in ordered:
        if len(lp.kernel_shape) != 2:
            raise ValueError("model=None is only allowed for MLPs: pass model=")
        out = (1, lp.kernel_shape[-1])
        calls.append({"name": lp.name, "kind": "dense", "in_shape": shape, "out_shape": out})
        calls[-1]["use_bias"] = has_bias(lp)
        shape = out
    return calls


def mlp_of(plan: Plan, ordered) -> models.MLP:
    """The :class:`qsparse.models.MLP` that ``model=None`` stands for, from the plan's layers.

    Args:
      plan: the model's plan.
      ordered: its layers in execution order.

    Returns:
      The MLP module.

    Raises:
      ValueError: the layers are not ``Dense_0 .. Dense_n`` with 2-D kernels.
    """
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


# ---- the graph -------------------------------------------------------------------------------


def glue_graph(model: nn.Module | None, names: Sequence[str], kinds: Sequence[str]) -> list:
    """The op list of the models in :mod:`qsparse.models` (layers named in execution order).

    Args:
      model: an ``MLP``, ``LeNet`` or ``VGG`` (``None``: an MLP).
      names: the layer names in execution order.
      kinds: ``"dense"`` or ``"conv"`` per layer.

    Returns:
      The op list (VGG's head is the ``vgg_head`` placeholder, resolved by
      :func:`check_graph`).

    Raises:
      ValueError: a model of another class.
    """

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
        # the placeholder is resolved from the traced shapes in check_graph.
        return graph + [{"op": "vgg_head"}, layer(i), {"op": "relu"}, layer(i + 1)]
    raise ValueError(
        f"model of class {type(model).__name__} has no known architecture: pass graph=[...] "
        "(ops: flatten, dense, conv, relu, max_pool, mean; see docs/FORMAT.md)"
    )


def _layer_output(op: dict, kind: str, shape: tuple, by_name: dict) -> tuple:
    """The output shape of a dense/conv op; ValueError where the trace disagrees."""
    c = by_name.get(op["layer"])
    if c is None or c["kind"] != kind:
        raise ValueError(f"graph op {op} names no {kind} layer of the model")
    if tuple(shape) != c["in_shape"]:
        raise ValueError(
            f"graph gives layer {op['layer']} input shape {shape}, the model gives "
            f"{c['in_shape']}: the graph does not describe this model"
        )
    return c["out_shape"]


def _op_output(op: dict, kind: str, shape: tuple, by_name: dict) -> tuple:
    """The shape after one op of the writer's graph."""
    if kind == "flatten":
        return (1, int(np.prod(shape[1:])))
    if kind == "relu":
        return shape
    if kind == "max_pool":
        (wh, ww), (sh, sw) = op["window"], op["strides"]
        return (1, (shape[1] - wh) // sh + 1, (shape[2] - ww) // sw + 1, shape[3])
    if kind == "mean":
        return tuple(d for i, d in enumerate(shape) if i not in op["axes"])
    if kind in ("dense", "conv"):
        return _layer_output(op, kind, shape, by_name)
    raise ValueError(f"graph op {kind!r} is not allowed")


def check_graph(graph: list, calls: list[dict], input_shape) -> list:
    """Runs the graph on shapes; checks each layer sees the traced input shape.

    Args:
      graph: the op list (given, or from :func:`glue_graph`).
      calls: the traced layer calls.
      input_shape: one example's shape.

    Returns:
      The op list to store (``vgg_head`` resolved to ``mean`` or ``flatten``).

    Raises:
      ValueError: an unknown op, a layer that sees another shape than in the trace, or
        layers not run each once in the traced order.
    """
    by_name = {c["name"]: c for c in calls}
    shape = (1, *input_shape)
    out = []
    for op in graph:
        if op["op"] == "vgg_head":
            op = {"op": "mean", "axes": [1, 2]} if shape[1] > 4 else {"op": "flatten"}
        shape = _op_output(op, op["op"], shape, by_name)
        out.append(dict(op))
    used = [op["layer"] for op in out if "layer" in op]
    if used != [c["name"] for c in calls]:
        raise ValueError(
            f"graph runs layers {used}, the model runs {[c['name'] for c in calls]} "
            "(each once, in this order)"
        )
    return out


# ---- the packed graph against the model ------------------------------------------------------


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


def check_against_model(packed, model, plan, params, qparams, spec) -> None:
    """Runs the packed graph and the model on one random batch; ValueError where they differ.

    The inputs are random images on the uint8 grid (``u8 / 255``, as in training). An example
    differs when one of its logits is off by more than ``1e-4 * max(1, max |model logit|)``;
    more than ``_CHECK_MAY_DIFFER`` such examples and the graph is refused.

    Args:
      packed: the :class:`~qsparse.export.PackedModel` read back from the file's bytes.
      model: the module the graph must reproduce.
      plan: the model's plan.
      params: its params.
      qparams: its quantizer params.
      spec: the layer spec.

    Raises:
      ValueError: the graph does not compute what the model computes.
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
