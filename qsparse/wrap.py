"""Rule-based wrapping of unmodified Flax (Linen) models with quantization and block sparsity.

A :class:`Rule` names layers by a regular expression on the module path (``"Dense_0"``,
``"Block_1/Conv_0"``; ``re.fullmatch``) and gives them weight bits, activation bits, a block
shape and a compression ratio. :func:`make_plan` traces the model once (``jax.eval_shape``,
no compute), gives every ``nn.Dense`` / ``nn.Conv`` layer the first rule that matches it and
raises if a rule matches nothing. The :class:`Plan` then

* holds the *static* part (which layers, block shapes, quantizer options, shapes), and
* makes the *value* part, a ``spec`` pytree ``{layer: {"w_bits", "a_bits", "compression"}}``
  of float32 arrays, so one compiled program serves every precision and ``jax.vmap`` over
  stacked specs trains a sweep.

The weight transform is mask-then-quantize on each kernel, applied to the parameter tree
before ``model.apply``. The activation quantizer is applied to the layer's output through
``nn.intercept_methods``; it clips to ``[0, clip]``, so it stands in for the ReLU that the
model applies next (ReLU is the identity on its output). Give ``a_bits`` only to layers that
are followed by a ReLU; leave the logits layer unquantized (``quantize_output=False``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qsparse import memory as mem
from qsparse import quant, sparsity

LAYER_TYPES = (nn.Dense, nn.Conv)
INT_MATMUL_MAX_BITS = 8  # integer codes of up to 8 bits are exact in bfloat16
MODEL_INPUT = "<input>"  # LayerPlan.int_input of a first layer fed the model's own input


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Settings for the layers whose module path matches ``pattern``.

    Attributes:
      pattern: regular expression, full match on the module path (``"Dense_0"``, ``".*"``).
      w_bits: weight bits (1..32; 32 = float); the spec's initial value.
      a_bits: output activation bits (1..32); used when ``quantize_output``.
      compression: block compression ratio >= 1 (spec's initial value); needs ``block_shape``.
      block_shape: ``(bm, bn)`` on the kernel's matrix view, or ``None`` for no block sparsity.
      per_channel: one weight scale per output channel.
      scale_mode: ``"max"``, ``"mean"`` or ``"learned"`` (LSQ step size, a trainable parameter).
      zero_level: weight level set holds zero (2-bit = ternary); see :mod:`qsparse.quant`.
      quantize_output: quantize this layer's output activation (replaces the following ReLU);
        ``None`` (default): every layer but the last one executed (the logits).
      act_clip: initial activation clip level.
      learn_clip: train the clip (PACT); otherwise it stays at ``act_clip``.
      int_matmul: run the layer's forward matmul on the integer codes of its weights and of
        its input (:func:`qsparse.quant.int_matmul`: bfloat16 with float32 sums, exact). For a
        ``nn.Dense`` whose input is the previous layer's quantized output through a ReLU
        (:func:`make_plan` checks it), with a learned step; its ``w_bits`` and the previous
        layer's ``a_bits`` must stay at most 8 in every setting (:meth:`Plan.init_spec`
        refuses more).
      bf16_grads: with ``int_matmul``, run the layer's two backward matmuls in bfloat16 too,
        on the integer codes and the output gradient rounded to bfloat16 (not exact: 8
        significant bits, as TPUs' default matmul precision), with float32 sums; about 0.6
        of the float32 matmuls' time on CPUs with bfloat16 units. Default: float32 gradients.
    """

    pattern: str
    w_bits: float = 32
    a_bits: float = 32
    compression: float = 1.0
    block_shape: tuple[int, int] | None = None
    per_channel: bool = False
    scale_mode: str = "max"
    zero_level: bool = True
    quantize_output: bool | None = None
    act_clip: float = 4.0
    learn_clip: bool = False
    int_matmul: bool = False
    bf16_grads: bool = False

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(
                f"pattern={self.pattern!r} is not a valid regular expression: {e}"
            ) from None
        quant.check_bits(self.w_bits, "w_bits")
        quant.check_bits(self.a_bits, "a_bits")
        sparsity.check_compression(self.compression)
        if self.scale_mode not in quant.SCALE_MODES:
            raise ValueError(
                f"scale_mode={self.scale_mode!r} is not allowed: use one of {quant.SCALE_MODES}"
            )
        if self.act_clip <= 0:
            raise ValueError(f"act_clip={self.act_clip} is not allowed: use a value > 0")
        if self.int_matmul and self.scale_mode != "learned":
            raise ValueError(
                f"int_matmul with scale_mode={self.scale_mode!r} is not allowed: it needs"
                f" scale_mode='learned' (rule {self.pattern!r})"
            )
        if self.int_matmul and self.w_bits > INT_MATMUL_MAX_BITS:
            raise ValueError(
                f"int_matmul with w_bits={self.w_bits} is not allowed: use w_bits <="
                f" {INT_MATMUL_MAX_BITS} (rule {self.pattern!r})"
            )
        if self.bf16_grads and not self.int_matmul:
            raise ValueError(
                "bf16_grads=True with int_matmul=False is not allowed: the bfloat16 backward"
                " multiplies the integer codes, so it needs int_matmul=True"
                f" (rule {self.pattern!r})"
            )
        if self.block_shape is None and self.compression != 1:
            raise ValueError(
                f"compression={self.compression} needs block_shape (rule {self.pattern!r})"
            )


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static facts about one wrapped layer.

    Attributes:
      name: module path (``"Dense_0"``).
      param_path: path of its parameters in the params tree (``("Dense_0",)``).
      rule: the matching :class:`Rule`.
      kernel_shape: kernel shape.
      bias_size: number of biases (0 if none).
      in_size: values in the layer's input (batch 1).
      out_size: values in the layer's output (batch 1).
      order: execution order.
      act_quantized: whether the output goes through the activation quantizer.
      int_input: with ``int_matmul``, the layer whose quantized output is this layer's input,
        or :data:`MODEL_INPUT` for a first layer fed the model's input on a grid (``input_bits``).
    """

    name: str
    param_path: tuple[str, ...]
    rule: Rule
    kernel_shape: tuple[int, ...]
    bias_size: int
    in_size: int
    out_size: int
    order: int
    act_quantized: bool
    int_input: str | None = None

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


def _concrete(x) -> float | None:
    """``x`` as a Python float, or None when it is traced (inside ``jit`` or ``vmap``)."""
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    """Returns a copy of nested dict ``tree`` with ``path`` set to ``value``."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which layers are quantized / sparsified, and how. Static; hashable by identity.

    Attributes:
      layers: layer name -> :class:`LayerPlan`, in execution order.
      input_size: values in one input example.
      input_bits: the model's input holds ``k / (2**input_bits - 1)`` for integers ``k`` (8 for
        uint8 data through :func:`qsparse.data.normalize`), or None: unknown.
    """

    layers: dict[str, LayerPlan]
    input_size: int
    input_bits: int | None = None

    # ---- values ---------------------------------------------------------------------------
    def init_spec(self, **overrides) -> dict:
        """The value part of the settings, from the rules.

        Args:
          **overrides: ``w_bits=``, ``a_bits=``, ``compression=`` to set on every layer whose
            rule allows it (compression only on block-sparse layers, a_bits only on layers
            with a quantized output).

        Returns:
          ``{layer: {"w_bits", "a_bits", "compression"}}`` of float32 scalars.
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
                if k == "a_bits" and not lp.act_quantized:
                    continue
                vals[k] = v
            quant.check_bits(vals["w_bits"], f"{name}.w_bits")
            quant.check_bits(vals["a_bits"], f"{name}.a_bits")
            sparsity.check_compression(vals["compression"], f"{name}.compression")
            spec[name] = {k: jnp.asarray(v, jnp.float32) for k, v in vals.items()}
        for name, lp in self.layers.items():
            if lp.int_input is None:
                continue
            checks = [(name, "w_bits")]
            if lp.int_input != MODEL_INPUT:
                checks.append((lp.int_input, "a_bits"))
            for layer, key in checks:
                value = _concrete(spec[layer][key])
                if value is not None and value > INT_MATMUL_MAX_BITS:
                    raise ValueError(
                        f"{layer}.{key}={value:g} is not allowed: {name} runs int_matmul on it;"
                        f" use <= {INT_MATMUL_MAX_BITS}"
                    )
        return spec

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
                w = _get(params, lp.param_path)["kernel"]
                entry["w_step"] = quant.weight_step(
                    w,
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

    # ---- transforms -----------------------------------------------------------------------
    def transform_params(self, params, qparams, spec, masks=None):
        """Mask-then-quantize every wrapped kernel.

        Args:
          params: the model's ``params`` collection.
          qparams: from :meth:`init_qparams`.
          spec: the spec.
          masks: optional ``{layer: mask}`` of kernel-shaped 0/1 arrays.

        Returns:
          A params tree with the kernels replaced by their fake-quantized values.
        """
        out = params
        for name, lp in self.layers.items():
            r = lp.rule
            w = _get(params, lp.param_path)["kernel"]
            if masks is not None and name in masks:
                w = w * masks[name]
            step = qparams.get(name, {}).get("w_step")
            w = quant.quantize_weight(
                w,
                spec[name]["w_bits"],
                per_channel=r.per_channel,
                scale_mode=r.scale_mode,
                step=step,
                zero_level=r.zero_level,
            )
            layer = dict(_get(params, lp.param_path))
            layer["kernel"] = w
            out = _set(out, lp.param_path, layer)
        return out

    def apply(self, model: nn.Module, params, qparams, spec, x, *, masks=None, **kwargs):
        """Runs ``model`` with quantized / sparsified kernels and quantized activations.

        Args:
          model: the unmodified Linen module.
          params: its ``params`` collection.
          qparams: from :meth:`init_qparams`.
          spec: the spec.
          x: the input batch.
          masks: optional ``{layer: mask}`` applied before quantization.
          **kwargs: passed to ``model.apply``.

        Returns:
          ``model.apply``'s output.
        """
        qp = self.transform_params(params, qparams, spec, masks)
        layers = self.layers

        def interceptor(next_fun, args, kw, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, LAYER_TYPES):
                return next_fun(*args, **kw)
            lp = layers.get(module_path(mod))
            if lp is not None and lp.int_input is not None:
                src = lp.int_input
                layer = _get(qp, lp.param_path)
                if src == MODEL_INPUT:  # k / (2**bits - 1): a quantizer's grid with clip 1
                    a_bits, clip = self.input_bits, 1.0
                else:
                    a_bits, clip = spec[src]["a_bits"], qparams[src]["a_clip"]
                y = quant.int_matmul(
                    args[0],
                    layer["kernel"],
                    a_bits,
                    clip,
                    qparams[lp.name]["w_step"],
                    bf16_grads=lp.rule.bf16_grads,
                )
                if "bias" in layer:
                    y = y + layer["bias"]
            else:
                y = next_fun(*args, **kw)
            if lp is None or not lp.act_quantized:
                return y
            clip = qparams[lp.name]["a_clip"]
            if not lp.rule.learn_clip:
                clip = jax.lax.stop_gradient(clip)
            return quant.quantize_activation(y, spec[lp.name]["a_bits"], clip)

        with nn.intercept_methods(interceptor):
            return model.apply({"params": qp}, x, **kwargs)

    # ---- sparsity -------------------------------------------------------------------------
    def block_shapes(self, prefix: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
        """Block shapes keyed by the ``/``-joined path of each sparsified kernel.

        Args:
          prefix: path of the params collection inside the trainable tree (e.g. ``("params",)``).

        Returns:
          ``{"params/Dense_0/kernel": (8, 8), ...}`` for the layers with a block shape.
        """
        return {
            "/".join((*prefix, *lp.param_path, "kernel")): tuple(lp.rule.block_shape)
            for lp in self.layers.values()
            if lp.rule.block_shape is not None
        }

    def kernel_paths(self, prefix: tuple[str, ...] = ()) -> dict[str, str]:
        """Layer name -> ``/``-joined kernel path (as in :meth:`block_shapes`)."""
        return {
            name: "/".join((*prefix, *lp.param_path, "kernel")) for name, lp in self.layers.items()
        }

    def compressions(self, spec, prefix: tuple[str, ...] = ()) -> dict:
        """Per-kernel compression values keyed like :meth:`block_shapes`."""
        paths = self.kernel_paths(prefix)
        return {
            paths[n]: spec[n]["compression"]
            for n, lp in self.layers.items()
            if lp.rule.block_shape is not None
        }

    # ---- memory ---------------------------------------------------------------------------
    def memory(self, spec, params=None, *, input_bits: int = 8) -> dict:
        """The memory model for this plan and spec (see :mod:`qsparse.memory`).

        Args:
          spec: the spec.
          params: optional params (masked); kept blocks are then the blocks of each kernel that
            are not entirely zero (what an export stores). Without params the target counts
            ``ceil(n_blocks / compression)`` are used.
          input_bits: bits per input value.

        Returns:
          :func:`qsparse.memory.summarize`'s dict plus ``"layers"`` (per-layer breakdown) and
          ``"block_sparsity"`` (fraction of zero blocks over all sparsified layers).
        """
        per_layer = {}
        zero_blocks, all_blocks = 0, 0
        for name, lp in self.layers.items():
            grid = lp.block_grid
            kept = None
            if grid is not None:
                n_blocks = grid[0] * grid[1]
                if params is None:
                    kept = sparsity.kept_blocks(n_blocks, spec[name]["compression"])
                else:
                    w = _get(params, lp.param_path)["kernel"]
                    norms = sparsity.block_norms(w, lp.rule.block_shape)
                    kept = jnp.sum(norms > 0).astype(jnp.int32)
                zero_blocks = zero_blocks + (n_blocks - kept)
                all_blocks += n_blocks
            per_layer[name] = mem.layer_memory(
                lp.kernel_shape,
                lp.bias_size,
                w_bits=spec[name]["w_bits"],
                kept=kept,
                block_shape=lp.rule.block_shape,
                per_channel=lp.rule.per_channel,
                a_bits=spec[name]["a_bits"],
                act_quantized=lp.act_quantized,
            )
        ordered = sorted(self.layers.values(), key=lambda lp: lp.order)
        acts = mem.activation_memory(
            self.input_size,
            [lp.out_size for lp in ordered],
            [spec[lp.name]["a_bits"] if lp.act_quantized else 32 for lp in ordered],
            input_bits=input_bits,
        )
        out = mem.summarize(per_layer, acts)
        out["layers"] = per_layer
        out["block_sparsity"] = jnp.asarray(zero_blocks, jnp.float32) / max(all_blocks, 1)
        return out


def make_plan(
    model: nn.Module,
    rules: Sequence[Rule],
    sample_input,
    *,
    input_bits: int | None = None,
    **apply_kwargs,
) -> Plan:
    """Traces ``model`` once (shapes only) and assigns each Dense/Conv layer its first rule.

    Layers no rule matches stay full precision and dense. Block shapes are checked here.

    Args:
      model: an unmodified Linen module.
      rules: rules, first match wins.
      sample_input: an input batch (or ``jax.ShapeDtypeStruct``); batch size 1 is best.
      input_bits: the model's input values are ``k / (2**input_bits - 1)`` for integers ``k``
        (8 for uint8 data through :func:`qsparse.data.normalize`): lets the first layer take
        ``int_matmul``. None (default): no such promise.
      **apply_kwargs: passed to ``model.init`` / ``model.apply``.

    Returns:
      The :class:`Plan`.

    Raises:
      ValueError: a rule matches no layer, or a block shape does not divide its layer.
    """
    rules = list(rules)
    seen: list[tuple[str, tuple, int, int, tuple]] = []

    def recorder(next_fun, args, kw, context):
        y = next_fun(*args, **kw)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, LAYER_TYPES):
            x = args[0]
            seen.append(
                (
                    module_path(mod),
                    tuple(mod.path),
                    int(np.prod(x.shape[1:])),
                    int(np.prod(y.shape[1:])),
                )
            )
        return y

    def trace(x):
        variables = model.init(jax.random.key(0), x, **apply_kwargs)
        with nn.intercept_methods(recorder):
            model.apply(variables, x, **apply_kwargs)
        return variables

    shapes = jax.eval_shape(trace, sample_input)
    params = shapes["params"]
    used = [False] * len(rules)
    layers: dict[str, LayerPlan] = {}
    last = seen[-1][0] if seen else None
    for order, (name, path, in_size, out_size) in enumerate(seen):
        if name in layers:
            continue
        # Unmatched layers stay float32 and dense, but their memory is still counted.
        rule = Rule(pattern=re.escape(name), quantize_output=False)
        for i, r in enumerate(rules):
            if re.fullmatch(r.pattern, name):
                used[i] = True
                rule = r
                break
        p = _get(params, path)
        kshape = tuple(p["kernel"].shape)
        bias = int(np.prod(p["bias"].shape)) if "bias" in p else 0
        if rule.block_shape is not None:
            sparsity.check_block_shape(kshape, rule.block_shape, f"{name}.block_shape")
        act_q = name != last if rule.quantize_output is None else bool(rule.quantize_output)
        layers[name] = LayerPlan(name, path, rule, kshape, bias, in_size, out_size, order, act_q)
    for i, r in enumerate(rules):
        if not used[i]:
            raise ValueError(
                f"rule pattern={r.pattern!r} matches no layer: layers are {[s[0] for s in seen]}"
            )
    if input_bits is not None and not 1 <= input_bits <= INT_MATMUL_MAX_BITS:
        raise ValueError(
            f"input_bits={input_bits} is not allowed: use 1..{INT_MATMUL_MAX_BITS} or None"
        )
    wanted = [lp.name for lp in layers.values() if lp.rule.int_matmul]
    if wanted:
        calls = [s[0] for s in seen]
        x, record = _concrete_run(model, sample_input, apply_kwargs)
        for name in wanted:
            src = _int_input(name, calls, layers, input_bits, x, record)
            layers[name] = dataclasses.replace(layers[name], int_input=src)
    in_size = int(np.prod(sample_input.shape[1:]))
    return Plan(layers=layers, input_size=in_size, input_bits=input_bits)


def _concrete_run(model, sample_input, apply_kwargs):
    """The model run once on a random batch of 2: ``(x, {layer: (module, input, output)})``."""
    record = {}

    def recorder(next_fun, args, kw, context):
        y = next_fun(*args, **kw)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, LAYER_TYPES):
            record[module_path(mod)] = (mod, args[0], y)
        return y

    shape = (2, *tuple(sample_input.shape)[1:])
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    variables = model.init(jax.random.key(0), x, **apply_kwargs)
    with nn.intercept_methods(recorder):
        model.apply(variables, x, **apply_kwargs)
    return x, record


