import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import quant
from qsparse.quant import quantize_activation, quantize_weight, weight_step

W = jax.random.normal(jax.random.key(0), (64, 48))
BITS = [1, 2, 3, 4, 8, 32]


@pytest.mark.parametrize("zero_level", [True, False])
def test_level_counts(zero_level):
    rows = jax.jit(jax.vmap(lambda b: quantize_weight(W, b, zero_level=zero_level)))(
        jnp.array(BITS)
    )
    for b, row in zip(BITS[:-1], rows[:-1]):
        levels = np.unique(np.asarray(row))
        assert len(levels) <= 2**b
        if b <= 3:  # enough weights to hit every level
            expected = 2 if b == 1 else (2**b - 1 if zero_level else 2**b)
            assert len(levels) == expected, (b, levels)
        assert (0.0 in levels) == (zero_level and b > 1)
    np.testing.assert_array_equal(rows[-1], W)


def test_ternary_values_and_scale():
    q = quantize_weight(W, 2, scale_mode="max")
    s = float(jnp.max(jnp.abs(W)))
    np.testing.assert_allclose(np.unique(np.asarray(q)), [-s, 0.0, s], rtol=1e-6)
    qb = quantize_weight(W, 1, scale_mode="mean")
    a = float(jnp.mean(jnp.abs(W)))
    np.testing.assert_allclose(np.unique(np.asarray(qb)), [-a, a], rtol=1e-6)


def test_per_channel_scale():
    q = quantize_weight(W, 2, per_channel=True)
    for j in range(W.shape[1]):
        s = float(jnp.max(jnp.abs(W[:, j])))
        assert set(np.round(np.unique(np.asarray(q[:, j])) / s, 5)) <= {-1.0, 0.0, 1.0}


def test_vmap_equals_separate_calls():
    bits = jnp.array(BITS, jnp.float32)
    rows = jax.vmap(lambda b: quantize_weight(W, b, scale_mode="mean"))(bits)
    for b, row in zip(BITS, rows):
        np.testing.assert_array_equal(row, quantize_weight(W, b, scale_mode="mean"))
    x = jax.random.normal(jax.random.key(1), (8, 16)) * 3
    arows = jax.vmap(lambda b: quantize_activation(x, b, 2.0))(bits)
    for b, row in zip(BITS, arows):
        np.testing.assert_array_equal(row, quantize_activation(x, b, 2.0))


def test_one_compilation_serves_all_bit_widths():
    traces = []

    @jax.jit
    def f(w, b):
        traces.append(1)
        return quantize_weight(w, b) + quantize_activation(w, b, 1.0).sum()

    for b in BITS:
        f(W, jnp.asarray(b, jnp.float32))
    assert len(traces) == 1


def test_straight_through_gradient_weights():
    # mean-abs scale clips the largest weights: inside -> gradient 1, outside -> 0.
    g = jax.grad(lambda w: jnp.sum(quantize_weight(w, 2, scale_mode="mean")))(W)
    s = weight_step(W, 2, scale_mode="mean")
    inside = np.abs(np.asarray(W)) < float(s)  # n = 1 for 2 bits
    np.testing.assert_array_equal(np.asarray(g), inside.astype(np.float32))
    assert 0 < inside.mean() < 1


def test_identity_weight_gradient_passes_outside_the_range_but_not_to_pruned_weights():
    w = W.at[:8].set(0.0)  # eight pruned rows
    s = weight_step(w, 2, scale_mode="mean")
    outside = np.abs(np.asarray(w)) > float(s)
    clipped, identity = (
        jax.grad(lambda v, m=m: jnp.sum(quantize_weight(v, 2, scale_mode="mean", weight_grad=m)))(w)
        for m in ("clipped", "identity")
    )
    assert outside.any() and np.all(np.asarray(clipped)[outside] == 0)
    np.testing.assert_array_equal(identity, (np.asarray(w) != 0).astype(np.float32))
    inside = ~outside & (np.asarray(w) != 0)  # where both pass the gradient, they agree
    np.testing.assert_array_equal(np.asarray(clipped)[inside], np.asarray(identity)[inside])
    np.testing.assert_array_equal(  # the forward pass does not depend on the mode
        quantize_weight(w, 2, scale_mode="mean", weight_grad="identity"),
        quantize_weight(w, 2, scale_mode="mean"),
    )
    with pytest.raises(ValueError, match="weight_grad='ste' is not allowed"):
        quantize_weight(w, 2, weight_grad="ste")


