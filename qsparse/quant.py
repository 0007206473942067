"""k-bit quantizers for weights and activations with straight-through gradients.

Every function here is plain `jnp`: bit widths are *values* (Python numbers or traced
arrays), never static arguments, so one compiled program serves every precision and
`jax.vmap` over an array of bit widths works. ``bits >= 32`` means full precision.

Level sets (symmetric, ``zero_level=True``, the default):

* ``bits == 1``: binary ``{-a, +a}`` with ``a`` the scale (max-abs or mean-abs or learned).
* ``bits >= 2``: the ``2 * n + 1`` integers ``-n .. n`` times a step, ``n = 2**(bits-1) - 1``.
  Zero is a level, so 2-bit weights are ternary ``{-s, 0, +s}`` (one of the four codes unused);
  this keeps pruned weights representable and suits block sparsity.
* ``zero_level=False`` gives the mid-rise set ``(-2**(bits-1) + 1/2 .. 2**(bits-1) - 1/2) * s``,
  all ``2**bits`` codes used, no zero.

Exact zeros (pruned weights) map to zero at every bit width, also for 1-bit and mid-rise sets
(a pruned block is not stored, so the deployed model computes with zeros there).

Activations: unsigned ``2**bits`` levels ``0, c/(2**bits-1), ..., c`` on ``[0, c]`` where the
input cannot be negative (after a ReLU), signed symmetric levels on ``[-c, c]`` otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

FULL_PRECISION = 32
ALLOWED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)  # 16 is stored as 16-bit codes; 32 = float
SCALE_MODES = ("max", "mean", "learned")
# The weight gradient outside the quantizer's range: "clipped" (zero there, as LSQ) or
# "identity" (passed on, so a weight beyond the range is not frozen: it can come back in).
WEIGHT_GRADS = ("clipped", "identity")


def check_bits(bits, name: str = "bits") -> None:
    """Validates concrete bit widths; traced values pass through unchecked.

    Args:
      bits: an int, float or array of bit widths.
      name: the argument name used in the error message.

    Raises:
      ValueError: a bit width is not one of :data:`ALLOWED_BITS`.
    """
    if isinstance(bits, jax.core.Tracer):
        return
    try:
        vals = [float(v) for v in np.ravel(np.asarray(bits, dtype=np.float64)).tolist()]
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}={bits!r} is not allowed: bit widths are integers in {ALLOWED_BITS}"
            " (32 = full precision)"
        ) from None
    for v in vals:
        if not (np.isfinite(v) and v == int(v) and int(v) in ALLOWED_BITS):
            raise ValueError(
                f"{name}={v:g} is not allowed: bit widths are integers in {ALLOWED_BITS}"
                " (32 = full precision)"
            )


@jax.custom_vjp
def round_ste(x):
    """Rounds to the nearest integer with a straight-through (identity) gradient.

    Args:
      x: array.

    Returns:
      ``jnp.round(x)``; the backward pass passes the cotangent unchanged.
    """
    return jnp.round(x)


def _round_fwd(x):
    return jnp.round(x), None


def _round_bwd(_, g):
    return (g,)


round_ste.defvjp(_round_fwd, _round_bwd)


BIAS_BITS = (8, 32)  # biases of covered layers: int8 codes and one float32 scale, or float32


def check_bias_bits(bits, name: str = "bias_bits") -> None:
    """Validates a bias bit width.

    Args:
      bits: the bit width.
      name: the argument name used in the error message.

    Raises:
      ValueError: ``bits`` is not one of :data:`BIAS_BITS`.
    """
    if not (isinstance(bits, int | float | np.integer) and bits in BIAS_BITS):
        raise ValueError(
            f"{name}={bits!r} is not allowed: use one of {BIAS_BITS} (8: int8 codes with one"
            " float32 scale per layer, 32: float32)"
        )


def bias_scale(b, bits: int):
    """The scale of a bias vector's symmetric ``bits``-bit codes: ``max|b| / (2^(bits-1) - 1)``
    (1 where ``b`` is all zero).

    Args:
      b: the biases (float32).
      bits: bit width (static, < 32).

    Returns:
      The float32 scale, a scalar.
    """
    s = jnp.max(jnp.abs(b)) / (2 ** (bits - 1) - 1)
    return jnp.where(s > 0, s, 1.0).astype(jnp.float32)


def quantize_bias(b, bits: int):
    """Fake-quantizes biases to ``bits``-bit codes times one scale (:func:`bias_scale`), with a
    straight-through gradient; 32 bits: unchanged.

    Args:
      b: the biases.
      bits: bit width (static; :data:`BIAS_BITS`).

    Returns:
      ``round(b / s) * s`` in float32 (exactly the stored codes times the stored scale).
    """
    if bits >= FULL_PRECISION:
        return b
    s = jax.lax.stop_gradient(bias_scale(b, bits))
    return round_ste(b / s) * s


@jax.custom_vjp
def sign_ste(x):
    """``+1`` for ``x >= 0``, ``-1`` otherwise, with a straight-through (identity) gradient.

    Args:
      x: array (clip it first to limit where the gradient passes).

    Returns:
      ``where(x >= 0, 1, -1)`` in ``x``'s dtype; exactly ``±1``.
    """
    return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def _sign_fwd(x):
    return sign_ste(x), None


sign_ste.defvjp(_sign_fwd, _round_bwd)


def weight_levels(bits, zero_level: bool = True):
    """Largest integer code magnitude ``n`` for a k-bit symmetric quantizer.

    Args:
      bits: bit width (value, may be traced).
      zero_level: whether zero is a level (``n = 2**(b-1) - 1``) or mid-rise (``2**(b-1) - 1/2``).

    Returns:
      ``n`` as a float array: codes lie in ``[-n, n]``.
    """
    bits = jnp.asarray(bits, jnp.float32)
    half = jnp.exp2(bits - 1.0)
    return half - 1.0 if zero_level else half - 0.5


def weight_step(
    w, bits, *, per_channel: bool = False, scale_mode: str = "max", zero_level: bool = True
):
    """The quantization step (scale) a weight tensor gets from its statistics.

    ``max``: ``max|w| / n`` (no weight clipped). ``mean``: ``2 * mean|w| / sqrt(n)`` over the
    non-zero weights (the LSQ initialisation; clips outliers). For ``bits == 1`` the step is
    the binary magnitude ``mean|w|`` (``max|w|`` for ``max``). Per-channel statistics reduce
    over all axes but the last.

    Args:
      w: weight array.
      bits: bit width (value).
      per_channel: one step per output channel (last axis) instead of one per tensor.
      scale_mode: ``"max"`` or ``"mean"``.
      zero_level: level set choice, as in :func:`quantize_weight`.

    Returns:
      The step, shape ``()`` or ``(w.shape[-1],)``; stop-gradient applied.
    """
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    absw = jnp.abs(w)
    n = weight_levels(bits, zero_level)
    if scale_mode == "max":
        m = jnp.max(absw, axis=axes)
        step = jnp.where(jnp.asarray(bits) <= 1, m, m / jnp.maximum(n, 0.5))
    elif scale_mode == "mean":
        # Mean over the non-zero weights, so pruned blocks do not shrink the step.
        nz = jnp.maximum(jnp.sum((absw > 0).astype(w.dtype), axis=axes), 1.0)
        m = jnp.sum(absw, axis=axes) / nz
        step = jnp.where(jnp.asarray(bits) <= 1, m, 2.0 * m / jnp.sqrt(jnp.maximum(n, 0.5)))
    else:
        raise ValueError(f"scale_mode={scale_mode!r} is not allowed: use 'max' or 'mean' here")
    return jax.lax.stop_gradient(jnp.maximum(step, 1e-12))


def quantize_weight(
    w,
    bits,
    *,
    per_channel: bool = False,
    scale_mode: str = "max",
    step=None,
    zero_level: bool = True,
    weight_grad: str = "clipped",
):
    """Symmetric uniform k-bit weight quantizer (fake-quant) with straight-through gradients.

    ``q = clip(round(w / s), -n, n) * s``; rounding is straight-through and the clip has zero
    gradient outside ``[-n s, n s]``. With a learned ``step`` (LSQ-style) the gradient reaches
    ``s`` too. ``bits == 1`` is binary ``sign(w) * s``; ``bits >= 32`` returns ``w`` unchanged.
    The level set holds zero by default (2-bit = ternary); see the module docstring.

    Args:
      w: weight array (kernel).
      bits: bit width, a value (int, float or traced array), 1..32.
      per_channel: one scale per output channel (last axis).
      scale_mode: ``"max"``, ``"mean"`` (statistics of ``w``) or ``"learned"`` (use ``step``).
      step: the learned step size, shape ``()`` or ``(w.shape[-1],)``; required for ``"learned"``.
      zero_level: ``True`` for the level set with zero, ``False`` for mid-rise ``2**bits`` levels.
      weight_grad: ``"clipped"``: the weight gradient is zero outside ``[-n s, n s]`` (LSQ);
        ``"identity"``: it passes there too, so weights beyond the range keep training
        (pruned weights get none either way). The forward pass is the same.

    Returns:
      The fake-quantized weights, same shape and dtype as ``w``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(0), (16, 8))
      >>> q = jax.vmap(lambda b: quantize_weight(w, b))(jnp.array([1, 2, 8, 32]))
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode={scale_mode!r} is not allowed: use one of {SCALE_MODES}")
    check_weight_grad(weight_grad)
    check_bits(bits)
    if scale_mode == "learned" and step is None:
        raise ValueError("step=None is not allowed with scale_mode='learned': pass the step")
    s = layer_step(
        w, bits, step, per_channel=per_channel, scale_mode=scale_mode, zero_level=zero_level
    )
    return _fake_quant(w, s, jnp.asarray(bits, jnp.float32), zero_level, weight_grad == "clipped")