def _int_input(name, calls, layers, input_bits, x, record) -> str:
    """The layer whose quantized output feeds ``name``, checked for ``int_matmul``.

    The input must be the previous layer's output through a ReLU (the activation quantizer's
    output passes a ReLU unchanged), or for the first layer the model's own input (on the grid
    ``input_bits`` promises), which a concrete run on random data checks exactly: any other
    operation in between (a residual sum, a normalization, average pooling) changes the
    values, and the codes would not come back.

    Args:
      name: the layer.
      calls: layer names in call order.
      layers: the plan's layers so far.
      input_bits: :func:`make_plan`'s promise about the model's input, or None.
      x: the random input of :func:`_concrete_run`.
      record: its record of each layer's module, input and output.

    Returns:
      The feeding layer's name, or :data:`MODEL_INPUT`.

    Raises:
      ValueError: one line naming the layer and what ``int_matmul`` needs.
    """
    need = "int_matmul needs a Dense layer whose input is the previous layer's quantized output"
    at = calls.index(name)
    if calls.count(name) > 1:
        raise ValueError(
            f"int_matmul on {name} is not allowed: it is called more than once; {need}"
        )
    if at == 0 and input_bits is None:
        raise ValueError(
            f"int_matmul on {name} is not allowed: it is the first layer and make_plan has no"
            f" input_bits; {need}, or the model's input with make_plan(..., input_bits=8) for"
            " uint8 data / 255"
        )
    src = layers[calls[at - 1]] if at else None
    if src is not None and (not src.act_quantized or src.rule.a_bits > INT_MATMUL_MAX_BITS):
        raise ValueError(
            f"int_matmul on {name} is not allowed: its input layer {src.name} has"
            f" a_bits={src.rule.a_bits:g}, quantize_output={src.act_quantized};"
            f" {need} with a_bits <= {INT_MATMUL_MAX_BITS}"
        )
    mod, inp, _ = record[name]
    default = mod.dtype in (None, jnp.float32) and mod.precision is None
    if type(mod) is not nn.Dense or not default or mod.dot_general is not None:
        raise ValueError(
            f"int_matmul on {name} is not allowed: it is a {type(mod).__name__} with"
            f" dtype={mod.dtype}, precision={mod.precision}; {need} (plain nn.Dense)"
        )
    out = jax.nn.relu(record[src.name][2]) if src is not None else x
    if out.size != inp.size or not np.array_equal(np.asarray(out).reshape(inp.shape), inp):
        what = f"the ReLU of {src.name}'s output" if src is not None else "the model's input"
        raise ValueError(
            f"int_matmul on {name} is not allowed: its input is not {what} (the model"
            f" computes something else in between); {need}"
        )
    return src.name if src is not None else MODEL_INPUT


def stack_specs(specs: Sequence[Mapping[str, Any]]):
    """Stacks specs on a new leading axis (for ``jax.vmap`` over settings).

    Args:
      specs: specs of the same structure.

    Returns:
      One spec whose leaves have a leading axis of ``len(specs)``.
    """
    return jax.tree.map(lambda *xs: jnp.stack(xs), *specs)
