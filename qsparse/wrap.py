"""Quantization and block sparsity for any Flax (Linen or NNX) model, at the operation.

:func:`make_plan` traces the model once (:mod:`qsparse.intercept`) and finds every *covered
operation*: a matmul (``dot_general``) or convolution whose weight is a parameter, and an
embedding lookup (``gather`` from a parameter). That is every ``Dense``, ``DenseGeneral``,
``Einsum``, ``Conv``, ``Embed`` of Linen and ``Linear``, ``LinearGeneral``, ``Einsum``,
``Conv``, ``Embed`` of NNX, and hand-written ``x @ w``. A *layer* is one such weight, named by
its parameter path without the leaf name (``"Dense_0"``, ``"Block_1/Conv_0"``,
``"decoder/encoderdecoderblock_0/MultiHeadDotProductAttention_0/query"``; the full path when
one module holds several). A :class:`Rule` names layers by a regular expression on that name
(``re.fullmatch``, first match wins; a rule that matches nothing is an error) and gives them:

* weight bits and a block shape / compression: the weight is masked, then fake-quantized,
  before the model runs (its matrix view is ``(prod(shape[:-1]), shape[-1])``);
* activation bits: the *input operand* of each of the layer's matmuls / convolutions is
  fake-quantized where it enters the operation, as AQT, Qwix and Brevitas do. Unsigned on
  ``[0, clip]`` where the input is provably non-negative (after a ReLU, pooling of a ReLU, a
  softmax, ...), signed symmetric on ``[-clip, clip]`` otherwise; ``Rule.a_signed`` overrides.
  An embedding lookup has no activation operand.

Nothing else changes: with every bit width at 32 and compression 1, the wrapped model
computes exactly what the model computes. Parameters that are not the weight of a covered
operation (biases, norm scales, position tables) stay as they are and are counted in the
memory model at their dtype's bits.

The *value* part of the settings is a ``spec`` pytree ``{layer: {"w_bits", "a_bits",
"compression"}}`` of float32 arrays, so one compiled program serves every precision and
``jax.vmap`` over stacked specs trains a sweep. The whole model state (batch statistics,
NNX RNG counters) and the train/eval call arguments are carried by the plan's
:meth:`Plan.apply`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qsparse import intercept, quant, sparsity
from qsparse import memory as mem

INT_MATMUL_MAX_BITS = 8  # integer codes of up to 8 bits are exact in bfloat16
FULL = quant.FULL_PRECISION
_MODE_ARGS = (  # (argument, value in training, value in evaluation), first found wins
    ("train", True, False),
    ("training", True, False),
    ("is_training", True, False),
    ("deterministic", False, True),
    ("use_running_average", False, True),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Settings for the layers whose name matches ``pattern``.

    Attributes:
      pattern: regular expression, full match on the layer name (``"Dense_0"``, ``".*"``).
      w_bits: weight bits (see :data:`qsparse.quant.ALLOWED_BITS`; 32 = float); the spec's
        initial value.
      a_bits: bits of the layer's input activations; 32: left as they are, with no quantizer
        in the program (a spec cannot lower it then).
      compression: block compression ratio >= 1 (spec's initial value); needs ``block_shape``.
      block_shape: ``(bm, bn)`` on the weight's matrix view, or ``None`` for no block sparsity.
      per_channel: one weight scale per output channel.
      scale_mode: ``"max"``, ``"mean"`` or ``"learned"`` (LSQ step size, a trainable parameter).
      zero_level: weight level set holds zero (2-bit = ternary); see :mod:`qsparse.quant`.
      weight_grad: ``"clipped"`` (LSQ: no weight gradient outside the quantizer's range) or
        ``"identity"`` (passed on there too); see :func:`qsparse.quant.quantize_weight`.
      a_signed: ``None`` (default): unsigned where the input is provably non-negative, signed
        otherwise; ``True``/``False`` forces it.
      act_clip: initial activation clip level.
      learn_clip: train the clip (PACT); otherwise it stays at ``act_clip``.
      int_matmul: run the layer's forward matmul on the integer codes of its weight and its
        quantized input (:func:`qsparse.quant.int_matmul`: bfloat16 with float32 sums,
        exact). For ``x @ kernel`` layers (``nn.Dense``, ``nnx.Linear``) with a learned step;
        ``w_bits`` and ``a_bits`` must stay at most 8 in every setting. Faster only where
        bfloat16 matmuls are native (GPUs, TPUs, AVX-512 BF16 CPUs); slower on AVX2 CPUs.
      bf16_grads: with ``int_matmul``, run the layer's two backward matmuls in bfloat16 too,
        on the integer codes and the output gradient rounded to bfloat16 (not exact).
      bias_bits: bits of the layer's biases (the ``bias`` beside its weight): 32 (float32) or
        8 (int8 codes and one float32 scale, :func:`qsparse.quant.quantize_bias`; trained,
        counted and exported so).
    """

    pattern: str
    w_bits: float = 32
    a_bits: float = 32
    compression: float = 1.0
    block_shape: tuple[int, int] | None = None
    per_channel: bool = False
    scale_mode: str = "max"
    zero_level: bool = True
    weight_grad: str = "clipped"
    a_signed: bool | None = None
    act_clip: float = 4.0
    learn_clip: bool = False
    int_matmul: bool = False
    bf16_grads: bool = False
    bias_bits: int = 32

    def __post_init__(self):
        where = f" (rule {self.pattern!r})"
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(
                f"pattern={self.pattern!r} is not a valid regular expression: {e}"
            ) from None
        quant.check_bits(self.w_bits, "w_bits")
        quant.check_bits(self.a_bits, "a_bits")
        quant.check_bias_bits(self.bias_bits)
        quant.check_weight_grad(self.weight_grad)
        sparsity.check_compression(self.compression)
        if self.scale_mode not in quant.SCALE_MODES:
            raise ValueError(
                f"scale_mode={self.scale_mode!r} is not allowed: use one of {quant.SCALE_MODES}"
            )
        if not self.act_clip > 0:
            raise ValueError(f"act_clip={self.act_clip} is not allowed: use a value > 0")
        if self.int_matmul and self.scale_mode != "learned":
            raise ValueError(
                f"int_matmul with scale_mode={self.scale_mode!r} is not allowed: it needs"
                f" scale_mode='learned'{where}"
            )
        for field in ("w_bits", "a_bits"):
            if self.int_matmul and getattr(self, field) > INT_MATMUL_MAX_BITS:
                raise ValueError(
                    f"int_matmul with {field}={getattr(self, field):g} is not allowed: use"
                    f" {field} <= {INT_MATMUL_MAX_BITS}{where}"
                )
        if self.bf16_grads and not self.int_matmul:
            raise ValueError(
                "bf16_grads=True with int_matmul=False is not allowed: the bfloat16 backward"
                f" multiplies the integer codes, so it needs int_matmul=True{where}"
            )
        if self.block_shape is None and self.compression != 1:
            raise ValueError(f"compression={self.compression} needs block_shape{where}")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static facts about one covered weight.

    Attributes:
      name: layer name (``"Dense_0"``).
      path: path of the weight in the params tree (``("Dense_0", "kernel")``).
      rule: the matching :class:`Rule`.
      kernel_shape: the weight's shape.
      ops: the covered operations using it (``"dot_general"``, ``"conv_general_dilated"``,
        ``"gather"``), in first-use order.
      act_quantized: whether its input is quantized: it has an activation operand (a matmul or
        convolution) and its rule's ``a_bits`` is below 32. Static: a rule at 32 bits leaves
        the input as it is, with no quantizer (and no clip gradient) in the program.
      a_signed: whether that activation quantizer is signed.
      in_size: values in its (first) activation operand for one example; 0 for lookups.
      reads_input: that operand is the model's input itself (reshaped at most).
      order: first use in evaluation order.
      int_matmul: its matmuls run on integer codes.
    """

    name: str
    path: tuple
    rule: Rule
    kernel_shape: tuple[int, ...]
    ops: tuple[str, ...]
    act_quantized: bool
    a_signed: bool
    in_size: int
    reads_input: bool
    order: int
    int_matmul: bool = False

    @property
    def block_grid(self) -> tuple[int, int] | None:
        """The ``(R, C)`` block grid, or None for a dense layer."""
        if self.rule.block_shape is None:
            return None
        return sparsity.check_block_shape(self.kernel_shape, self.rule.block_shape)


def module_path(module: nn.Module) -> str:
    """The ``/``-joined path of a bound Linen module (``"Block_0/Dense_1"``).

    Args:
      module: a bound module.

    Returns:
      The path string.
    """
    return "/".join(str(p) for p in module.path)


def get_path(tree, path):
    """The subtree of nested mapping ``tree`` at ``path`` (a tuple of keys).

    Args:
      tree: nested dicts.
      path: keys from the root.

    Returns:
      ``tree[path[0]][path[1]]...``.
    """
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree, path, value):
    """A copy of nested dict ``tree`` with ``path`` set to ``value`` (the rest shared).

    Args:
      tree: nested dicts.
      path: keys from the root.
      value: the new subtree.

    Returns:
      The new tree.
    """
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree[path[0]], path[1:], value)
    return out


def _key_name(k) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _leaf_paths(tree) -> list[tuple]:
    return [
        tuple(_key_name(k) for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


# ---- models: one pure form for Linen and NNX ------------------------------------------------


def _is_nnx(model) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax always ships nnx here
        return False
    return isinstance(model, nnx.Module)


@dataclasses.dataclass(eq=False)
class _Linen:
    """A Linen module as ``init(key, x) -> variables`` and ``apply(...) -> (y, state)``."""

    module: nn.Module
    eval_module: nn.Module
    train_kwargs: dict
    eval_kwargs: dict
    rng_names: tuple[str, ...]

    def init(self, key, x):
        variables = self.eval_module.init(key, x, **self.eval_kwargs)
        return dict(variables)

    def apply(self, params, state, x, rng, train: bool):
        variables = {"params": params, **state}
        if not train:
            return self.eval_module.apply(variables, x, **self.eval_kwargs), state
        rngs = {n: jax.random.fold_in(rng, i) for i, n in enumerate(self.rng_names)}
        mutable = list(state) or False
        out = self.module.apply(variables, x, rngs=rngs, mutable=mutable, **self.train_kwargs)
        if mutable:
            y, new = out
            return y, {k: new.get(k, v) for k, v in state.items()}
        return out, state


@dataclasses.dataclass(eq=False)
class _NNX:
    """An NNX module through its graph/state split (params: ``nnx.Param``; state: the rest)."""

    graph_train: Any
    graph_eval: Any
    params_def: Any
    state_def: Any
    params: Any
    state: Any

    def init(self, key, x):
        del key, x  # an NNX module is built initialised
        return {"params": self.params, **({"state": self.state} if self.state else {})}

    def apply(self, params, state, x, rng, train: bool):
        from flax import nnx

        del rng  # NNX modules carry their RNG streams in their state
        graph = self.graph_train if train else self.graph_eval
        p = jax.tree.unflatten(self.params_def, jax.tree.leaves(params))
        s = jax.tree.unflatten(self.state_def, self._state_leaves(state.get("state", {})))
        module = nnx.merge(graph, p, s)
        y = module(x)
        if not train:
            return y, state
        _, _, new = nnx.split(module, nnx.Param, ...)
        return y, ({"state": nnx.to_pure_dict(new)} if state else {})

    def _state_leaves(self, given) -> list:
        """The leaves of the module's state from ``given``, its RNG streams taken from the
        module where ``given`` leaves them out (an exported state keeps what inference needs).
        """
        out = []
        for path, default in zip(_leaf_paths(self.state), jax.tree.leaves(self.state)):
            try:
                out.append(get_path(given, path))
            except (KeyError, IndexError, TypeError):
                if _is_inference_state(path, default):
                    name = "/".join(map(str, ("state", *path)))
                    raise ValueError(
                        f"state has no {name}: pass the model state that training or"
                        " export.restore returned"
                    ) from None
                out.append(default)
        return out


def _mode_kwargs(fn, given: dict | None, train: bool) -> dict:
    if given is not None:
        return dict(given)
    params = inspect.signature(fn).parameters
    for name, t, e in _MODE_ARGS:
        if name in params:
            return {name: t if train else e}
    return {}


def _adapter(model, eval_model, train_kwargs, eval_kwargs, rng_names):
    if _is_nnx(model):
        from flax import nnx

        modes = {"deterministic": False, "use_running_average": False}
        tm = nnx.view(model, raise_if_not_found=False, **modes)
        em = nnx.view(
            eval_model if eval_model is not None else model,
            raise_if_not_found=False,
            **{k: not v for k, v in modes.items()},
        )
        graph_train, params, state = nnx.split(tm, nnx.Param, ...)
        graph_eval, _, _ = nnx.split(em, nnx.Param, ...)
        return _NNX(
            graph_train,
            graph_eval,
            jax.tree.structure(params),
            jax.tree.structure(state),
            nnx.to_pure_dict(params),
            nnx.to_pure_dict(state),
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model={type(model).__name__} is not allowed: use a flax.linen.Module or a"
            " flax.nnx.Module"
        )
    em = eval_model if eval_model is not None else model
    return _Linen(
        model,
        em,
        _mode_kwargs(model.__call__, train_kwargs, True),
        _mode_kwargs(em.__call__, eval_kwargs, False),
        tuple(rng_names),
    )


# ---- the plan -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Which weights are quantized / sparsified, and how. Static; hashable by identity.

    Attributes:
      layers: layer name -> :class:`LayerPlan`, in first-use order.
      input_size: values in one input example.
      params_shapes: every parameter leaf: path -> ``(shape, dtype)``.
      state_shapes: every leaf of the model's other state needed for inference (batch
        statistics): ``(collection, *path)`` -> ``(shape, dtype)``.
      output_size: values in one example of the model's output.
      boxes: the params tree as ``init`` gave it, boxed (logical partitioning), else None.
    """

    layers: dict[str, LayerPlan]
    input_size: int
    params_shapes: dict
    state_shapes: dict
    output_size: int
    model: Any = dataclasses.field(repr=False, default=None)
    boxes: Any = dataclasses.field(repr=False, default=None)
    _traces: dict = dataclasses.field(repr=False, default_factory=dict)

    # ---- values ---------------------------------------------------------------------------
    def init_spec(self, **overrides) -> dict:
        """The value part of the settings, from the rules.

        Args:
          **overrides: ``w_bits=``, ``a_bits=``, ``compression=`` to set on every layer whose
            rule allows it (compression only on block-sparse layers, a_bits only on layers
            whose rule quantizes their input, ``a_bits < 32``).

        Returns:
          ``{layer: {"w_bits", "a_bits", "compression"}}`` of float32 scalars.

        Raises:
          ValueError: one line naming the layer, the field, the value and what is allowed.
        """
        spec = {}
        for name, lp in self.layers.items():
            r = lp.rule
            vals = {
                "w_bits": r.w_bits,
                "a_bits": r.a_bits if lp.act_quantized else 32,
                "compression": r.compression,
            }
            for k, v in overrides.items():
                if k not in vals:
                    raise ValueError(
                        f"override {k!r} is not allowed: use w_bits, a_bits, compression"
                    )
                if k == "compression" and r.block_shape is None:
                    continue
                if k == "a_bits" and (not lp.act_quantized or r.a_bits >= 32):
                    continue
                vals[k] = v
            spec[name] = {k: jnp.asarray(v, jnp.float32) for k, v in vals.items()}
        self.check_spec(spec)
        return spec

    def check_spec(self, spec) -> None:
        """Validates a spec's concrete values (traced values pass unchecked).

        Args:
          spec: ``{layer: {"w_bits", "a_bits", "compression"}}``, leaves scalars or stacked.

        Raises:
          ValueError: a missing layer, a bit width outside :data:`qsparse.quant.ALLOWED_BITS`,
            a compression below 1, more than 8 bits on an ``int_matmul`` layer, or input bits
            below 32 on a layer whose rule has no input quantizer.
        """
        for name, lp in self.layers.items():
            if name not in spec:
                raise ValueError(f"spec has no entry for layer {name!r}: use plan.init_spec()")
            s = spec[name]
            quant.check_bits(s["w_bits"], f"{name}.w_bits")
            quant.check_bits(s["a_bits"], f"{name}.a_bits")
            a = s["a_bits"]
            if not lp.act_quantized and not isinstance(a, jax.core.Tracer):
                low = float(np.min(np.asarray(a)))
                if low < FULL:
                    raise ValueError(
                        f"{name}.a_bits={low:g} is not allowed: the layer's rule leaves its input"
                        f" as it is (Rule.a_bits=32); give the rule a_bits < 32 to quantize it"
                    )
            sparsity.check_compression(s["compression"], f"{name}.compression")
            if lp.int_matmul:
                for key in ("w_bits", "a_bits"):
                    v = s[key]
                    if isinstance(v, jax.core.Tracer):
                        continue
                    worst = float(np.max(np.asarray(v)))
                    if worst > INT_MATMUL_MAX_BITS:
                        raise ValueError(
                            f"{name}.{key}={worst:g} is not allowed: the layer runs int_matmul;"
                            f" use <= {INT_MATMUL_MAX_BITS}"
                        )

    def init_qparams(self, params, spec) -> dict:
        """Trainable quantizer parameters: LSQ step sizes and PACT clips.

        Args:
          params: the model's ``params`` collection.
          spec: the spec (the step is initialised for its ``w_bits``).

        Returns:
          ``{layer: {"w_step": ..., "a_clip": ...}}`` (only the entries the rules use).
        """
        q = {}
        for name, lp in self.layers.items():
            r, entry = lp.rule, {}
            if r.scale_mode == "learned":
                entry["w_step"] = quant.weight_step(
                    get_path(params, lp.path),
                    spec[name]["w_bits"],
                    per_channel=r.per_channel,
                    scale_mode="mean",
                    zero_level=r.zero_level,
                )
            if lp.act_quantized:
                entry["a_clip"] = jnp.asarray(r.act_clip, jnp.float32)
            if entry:
                q[name] = entry
        return q

    def init_variables(self, key, sample_x) -> tuple[dict, dict]:
        """Fresh parameters and model state.

        Args:
          key: PRNG key (Linen; an NNX module comes initialised).
          sample_x: an input batch (shapes only matter).

        Returns:
          ``(params, state)``: the unboxed ``params`` collection and the other collections
          (``{}`` for a model without state).
        """
        variables = self.model.init(key, sample_x)
        params = nn.meta.unbox(variables.pop("params", {}))
        return params, nn.meta.unbox(variables)

    def boxed(self, params):
        """``params`` with the model's partitioning metadata (``nn.LogicallyPartitioned``).

        Args:
          params: an unboxed params tree of the model's structure.

        Returns:
          The tree boxed as ``init`` returned it (``params`` itself for an unboxed model).
        """
        if self.boxes is None:
            return params
        is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
        return jax.tree.map(
            lambda box, v: box.replace_boxed(v) if is_box(box) else v,
            self.boxes,
            params,
            is_leaf=is_box,
        )

    # ---- transforms -----------------------------------------------------------------------
    def transform_params(self, params, qparams, spec, masks=None):
        """Mask-then-quantize every covered weight.

        Args:
          params: the model's ``params`` collection.
          qparams: from :meth:`init_qparams`.
          spec: the spec.
          masks: optional ``{layer: mask}`` of weight-shaped 0/1 arrays.

        Returns:
          A params tree with the weights (and biases of rules with ``bias_bits < 32``)
          replaced by their fake-quantized values.
        """
        out = params
        for name, lp in self.layers.items():
            r = lp.rule
            bias = self.bias_path(lp)
            if bias is not None and r.bias_bits < FULL:
                out = set_path(out, bias, quant.quantize_bias(get_path(params, bias), r.bias_bits))
            w = get_path(params, lp.path)
            if masks is not None and name in masks:
                w = w * masks[name]
            w = quant.quantize_weight(
                w,
                spec[name]["w_bits"],
                per_channel=r.per_channel,
                scale_mode=r.scale_mode,
                step=qparams.get(name, {}).get("w_step"),
                zero_level=r.zero_level,
                weight_grad=r.weight_grad,
            )
            out = set_path(out, lp.path, w)
        return out

    def level_penalty(self, params, qparams, spec):
        """Mean squared distance, in steps, of the covered weights to their levels.

        The oscillation-dampening term (:func:`qsparse.quant.level_distance`): each layer's
        mean over its live weights, averaged over the layers; full-precision layers add 0.

        Args:
          params: the model's ``params`` collection.
          qparams: from :meth:`init_qparams`.
          spec: the spec.

        Returns:
          A scalar.
        """
        terms = []
        for name, lp in self.layers.items():
            r = lp.rule
            w = get_path(params, lp.path)
            bits = spec[name]["w_bits"]
            step = quant.layer_step(
                w,
                bits,
                qparams.get(name, {}).get("w_step"),
                per_channel=r.per_channel,
                scale_mode=r.scale_mode,
                zero_level=r.zero_level,
            )
            total, count = quant.level_distance(w, bits, step, r.zero_level)
            terms.append(total / jnp.maximum(count, 1.0))
        return sum(terms) / len(terms)

    def bias_path(self, lp: LayerPlan) -> tuple | None:
        """The path of the ``bias`` beside a covered weight, or None when there is none.

        Args:
          lp: the layer.

        Returns:
          The parameter path, or None.
        """
        path = (*lp.path[:-1], "bias")
        return path if path in self.params_shapes else None

    def _trace(self, train: bool, params, state, x, rng) -> tuple[intercept.Trace, dict]:
        """The model's trace for these shapes (cached) and its parameter-index -> layer map."""
        args = (params, state, x, rng)
        key = (train, jax.tree.structure(args)) + tuple(
            (tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(args)
        )
        hit = self._traces.get(key)
        if hit is None:
            model = self.model

            def fn(p, s, xx, r):
                return model.apply(p, s, xx, r, train)

            shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
            tr = intercept.trace(fn, *shapes)
            by_path = {lp.path: name for name, lp in self.layers.items()}
            index = {i: by_path[p] for i, p in enumerate(_leaf_paths(params)) if p in by_path}
            hit = self._traces[key] = (tr, index)
        return hit

    def apply(
        self,
        model,
        params,
        qparams,
        spec,
        x,
        *,
        masks=None,
        state=None,
        train: bool = False,
        rng=None,
        quantized: bool = False,
    ):
        """Runs the model with quantized / sparsified weights and quantized activations.

        Args:
          model: the model given to :func:`make_plan` (or None).
          params: its ``params`` collection (unboxed).
          qparams: from :meth:`init_qparams`.
          spec: the spec.
          x: the input batch.
          masks: optional ``{layer: mask}`` applied before quantization.
          state: the model's other collections (batch statistics); None: none.
          train: training mode (the model's train/deterministic arguments, dropout, batch
            statistics updated).
          rng: PRNG key for dropout in training mode (Linen).
          quantized: ``params`` already hold the quantized weights (a loaded export): skip
            masking and weight quantization.

        Returns:
          The model's output; in training mode ``(output, new_state)``.
        """
        del model  # the plan holds it
        state = {} if state is None else state
        qp = params if quantized else self.transform_params(params, qparams, spec, masks)
        rng = jax.random.key(0) if rng is None else rng
        tr, index = self._trace(train, qp, state, x, rng)
        layers = self.layers

        def hook(site, prim, ops, bind_params):
            name = index.get(site.param)
            lp = layers.get(name)
            if lp is None or site.kind == intercept.GATHER or not lp.act_quantized:
                return prim.bind(*ops, **bind_params)
            ops = list(ops)
            a = 1 - site.weight
            clip = qparams[name]["a_clip"]
            if not lp.rule.learn_clip:
                clip = jax.lax.stop_gradient(clip)
            a_bits = spec[name]["a_bits"]
            ops[a] = quant.quantize_activation(ops[a], a_bits, clip, signed=lp.a_signed)
            if lp.int_matmul and _dense_form(site, ops, bind_params):
                return quant.int_matmul(
                    ops[0],
                    ops[1],
                    a_bits,
                    clip,
                    qparams[name]["w_step"],
                    signed=lp.a_signed,
                    bf16_grads=lp.rule.bf16_grads,
                )
            return prim.bind(*ops, **bind_params)

        y, new_state = intercept.evaluate(tr, hook, qp, state, x, rng)
        return (y, new_state) if train else y

    # ---- sparsity -------------------------------------------------------------------------
    def block_shapes(self, prefix: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
        """Block shapes keyed by the ``/``-joined path of each sparsified weight.

        Args:
          prefix: path of the params collection inside the trainable tree (e.g. ``("params",)``).

        Returns:
          ``{"params/Dense_0/kernel": (8, 8), ...}`` for the layers with a block shape.
        """
        return {
            "/".join(str(p) for p in (*prefix, *lp.path)): tuple(lp.rule.block_shape)
            for lp in self.layers.values()
            if lp.rule.block_shape is not None
        }

    def kernel_paths(self, prefix: tuple[str, ...] = ()) -> dict[str, str]:
        """The weight path of every layer.

        Args:
          prefix: path of the params collection inside the trainable tree.

        Returns:
          Layer name -> ``/``-joined weight path (as in :meth:`block_shapes`).
        """
        return {
            name: "/".join(str(p) for p in (*prefix, *lp.path)) for name, lp in self.layers.items()
        }

    def compressions(self, spec, prefix: tuple[str, ...] = ()) -> dict:
        """The spec's compression of every block-sparse weight.

        Args:
          spec: the spec.
          prefix: path of the params collection inside the trainable tree.

        Returns:
          Per-weight compression values keyed like :meth:`block_shapes`.
        """
        paths = self.kernel_paths(prefix)
        return {
            paths[n]: spec[n]["compression"]
            for n, lp in self.layers.items()
            if lp.rule.block_shape is not None
        }

    # ---- memory ---------------------------------------------------------------------------
    def memory(self, spec, params=None, *, input_bits: int = 8) -> dict:
        """The memory model for this plan and spec: every parameter of the model.

        Covered weights count their codes, block index and scales (:mod:`qsparse.memory`);
        the biases of rules with ``bias_bits=8`` count 8 bits each plus a 32-bit scale; every
        other parameter (biases, norm scales, uncovered weights) and the inference state
        (batch statistics) count at their dtype's bits. BatchNorm is counted as its own
        parameters and statistics, not folded into the layer before it.

        Args:
          spec: the spec.
          params: optional params (masked); kept blocks are then the blocks of each weight
            that are not entirely zero (what an export stores). Without params the target
            counts ``ceil(n_blocks / compression)`` are used.
          input_bits: bits per value of the model's input.

        Returns:
          :func:`qsparse.memory.summarize`'s dict plus ``"layers"`` (per-module breakdown:
          ``params`` counts add up to ``"num_params"``), ``"num_params"`` and
          ``"block_sparsity"`` (fraction of zero blocks over all sparsified layers).

        Raises:
          ValueError: a bad value in ``spec``.
        """
        self.check_spec(spec)
        per_module, zero_blocks, all_blocks = self._module_memory(spec, params)
        out = mem.summarize(per_module, self._activation_memory(spec, input_bits))
        out["layers"] = per_module
        out["num_params"] = sum(e["params"] for e in per_module.values())
        out["block_sparsity"] = jnp.asarray(zero_blocks, jnp.float32) / max(all_blocks, 1)
        return out

    def _module_memory(self, spec, params) -> tuple[dict, Any, int]:
        """Bits of every parameter and state leaf by module, and the zero and total blocks."""
        covered = {lp.path: lp for lp in self.layers.values()}
        biases = {
            self.bias_path(lp): lp.rule.bias_bits
            for lp in self.layers.values()
            if self.bias_path(lp) is not None and lp.rule.bias_bits < FULL
        }
        per_module: dict[str, dict] = {}
        zero_blocks, all_blocks = 0, 0

        def entry(module: str) -> dict:
            return per_module.setdefault(
                module, {k: 0 for k in ("codes", "index", "scales", "other", "fp32", "params")}
            )

        for path, (shape, dtype) in self.params_shapes.items():
            size = int(np.prod(shape))
            e = entry("/".join(str(p) for p in path[:-1]))
            e["params"] += size
            e["fp32"] += size * mem.FP_BITS
            if path in biases:  # codes and one float32 scale
                e["other"] = e["other"] + size * biases[path]
                e["scales"] = e["scales"] + mem.SCALE_BITS
                continue
            if path not in covered:
                e["other"] = e["other"] + size * _dtype_bits(dtype)
                continue
            lm, n_blocks, kept = _covered_memory(covered[path], spec, params)
            if n_blocks:
                zero_blocks = zero_blocks + (n_blocks - kept)
                all_blocks += n_blocks
            for k in ("codes", "index", "scales"):
                e[k] = e[k] + lm[k]
        for path, (shape, dtype) in self.state_shapes.items():
            e = entry("/".join(str(p) for p in path[1:-1]))
            size = int(np.prod(shape))
            e["other"] = e["other"] + size * _dtype_bits(dtype)
            e["fp32"] += size * mem.FP_BITS
        for e in per_module.values():
            e["total"] = e["codes"] + e["index"] + e["scales"] + e["other"]
        return per_module, zero_blocks, all_blocks

    def _activation_memory(self, spec, input_bits: int):
        """The activation buffers of :func:`qsparse.memory.activation_memory`."""
        # Every matmul / convolution input is a buffer (lookups have none), 32 bits unquantized.
        ordered = sorted(
            (lp for lp in self.layers.values() if lp.in_size and not lp.reads_input),
            key=lambda lp: lp.order,
        )
        return mem.activation_memory(
            self.input_size,
            [lp.in_size for lp in ordered] + [self.output_size],
            [spec[lp.name]["a_bits"] if lp.act_quantized else FULL for lp in ordered]
            + [mem.FP_BITS],
            input_bits=input_bits,
        )


def _covered_memory(lp: LayerPlan, spec, params) -> tuple[dict, int, Any]:
    """A covered weight's codes, index and scale bits, its block count (0: dense) and kept blocks.

    Kept blocks are the blocks of ``params``' weight that are not entirely zero, or without
    params the target ``ceil(n_blocks / compression)``.
    """
    grid = lp.block_grid
    kept, n_blocks = None, 0
    if grid is not None:
        n_blocks = grid[0] * grid[1]
        if params is None:
            kept = sparsity.kept_blocks(n_blocks, spec[lp.name]["compression"])
        else:
            norms = sparsity.block_norms(get_path(params, lp.path), lp.rule.block_shape)
            kept = jnp.sum(norms > 0).astype(jnp.int32)
    lm = mem.layer_memory(
        lp.kernel_shape,
        0,
        w_bits=spec[lp.name]["w_bits"],
        kept=kept,
        block_shape=lp.rule.block_shape,
        per_channel=lp.rule.per_channel,
        a_bits=spec[lp.name]["a_bits"],
        act_quantized=lp.act_quantized,
    )
    return lm, n_blocks, kept


def _dtype_bits(dtype) -> int:
    return int(np.dtype(dtype).itemsize * 8)


def _dense_form(site, ops, bind_params) -> bool:
    """Whether a covered matmul is ``x @ kernel`` (an ``nn.Dense``), the int_matmul form."""
    if site.kind != intercept.MATMUL or site.weight != 1 or ops[1].ndim != 2:
        return False
    dims = bind_params["dimension_numbers"]
    pet = bind_params.get("preferred_element_type")
    return (
        tuple(map(tuple, dims[0])) == ((ops[0].ndim - 1,), (0,))
        and dims[1] == ((), ())
        and bind_params.get("precision") is None
        and (pet is None or pet == jnp.float32)
        and ops[0].dtype == jnp.float32
        and ops[1].dtype == jnp.float32
    )


def _layer_names(paths: list[tuple]) -> dict[tuple, str]:
    """Layer names: the module path, or the full path where a module holds several weights."""
    modules = [p[:-1] for p in paths]
    return {
        p: "/".join(str(k) for k in (p[:-1] if modules.count(p[:-1]) == 1 else p)) for p in paths
    }


def make_plan(
    model,
    rules: Sequence[Rule],
    sample_input,
    *,
    eval_model=None,
    train_kwargs: Mapping | None = None,
    eval_kwargs: Mapping | None = None,
    rng_names: Sequence[str] = ("dropout",),
) -> Plan:
    """Traces ``model`` once (shapes only) and assigns each covered weight its first rule.

    Covered weights no rule matches stay float and dense (counted in the memory model).

    Args:
      model: a Linen module, or an NNX module (split into graph and state; its
        ``deterministic`` / ``use_running_average`` attributes set for each mode).
      rules: rules, first match wins.
      sample_input: an input batch (or ``jax.ShapeDtypeStruct``); batch size 1 is best.
      eval_model: the module to evaluate with, where evaluation needs another module (Flax's
        lm1b Transformer takes ``deterministic`` from its config); default ``model``.
      train_kwargs: call arguments in training mode; default from the signature
        (``train=True``, ``deterministic=False``, ... or none).
      eval_kwargs: call arguments in evaluation mode; default ``train=False``, ...
      rng_names: RNG streams a Linen model draws in training (one key each, every step).

    Returns:
      The :class:`Plan`.

    Raises:
      TypeError: ``model`` is not a Flax module.
      ValueError: one line: a rule matches no layer, a block shape does not divide its layer,
        ``int_matmul`` on a layer that is not ``x @ kernel``, or the model has no covered
        operation at all.
    """
    rules = list(rules)
    adapter = _adapter(model, eval_model, train_kwargs, eval_kwargs, rng_names)
    x = jax.ShapeDtypeStruct(tuple(sample_input.shape), sample_input.dtype)
    variables = jax.eval_shape(adapter.init, jax.random.key(0), x)
    params_boxed = variables.pop("params", {})
    params = nn.meta.unbox(params_boxed)
    state = nn.meta.unbox(variables)
    paths = _leaf_paths(params)
    shapes = jax.tree.leaves(params)
    tr, seen, out_shape = _record_uses(adapter, params, state, x)
    if not seen:
        raise ValueError(
            f"{type(model).__name__} has no covered operation: qsparse quantizes matmuls and"
            " convolutions whose weight is a parameter (Dense, DenseGeneral, Einsum, Conv,"
            " Linear, LinearGeneral) and embedding lookups (Embed); add such a layer, or wrap"
            " only models that have one"
        )
    names = _layer_names([paths[i] for i in seen])
    used = [False] * len(rules)
    layers: dict[str, LayerPlan] = {}
    for i in sorted(seen, key=lambda i: seen[i][0][0].order):
        name = names[paths[i]]
        rule = _match_rule(rules, name, used)
        layers[name] = _layer_plan(name, paths[i], rule, shapes[i], seen[i])
    hidden = sorted("/".join(map(str, paths[i])) for i in tr.hidden if i not in seen)
    _check_rules_used(rules, used, list(names.values()), hidden)
    _warn_hidden(rules, hidden)
    y = out_shape[0]
    return Plan(
        layers=layers,
        input_size=int(np.prod(x.shape[1:])),
        params_shapes={p: (tuple(s.shape), s.dtype) for p, s in zip(paths, shapes)},
        state_shapes=_inference_state_shapes(state),
        output_size=int(np.prod(y.shape[1:])) if hasattr(y, "shape") else 0,
        model=adapter,
        boxes=params_boxed if _is_boxed(params_boxed) else None,
    )


def _is_boxed(params_boxed) -> bool:
    """Whether ``init`` gave the params with partitioning metadata."""
    is_box = lambda v: isinstance(v, nn.meta.AxisMetadata)  # noqa: E731
    return any(is_box(v) for v in jax.tree.leaves(params_boxed, is_leaf=is_box))


def _record_uses(adapter, params, state, x):
    """One evaluation with a recording hook: the covered operations and their operands.

    Returns:
      ``(trace, seen, out_shape)``: the :func:`qsparse.intercept.trace`, param index ->
      ``[(site, activation operand or None, bind params), ...]`` in use order, and the
      output's shape.
    """
    rng = jax.random.key(0)
    tr = intercept.trace(
        lambda p, s, xx, r: adapter.apply(p, s, xx, r, True), params, state, x, rng
    )
    seen: dict[int, list] = {}

    def record(site, prim, ops, bind_params):
        a = ops[1 - site.weight]  # its shape only: the value may belong to a remat/scan trace
        a = None if site.kind == intercept.GATHER else jax.ShapeDtypeStruct(a.shape, a.dtype)
        seen.setdefault(site.param, []).append((site, a, bind_params))
        return prim.bind(*ops, **bind_params)

    def run(p, s, xx, r):
        return intercept.evaluate(tr, record, p, s, xx, r, input_arg=1)

    out_shape = jax.eval_shape(run, params, state, x, rng)
    return tr, seen, out_shape


def _match_rule(rules: Sequence[Rule], name: str, used: list[bool]) -> Rule:
    """The first rule whose pattern matches ``name`` (marked in ``used``), else a float one."""
    for j, r in enumerate(rules):
        if re.fullmatch(r.pattern, name):
            used[j] = True
            return r
    return Rule(pattern=re.escape(name))


def _layer_plan(name: str, path: tuple, rule: Rule, kernel, uses: list) -> LayerPlan:
    """The :class:`LayerPlan` of one covered weight from its recorded uses.

    Raises:
      ValueError: a block shape that does not divide the weight, or ``int_matmul`` on a
        layer that is not ``x @ kernel``.
    """
    kshape = tuple(kernel.shape)
    if rule.block_shape is not None:
        sparsity.check_block_shape(kshape, rule.block_shape, f"{name}.block_shape")
    acts = [(s, a, bp) for s, a, bp in uses if s.kind != intercept.GATHER]
    signed = rule.a_signed
    if signed is None:
        signed = not all(s.nonneg for s, _, _ in acts)
    if rule.int_matmul and not _int_matmul_form(acts, kernel):
        raise ValueError(
            f"int_matmul on {name} is not allowed: it needs a layer that computes"
            " x @ kernel with a 2-D float32 kernel and default precision (nn.Dense,"
            " nnx.Linear)"
        )
    first = acts[0] if acts else None
    return LayerPlan(
        name=name,
        path=path,
        rule=rule,
        kernel_shape=kshape,
        ops=tuple(dict.fromkeys(s.kind for s, _, _ in uses)),
        act_quantized=bool(acts) and rule.a_bits < FULL,
        a_signed=bool(signed),
        in_size=int(np.prod(first[1].shape[1:])) if first else 0,
        reads_input=bool(first and first[0].reads_input),
        order=uses[0][0].order,
        int_matmul=rule.int_matmul,
    )


def _int_matmul_form(acts: list, kernel) -> bool:
    """Whether every use of a weight with an activation operand is ``x @ kernel``."""
    return bool(acts) and all(
        _dense_form(s, [a, kernel] if s.weight == 1 else [kernel, a], bp) for s, a, bp in acts
    )


# Where the interpreter does not reach a weight (qsparse.intercept enters calls, remat, scan).
_UNREACHED = "used only inside while/cond or a custom-derivative function"


def _check_rules_used(rules: Sequence[Rule], used: list[bool], names: list, hidden: list):
    """ValueError naming the first rule that matches no layer."""
    for j, r in enumerate(rules):
        if not used[j]:
            also = f"; not covered ({_UNREACHED}): {hidden}" if hidden else ""
            raise ValueError(
                f"rule pattern={r.pattern!r} matches no layer: layers are {names}{also}"
            )


def _warn_hidden(rules: Sequence[Rule], hidden: list) -> None:
    """Warns, in one line, of parameters a rule would cover but the interpreter cannot reach."""
    missed = [h for h in hidden if any(re.fullmatch(r.pattern, h.rsplit("/", 1)[0]) for r in rules)]
    if missed:
        warnings.warn(
            f"{_UNREACHED}, these stay float and dense (counted at their dtype) though a rule"
            f" matches them: {missed}",
            stacklevel=3,
        )


def _inference_state_shapes(state) -> dict:
    """``(collection, *path)`` -> ``(shape, dtype)`` of the state leaves inference needs."""
    return {
        path: (tuple(leaf.shape), leaf.dtype)
        for path, leaf in zip(_leaf_paths(state), jax.tree.leaves(state))
        if _is_inference_state(path, leaf)
    }


def _is_inference_state(path, leaf) -> bool:
    """Whether a state leaf is needed for inference (not an RNG key or counter)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return False
    return not any(str(p) in ("rngs", "count", "key") for p in path[-2:])


def stack_specs(specs: Sequence[Mapping[str, Any]]):
    """Stacks specs on a new leading axis (for ``jax.vmap`` over settings).

    Args:
      specs: specs of the same structure.

    Returns:
      One spec whose leaves have a leading axis of ``len(specs)``.
    """
    return jax.tree.map(lambda *xs: jnp.stack(xs), *specs)