def layer_step(w, bits, step, *, per_channel: bool, scale_mode: str, zero_level: bool):
    """The step a layer quantizes with: the learned ``step`` (kept positive), else from ``w``.

    Args:
      w: weight array.
      bits: bit width (value).
      step: the learned step (``scale_mode="learned"``), else unused.
      per_channel, scale_mode, zero_level: as in :func:`quantize_weight`.

    Returns:
      The step.
    """
    if scale_mode == "learned":
        return jnp.maximum(jnp.abs(step), 1e-8)
    return weight_step(
        w, bits, per_channel=per_channel, scale_mode=scale_mode, zero_level=zero_level
    )


def check_weight_grad(weight_grad, name: str = "weight_grad") -> None:
    """Validates a weight-gradient mode (one of :data:`WEIGHT_GRADS`).

    Args:
      weight_grad: the mode.
      name: argument name for the error message.

    Raises:
      ValueError: another value.
    """
    if weight_grad not in WEIGHT_GRADS:
        raise ValueError(
            f"{name}={weight_grad!r} is not allowed: use one of {WEIGHT_GRADS} (the weight "
            "gradient outside the quantizer's range: zero, or passed on)"
        )


def level_distance(w, bits, step, zero_level: bool = True):
    """Squared distances, in steps, of the live weights to their levels (oscillation dampening).

    Nagel et al. (2022, "Overcoming oscillations in quantization-aware training"): a penalty on
    ``(code(w / s) - clip(w / s))**2`` with the code and the step held constant pulls each
    latent weight towards the level it is quantized to, so weights stop flipping between two
    levels from step to step. Pruned (exactly zero) weights and full-precision layers add 0.

    Args:
      w: weight array.
      bits: bit width (value).
      step: the quantization step, shape ``()`` or ``(w.shape[-1],)``.
      zero_level: the level set, as in :func:`quantize_weight`.

    Returns:
      ``(sum, count)``: the summed squared distances and the number of live weights.
    """
    bits = jnp.asarray(bits, jnp.float32)
    x = w / jax.lax.stop_gradient(step)
    lim = jnp.where(bits <= 1, 1.0, weight_levels(bits, zero_level))
    code = jax.lax.stop_gradient(_codes(x, bits, zero_level))
    live = (w != 0) & (bits < FULL_PRECISION)
    d = jnp.where(live, jnp.square(code - jnp.clip(x, -lim, lim)), 0.0)
    return jnp.sum(d), jnp.sum(live.astype(w.dtype))