def test_straight_through_gradient_activations_and_pact_clip():
    x = jnp.linspace(-2.01, 6.01, 97)  # no point exactly on 0 or the clip

    def f(x, c):
        return jnp.sum(quantize_activation(x, 2, c))

    gx, gc = jax.grad(f, argnums=(0, 1))(x, 4.0)
    inside = (np.asarray(x) > 0) & (np.asarray(x) < 4.0)
    np.testing.assert_array_equal(np.asarray(gx), inside.astype(np.float32))
    assert float(gc) > 0  # values above the clip pull the clip up
    q = quantize_activation(x, 2, 4.0)
    np.testing.assert_allclose(np.unique(np.asarray(q)), [0.0, 4 / 3, 8 / 3, 4.0], rtol=1e-6)
    # 32 bits: the input unchanged (the quantizer adds nothing, not even a ReLU).
    np.testing.assert_array_equal(quantize_activation(x, 32, 4.0), x)
    np.testing.assert_array_equal(
        jax.grad(lambda x: jnp.sum(quantize_activation(x, 32, 4.0)))(x), 1
    )


def test_learned_step_gets_gradient():
    def f(step):
        return jnp.sum(quantize_weight(W, 3, scale_mode="learned", step=step) ** 2)

    assert float(jax.grad(f)(jnp.asarray(0.3))) != 0.0


@pytest.mark.parametrize("bad", [0, -1, 2.5, 33])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(W, bad)
    with pytest.raises(ValueError, match="bits"):
        quantize_activation(W, bad, 1.0)


def test_bad_scale_mode():
    with pytest.raises(ValueError, match="scale_mode"):
        quantize_weight(W, 2, scale_mode="median")
    with pytest.raises(ValueError, match="step"):
        quantize_weight(W, 2, scale_mode="learned")


@pytest.mark.parametrize("bits,zero_level", [(1, True), (2, False), (3, False), (4, True)])
def test_exact_zeros_stay_zero(bits, zero_level):
    w = W.at[:8].set(0.0)  # a pruned block
    q = quantize_weight(w, bits, zero_level=zero_level, scale_mode="mean")
    assert (np.asarray(q[:8]) == 0).all()
    assert len(np.unique(np.asarray(q[8:]))) <= 2**bits


def _ste(x, y):
    """``y`` forward, the gradient of ``x`` backward (straight-through)."""
    return x + jax.lax.stop_gradient(y - x)


def _reference_weight(w, s, bits, zero_level):
    """The quantizer written as plain differentiable jnp (what autodiff of the formula gives)."""
    n = (2.0 ** (bits - 1) - 1.0) if zero_level else (2.0 ** (bits - 1) - 0.5)
    x = w / s
    xc = jnp.clip(x, -n, n)
    multi = _ste(xc, jnp.round(xc)) if zero_level else _ste(xc, jnp.round(xc - 0.5) + 0.5)
    b = jnp.clip(x, -1.0, 1.0)
    codes = multi if bits > 1 else _ste(b, jnp.where(x >= 0, 1.0, -1.0))
    q = jnp.where(w == 0, 0.0, codes) * s
    return w if bits >= 32 else q


@pytest.mark.parametrize("bits", [1, 2, 3, 8, 32])
@pytest.mark.parametrize("zero_level", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_vjp_equals_autodiff_of_the_formula(bits, zero_level, per_channel):
    # The hand-written VJP must give the LSQ gradients of the formula for the weights and the
    # learned step, pruned (exact zero) weights included.
    w = W.at[:8].set(0.0)
    step = jnp.full((48,) if per_channel else (), 0.37)
    cot = jnp.sin(jnp.arange(w.size, dtype=jnp.float32)).reshape(w.shape)

    def ours(w, st):
        q = quantize_weight(w, bits, scale_mode="learned", step=st, zero_level=zero_level)
        return jnp.sum(q * cot)

    def ref(w, st):
        return jnp.sum(_reference_weight(w, jnp.maximum(jnp.abs(st), 1e-8), bits, zero_level) * cot)

    (v1, (gw1, gs1)), (v2, (gw2, gs2)) = (
        jax.value_and_grad(f, argnums=(0, 1))(w, step) for f in (ours, ref)
    )
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(gw1, gw2, atol=1e-6)
    np.testing.assert_allclose(gs1, gs2, rtol=1e-4, atol=1e-4)
    assert (np.asarray(gw1)[:8] == 0).all() or bits == 32  # pruned weights get no gradient


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 32])
def test_activation_vjp_equals_autodiff_of_the_formula(bits, signed):
    x = 3.0 * jax.random.normal(jax.random.key(3), (32, 40))
    cot = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

    def ours(x, c):
        return jnp.sum(quantize_activation(x, bits, c, signed=signed) * cot)

    def ref(x, c):
        n = max(2.0 ** (bits - 1) - 1.0, 1.0) if signed else 2.0**bits - 1.0
        d = c / n
        y = jnp.clip(x, -c if signed else 0.0, c)
        level = jnp.where(y >= 0, 1.0, -1.0) if signed and bits == 1 else jnp.round(y / d)
        q = _ste(y / d, level) * d
        return jnp.sum((x if bits >= 32 else q) * cot)

    (v1, (gx1, gc1)), (v2, (gx2, gc2)) = (
        jax.value_and_grad(f, argnums=(0, 1))(x, 2.5) for f in (ours, ref)
    )
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(gx1, gx2, atol=1e-6)
    np.testing.assert_allclose(gc1, gc2, rtol=1e-4, atol=1e-4)


def _lsq_weight_vjp(w, s, bits, zero_level, g):
    """The LSQ gradients written out per element: ``dw`` and the step-gradient terms."""
    from qsparse.quant import _level, weight_levels

    x = w / s
    binary = bits <= 1
    lim = jnp.where(binary, 1.0, weight_levels(bits, zero_level))
    inside, pos = jnp.abs(x) <= lim, x >= 0
    code_in = jnp.where(binary, jnp.where(pos, 1.0, -1.0), _level(x, zero_level))
    r = jnp.where(inside, code_in - x, jnp.where(pos, lim, -lim))
    full = bits >= 32
    live = (w != 0) & ~full
    return jnp.where(full | (live & inside), g, 0.0), jnp.where(live, g * r, 0.0)


@pytest.mark.parametrize("zero_level", [True, False])
def test_weight_vjp_is_the_lsq_gradient(zero_level):
    # On and around every range edge, rounding ties, zeros and signed zeros, at every bit
    # width (binary and full precision included).
    from qsparse.quant import _fake_quant

    s = jnp.linspace(0.05, 0.4, 8)  # one step per output channel: the sum is over 256 rows
    edges = jnp.array([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 3.0, -3.5, 127.0, 127.5])
    x = jnp.concatenate([jnp.linspace(-200.0, 200.0, 256 - edges.size), edges])
    w = x[:, None] * s[None, :]
    g = jnp.cos(jnp.arange(w.size, dtype=jnp.float32)).reshape(w.shape)
    for bits in (1, 2, 3, 4, 8, 32):
        b = jnp.float32(bits)
        _, vjp = jax.vjp(lambda w, s, b=b: _fake_quant(w, s, b, zero_level), w, s)
        dw, ds = jax.jit(vjp)(g)
        ref_dw, ref_terms = _lsq_weight_vjp(w, s, b, zero_level, g)
        np.testing.assert_array_equal(dw, ref_dw)
        np.testing.assert_allclose(ds, jnp.sum(ref_terms, axis=0), rtol=1e-5, atol=1e-4)
        _, vjp1 = jax.vjp(lambda w, s, b=b: _fake_quant(w, s, b, zero_level), w, s[3])
        _, ds1 = jax.jit(vjp1)(g)  # one step for the tensor: the sum is over every weight
        _, terms1 = _lsq_weight_vjp(w, s[3], b, zero_level, g)
        np.testing.assert_allclose(ds1, jnp.sum(terms1), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("zero_level", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_int_matmul_is_the_product_of_the_quantized_operands(zero_level, per_channel):
    k = jax.random.split(jax.random.key(3), 2)
    y = 2.0 * jax.random.normal(k[0], (3, 5, 64))  # leading dims, as a Dense layer sees them
    w = jax.random.normal(k[1], (64, 12))
    step = jnp.linspace(0.1, 0.4, 12) if per_channel else jnp.asarray(0.3)
    for a_bits, w_bits in ((1, 1), (2, 2), (3, 4), (8, 8)):
        x = jax.nn.relu(quant.quantize_activation(y, a_bits, 1.7))
        wq = quant.quantize_weight(
            w,
            w_bits,
            scale_mode="learned",
            step=step,
            zero_level=zero_level,
            per_channel=per_channel,
        )
        got = np.asarray(quant.int_matmul(x, wq, a_bits, 1.7, step), np.float64)
        exact = np.asarray(x, np.float64) @ np.asarray(wq, np.float64)
        # Integer sums are exact: only the final scaling rounds, to float32.
        np.testing.assert_allclose(got, exact, rtol=2e-7, atol=1e-6)
        dx, dw = jax.grad(
            lambda x, wq, b=a_bits: jnp.sum(jnp.cos(quant.int_matmul(x, wq, b, 1.7, step))), (0, 1)
        )(x, wq)
        ex, ew = jax.grad(lambda x, wq: jnp.sum(jnp.cos(x @ wq)), (0, 1))(x, wq)
        np.testing.assert_allclose(dx, ex, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dw, ew, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int_matmul_bf16_grads_round_only_the_output_gradient(per_channel):
    k = jax.random.split(jax.random.key(4), 3)
    y = 2.0 * jax.random.normal(k[0], (2, 16, 64))
    w = jax.random.normal(k[1], (64, 12))
    r = jax.random.normal(k[2], (2, 16, 12))
    step = jnp.linspace(0.1, 0.4, 12) if per_channel else jnp.asarray(0.3)
    x = quant.quantize_activation(y, 2, 1.7)
    wq = quant.quantize_weight(w, 2, scale_mode="learned", step=step, per_channel=per_channel)

    def loss(x, wq, bf16):
        return jnp.sum(r * quant.int_matmul(x, wq, 2, 1.7, step, bf16_grads=bf16))

    # The forward pass is the same program's value, bit for bit.
    np.testing.assert_array_equal(
        quant.int_matmul(x, wq, 2, 1.7, step, bf16_grads=True),
        quant.int_matmul(x, wq, 2, 1.7, step),
    )
    dx, dw = jax.grad(loss, (0, 1))(x, wq, True)
    fx, fw = jax.grad(loss, (0, 1))(x, wq, False)
    # The exact products of the bfloat16-rounded output gradient with the float operands:
    # only that rounding (and float32 sums) separates them from the bf16 backward.
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    s = np.broadcast_to(f64(step), (12,))
    g_x = f64((r * (step / 2.0)).astype(jnp.bfloat16))
    codes_w = np.round(f64(wq) * 2.0 / s)
    np.testing.assert_allclose(dx, g_x @ codes_w.T, rtol=1e-5, atol=1e-6)
    g_w = f64(r.astype(jnp.bfloat16)).reshape(-1, 12)
    np.testing.assert_allclose(dw, f64(x).reshape(-1, 64).T @ g_w, rtol=1e-5, atol=1e-6)
    # Close to the float32 gradients (8 significant bits), and not the same program.
    for got, ref in ((dx, fx), (dw, fw)):
        err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        assert 0 < err < 2**-7


def test_quantize_bias_is_int8_codes_times_one_scale_with_a_straight_through_gradient():
    b = jnp.asarray(np.random.default_rng(0).normal(0, 0.3, 300), jnp.float32)
    q = quant.quantize_bias(b, 8)
    s = quant.bias_scale(b, 8)
    assert float(s) == float(jnp.max(jnp.abs(b)) / jnp.float32(127))
    codes = np.asarray(jnp.round(b / s))
    assert codes.min() >= -127 and codes.max() <= 127 and len(np.unique(codes)) > 100
    np.testing.assert_array_equal(np.asarray(q), codes.astype(np.float32) * np.float32(s))
    assert float(jnp.max(jnp.abs(q - b))) <= float(s) / 2 + 1e-7
    g = jax.grad(lambda v: jnp.sum(quant.quantize_bias(v, 8) * jnp.arange(300.0)))(b)
    np.testing.assert_allclose(np.asarray(g), np.arange(300.0), rtol=1e-6)  # (g / s) * s
    assert quant.quantize_bias(b, 32) is b
    zeros = jnp.zeros(4)
    np.testing.assert_array_equal(np.asarray(quant.quantize_bias(zeros, 8)), np.zeros(4))


@pytest.mark.parametrize("zero_level", [True, False])
def test_level_distance_pulls_each_live_weight_to_its_level(zero_level):
    """Distances in steps to the nearest level (range-clipped); gradient 2 (x - code) / s."""
    s = 0.5
    level = 1.0 if zero_level else 0.5  # a level of each set: integers, or half-integers
    lim = 1.0 if zero_level else 1.5  # the outermost level at 2 bits
    x = np.array([level, level + 0.25, level - 0.4, 7.0, -7.0, 0.0], np.float32)
    codes = np.array([level, level, level, lim, -lim, 0.0])
    w = jnp.asarray(x * s)  # the last weight is pruned (exactly 0): it adds nothing
    total, count = quant.level_distance(w, 2, jnp.float32(s), zero_level)
    clipped = np.clip(x, -lim, lim)
    np.testing.assert_allclose(float(total), np.square(codes - clipped)[:-1].sum(), rtol=1e-6)
    assert int(count) == 5
    g = jax.grad(lambda w: quant.level_distance(w, 2, jnp.float32(s), zero_level)[0])(w)
    want = np.where(np.abs(x) <= lim, 2 * (clipped - codes) / s, 0.0)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=1e-7)
    assert float(quant.level_distance(w, 32, jnp.float32(s), zero_level)[1]) == 0  # FP32: none