def _level(x, zero_level: bool):
    """The nearest level to ``x`` (already in range): an integer, or mid-rise a half-integer."""
    return jnp.round(x) if zero_level else jnp.round(x - 0.5) + 0.5


def _codes(x, bits, zero_level: bool):
    """Integer codes (as floats) of ``x = w / s``.

    Returns:
      ``codes`` in ``[-n, n]`` (binary ``±1``).
    """
    n = weight_levels(bits, zero_level)
    binary = bits <= 1
    multi = _level(jnp.clip(x, -n, n), zero_level)
    return jnp.where(binary, jnp.where(x >= 0, 1.0, -1.0), multi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(w, s, bits, zero_level: bool, clipped: bool = True):
    """``codes(w / s) * s`` with exact zeros kept and ``bits >= 32`` passing ``w`` through.

    A hand-written VJP: differentiating the forward expression would keep its
    intermediates alive and run several full-size elementwise passes per kernel; this one
    recomputes the codes from ``w`` in one pass. Gradients (LSQ, Esser et al. 2020):
    ``dq/dw = 1`` inside the range, else 0; ``dq/ds = code - w/s`` inside the range, else the
    clipped code; both 0 for exact zeros (pruned weights stay pruned) and ``dq/dw = 1``,
    ``dq/ds = 0`` at full precision. ``clipped=False``: ``dq/dw = 1`` outside the range too.
    """
    codes = _codes(w / s, bits, zero_level)
    # Exact zeros (pruned weights) stay zero at every bit width: a pruned block is not stored,
    # so the deployed model computes with zeros there, and so must training.
    q = (jnp.where(w == 0, 0.0, codes) * s).astype(w.dtype)
    return jnp.where(bits >= FULL_PRECISION, w, q)


def _fake_quant_fwd(w, s, bits, zero_level, clipped):
    return _fake_quant(w, s, bits, zero_level, clipped), (w, s, bits)


def _fake_quant_bwd(zero_level, clipped, res, g):
    w, s, bits = res
    # Not w / s: an expression of its own, so XLA does not share one full-size w / s with the
    # forward pass (written out and read back) but recomputes it inside each loop.
    x = w * (1.0 / s)
    lim = jnp.where(bits <= 1, 1.0, weight_levels(bits, zero_level))
    inside = jnp.abs(x) <= lim
    full = bits >= FULL_PRECISION
    live = (w != 0) & ~full
    code = _codes(x, bits, zero_level)
    dw = jnp.where(full | ((live & inside) if clipped else live), g, 0.0).astype(w.dtype)
    # s is one step, or one per output channel (last axis). The product sits inside the
    # select, so XLA:CPU writes out one array of terms for the sum, not g and a factor.
    axes = tuple(range(w.ndim - 1)) if s.ndim else None
    terms = jnp.where(live, g * jnp.where(inside, code - x, code), 0.0)
    ds = jnp.sum(terms, axis=axes).reshape(s.shape).astype(s.dtype)
    return _after(dw, ds), ds, jnp.zeros_like(bits)


def _after(x, dep):
    """``x`` times an exact 1 computed from ``dep``: whatever reads ``x`` then runs after
    ``dep``.

    The weight gradient is released after the step gradient, the last pass that reads the
    weights, so the optimizer can update them in place; otherwise XLA copies every kernel on
    every step.
    """
    return (x * (1.0 + 0.0 * dep)).astype(x.dtype)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def weight_codes(w, bits, step, zero_level: bool = True):
    """Integer codes of already-quantized weights (for export).

    Args:
      w: weights, normally the output of :func:`quantize_weight`.
      bits: concrete bit width (< 32).
      step: the step the weights were quantized with.
      zero_level: the level set used.

    Returns:
      Signed integer codes as int32: ``w / step`` rounded (binary: ``-1`` or ``+1``; mid-rise:
      ``floor(w / step)``, so ``-n-1/2 .. n-1/2`` maps to ``-2**(b-1) .. 2**(b-1)-1``).
    """
    x = w / step
    if bits <= 1:
        return jnp.where(x >= 0, 1, -1).astype(jnp.int32)
    if zero_level:
        return jnp.round(x).astype(jnp.int32)
    return jnp.floor(x).astype(jnp.int32)


def act_levels(bits, signed: bool = False):
    """The largest activation code: ``2**bits - 1`` unsigned, ``2**(bits-1) - 1`` signed.

    A 1-bit signed quantizer is binary ``{-c, +c}`` (code ``+-1``).

    Args:
      bits: bit width (value, may be traced).
      signed: the symmetric signed quantizer.

    Returns:
      The code magnitude as a float array.
    """
    bits = jnp.asarray(bits, jnp.float32)
    if not signed:
        return jnp.exp2(bits) - 1.0
    return jnp.maximum(jnp.exp2(bits - 1.0) - 1.0, 1.0)


def quantize_activation(x, bits, clip, *, signed: bool = False):
    """k-bit activation quantizer with straight-through gradients.

    Unsigned (default): ``2**bits`` levels ``0, d, ..., c`` on ``[0, c]``, ``d = c / (2**bits
    - 1)``, for inputs that cannot be negative (after a ReLU). Signed: the symmetric levels
    ``-n d .. n d`` on ``[-c, c]`` with ``n = 2**(bits-1) - 1`` and ``d = c / n`` (1 bit:
    binary ``{-c, +c}``). ``q = round(clip(x) / d) * d``; rounding is straight-through and the
    gradient is zero outside the range. A learned (PACT-style) ``clip`` receives the gradient
    of the clipped part. ``bits >= 32`` returns ``x`` unchanged.

    Args:
      x: activation array.
      bits: bit width, a value.
      clip: the clipping level ``c > 0`` (fixed value or trainable parameter).
      signed: the symmetric signed level set (static).

    Returns:
      The fake-quantized activations, same shape and dtype as ``x``.
    """
    check_bits(bits)
    c = jnp.maximum(jnp.abs(jnp.asarray(clip, x.dtype)), 1e-6)
    return _fake_quant_act(x, c, jnp.asarray(bits, jnp.float32), bool(signed))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fake_quant_act(x, c, bits, signed):
    """``round(clip(x) * (n / c)) * (c / n)`` on ``[0, c]`` or ``[-c, c]``; ``x`` at 32 bits.

    A hand-written VJP: one fused pass over the activations instead of the several the
    differentiated expression keeps. Gradients (PACT, Choi et al. 2018, with a
    straight-through round): ``dq/dx = 1`` inside the range; ``dq/dc = +-1`` beyond it and
    ``(round(r) - r) / n`` inside, ``r = x n / c``.
    """
    n = act_levels(bits, signed)
    codes = jnp.round(jnp.clip(x, -c if signed else 0.0, c) * (n / c))
    if signed:  # 1 bit signed is binary {-c, +c}
        codes = jnp.where(bits <= 1, jnp.where(x >= 0, 1.0, -1.0), codes)
    q = (codes * (c / n)).astype(x.dtype)
    return jnp.where(bits >= FULL_PRECISION, x, q)


def _fake_quant_act_fwd(x, c, bits, signed):
    return _fake_quant_act(x, c, bits, signed), (x, c, bits)


def _fake_quant_act_bwd(signed, res, g):
    x, c, bits = res
    n = act_levels(bits, signed)
    full = bits >= FULL_PRECISION
    lo = -c if signed else 0.0
    inside = (x > lo) & (x < c)
    dx = jnp.where(full | inside, g, 0.0).astype(x.dtype)
    r = x * (n / c)
    if signed:
        step = jnp.where(bits <= 1, jnp.sign(x) - r, jnp.round(r) - r) / n
        dc_elem = jnp.where(x >= c, 1.0, jnp.where(x <= -c, -1.0, jnp.where(inside, step, 0.0)))
    else:
        dc_elem = jnp.where(x >= c, 1.0, jnp.where(inside, (jnp.round(r) - r) / n, 0.0))
    dc = jnp.sum(jnp.where(full, 0.0, g * dc_elem)).astype(c.dtype)
    return dx, dc, jnp.zeros_like(bits)


_fake_quant_act.defvjp(_fake_quant_act_fwd, _fake_quant_act_bwd)


def int_matmul(x, wq, a_bits, clip, w_step, *, signed: bool = False, bf16_grads: bool = False):
    """``x @ wq`` computed on the integer codes of both operands: exact, and faster on CPUs
    and accelerators with bfloat16 matrix units.

    ``x`` must be the output of :func:`quantize_activation` with ``a_bits`` and ``clip`` (after
    a ReLU, which leaves it unchanged) and ``wq`` the output of :func:`quantize_weight` with the
    learned step ``w_step``, both at most 8 bits: then ``x = a * c / (2**a_bits - 1)`` and
    ``wq = w * s / 2`` with integers ``|a|, |w| <= 255``, which bfloat16 holds exactly, and the
    product is ``(a @ w) * (c / (2**a_bits - 1)) * (s / 2)`` with the sums in float32 (exact
    up to 2**24). The gradients are those of ``x @ wq``, so they reach the clip and the step
    through the two quantizers as before: by default from float32 matmuls; with
    ``bf16_grads`` from bfloat16 matmuls of the output gradient rounded to bfloat16 (8
    significant bits, float32's exponent range, so nothing underflows) with the same integer
    codes, summed in float32: TPUs' default matmul precision, and faster than float32 on
    CPUs with bfloat16 units. Only the output gradient is rounded; the codes are exact.

    Args:
      x: quantized activations, ``(..., in)``.
      wq: fake-quantized kernel, ``(in, out)``.
      a_bits: the activation quantizer's bit width (value, <= 8).
      clip: its clip level.
      w_step: the weight quantizer's learned step, ``()`` or ``(out,)``.
      signed: ``x`` came from the signed activation quantizer.
      bf16_grads: run the two backward matmuls in bfloat16 on the rounded output gradient
        (static: it changes the program).

    Returns:
      ``(..., out)`` float32, equal to ``x @ wq`` up to float rounding (closer to the exact
      product than the float32 matmul).
    """
    c = jnp.maximum(jnp.abs(jnp.asarray(clip, x.dtype)), 1e-6)
    levels = act_levels(a_bits, signed)
    s = jnp.maximum(jnp.abs(w_step), 1e-8)
    # The same scalars as the quantizers' own, so the codes come back exactly.
    a = jnp.round(x * (levels / c)).astype(jnp.bfloat16)
    w = jnp.round(wq * (2.0 / s)).astype(jnp.bfloat16)
    return _codes_matmul(x, wq, a, w, c / levels, s / 2.0, bf16_grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _codes_matmul(x, wq, a, w, a_scale, w_scale, bf16_grads):
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32) * (a_scale * w_scale)


def _codes_matmul_fwd(x, wq, a, w, a_scale, w_scale, bf16_grads):
    out = _codes_matmul(x, wq, a, w, a_scale, w_scale, bf16_grads)
    # With bf16_grads the backward reads only the codes, so the float32 operands are not kept
    # (XLA then never writes the fake-quantized kernel: it fuses into the codes' conversion).
    return out, ((a, w) if bf16_grads else (x, wq), a_scale, w_scale)


def _codes_matmul_bwd(bf16_grads, res, g):
    (lhs, rhs), a_scale, w_scale = res
    lead = tuple(range(g.ndim - 1))  # x and the output share their leading (batch) axes
    if bf16_grads:
        a, w = lhs, rhs
        # x @ wq with wq = w * w_scale (per output channel or one value): the input gradient
        # is (g * w_scale) @ w.T, the kernel gradient (a.T @ g) * a_scale, each with its
        # gradient operand rounded to bfloat16.
        gb = g.astype(jnp.bfloat16)
        dx = jax.lax.dot_general(
            (g * w_scale).astype(jnp.bfloat16),
            w,
            (((g.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        dwq = jax.lax.dot_general(
            a, gb, ((lead, lead), ((), ())), preferred_element_type=jnp.float32
        ) * jnp.expand_dims(a_scale, -1)
    else:
        x, wq = lhs, rhs
        dx = jax.lax.dot_general(g, wq, (((g.ndim - 1,), (1,)), ((), ())))
        dwq = jax.lax.dot_general(x, g, ((lead, lead), ((), ())))
    # None: no cotangent for the codes (they are rounded, so their gradient is zero anyway).
    return dx, dwq, None, None, jnp.zeros_like(a_scale), jnp.zeros_like(w_scale)


_codes_matmul.defvjp(_codes_matmul_fwd, _codes_matmul_bwd)
