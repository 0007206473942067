import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import data, models, wrap
from qsparse.quant import quantize_weight

X = jnp.zeros((1, 8, 8, 1))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


def test_rules_hit_intended_layers_first_match_wins():
    plan = wrap.make_plan(
        Net(),
        [
            wrap.Rule(pattern="Conv_0", w_bits=4, a_bits=4, block_shape=(9, 4), compression=2),
            wrap.Rule(pattern="Dense_1", w_bits=8, quantize_output=False),
            wrap.Rule(pattern="Dense_.*", w_bits=2, a_bits=2, block_shape=(8, 8), compression=4),
        ],
        X,
    )
    assert list(plan.layers) == ["Conv_0", "Dense_0", "Dense_1"]
    assert plan.layers["Conv_0"].rule.w_bits == 4
    assert plan.layers["Dense_0"].rule.w_bits == 2
    assert plan.layers["Dense_1"].rule.w_bits == 8
    assert [lp.act_quantized for lp in plan.layers.values()] == [True, True, False]
    assert plan.layers["Conv_0"].kernel_shape == (3, 3, 1, 8)
    assert plan.layers["Dense_0"].in_size == 512 and plan.layers["Dense_0"].out_size == 16
    assert plan.block_shapes(("params",)) == {
        "params/Conv_0/kernel": (9, 4),
        "params/Dense_0/kernel": (8, 8),
    }


def test_unmatched_rule_is_an_error():
    with pytest.raises(ValueError, match="Dense_7"):
        wrap.make_plan(Net(), [wrap.Rule(pattern="Dense_7", w_bits=2)], X)


def test_non_dividing_block_shape_is_an_error():
    with pytest.raises(ValueError, match="Dense_1.block_shape"):
        wrap.make_plan(Net(), [wrap.Rule(pattern="Dense_1", block_shape=(8, 8), compression=2)], X)


def test_apply_quantizes_kernels_and_activations():
    model = models.MLP(hidden=(16,))
    plan = wrap.make_plan(
        model, [wrap.Rule(pattern="Dense_0", w_bits=2, a_bits=2, act_clip=1.0)], X
    )
    params = model.init(jax.random.key(0), X)["params"]
    spec = plan.init_spec()
    qp = plan.init_qparams(params, spec)
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    out = plan.apply(model, params, qp, spec, x)
    k0 = quantize_weight(params["Dense_0"]["kernel"], 2)
    h = x.reshape(4, -1) @ k0 + params["Dense_0"]["bias"]
    h = jnp.round(jnp.clip(h, 0, 1.0) * 3) / 3
    expect = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    np.testing.assert_allclose(out, expect, atol=1e-5)
    # bits 32 everywhere gives the plain model
    spec32 = plan.init_spec(w_bits=32, a_bits=32)
    np.testing.assert_allclose(
        plan.apply(model, params, qp, spec32, x), model.apply({"params": params}, x), atol=1e-5
    )


def test_one_trace_for_all_specs():
    model = models.MLP(hidden=(16,))
    plan = wrap.make_plan(model, [wrap.Rule(pattern="Dense_.*", w_bits=2, a_bits=2)], X)
    params = model.init(jax.random.key(0), X)["params"]
    traces = []

    @jax.jit
    def f(spec):
        traces.append(1)
        return plan.apply(model, params, plan.init_qparams(params, spec), spec, X)

    for b in (1, 2, 4, 8, 32):
        f(plan.init_spec(w_bits=b, a_bits=b))
    assert len(traces) == 1


def test_memory_counts_unmatched_layers_and_spec_overrides():
    model = models.MLP(hidden=(16,))
    plan = wrap.make_plan(
        model, [wrap.Rule(pattern="Dense_0", w_bits=2, block_shape=(8, 8), compression=2)], X
    )
    m = plan.memory(plan.init_spec())
    # Dense_0: 64x16, 2 blocks of 8x8 kept out of 16, 2-bit; Dense_1: 16x10 float32.
    assert m["layers"]["Dense_0"]["codes"] == 8 * 64 * 2
    assert m["layers"]["Dense_1"]["codes"] == 160 * 32
    assert m["fp32_weight_memory_bits"] == 32 * (64 * 16 + 16 + 160 + 10)
    assert float(m["block_sparsity"]) == 0.5
    with pytest.raises(ValueError, match="w_bits"):
        plan.init_spec(w_bits=0)
    with pytest.raises(ValueError, match="compression"):
        plan.init_spec(compression=0.5)


class Residual(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        h = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(h + 0.5)  # not the previous layer's output


class ConvAfterDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
        x = nn.relu(nn.Conv(4, (3, 3))(x.reshape((x.shape[0], 8, 8, 1))))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def test_int_matmul_matches_the_float_layer_and_runs_in_bfloat16():
    model = models.MLP(hidden=(32, 16))
    common = dict(w_bits=2, a_bits=2, scale_mode="learned", act_clip=1.0)
    ref = wrap.make_plan(model, [wrap.Rule(pattern=".*", **common)], X)
    fast = wrap.make_plan(
        model,
        [
            wrap.Rule(pattern="Dense_0", **common),
            wrap.Rule(pattern=".*", int_matmul=True, **common),
        ],
        X,
    )
    assert {k: lp.int_input for k, lp in fast.layers.items()} == {
        "Dense_0": None,
        "Dense_1": "Dense_0",
        "Dense_2": "Dense_1",
    }
    params = model.init(jax.random.key(0), X)["params"]
    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
    for bits in (1, 2, 4, 8):
        spec = fast.init_spec(w_bits=bits, a_bits=bits)
        qp = fast.init_qparams(params, spec)

        def loss(p, q, plan, spec=spec):
            return jnp.sum(jnp.sin(plan.apply(model, p, q, spec, x)))

        np.testing.assert_allclose(
            fast.apply(model, params, qp, spec, x),
            ref.apply(model, params, qp, spec, x),
            rtol=1e-5,
            atol=1e-5,
        )
        g_fast = jax.grad(loss, (0, 1))(params, qp, fast)
        g_ref = jax.grad(loss, (0, 1))(params, qp, ref)
        for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    hlo = jax.jit(lambda p: fast.apply(model, p, qp, spec, x)).lower(params).as_text()
    assert hlo.count("bf16") > 0
    assert "bf16" not in jax.jit(lambda p: ref.apply(model, p, qp, spec, x)).lower(params).as_text()


def test_int_matmul_refuses_what_it_cannot_make_exact():
    common = dict(w_bits=2, a_bits=2, scale_mode="learned")
    with pytest.raises(ValueError, match="Dense_0 is not allowed: it is the first layer"):
        wrap.make_plan(
            models.MLP(hidden=(16,)), [wrap.Rule(pattern=".*", int_matmul=True, **common)], X
        )
    with pytest.raises(ValueError, match="not the ReLU of Dense_0's output"):
        wrap.make_plan(
            Residual(),
            [
                wrap.Rule(pattern="Dense_1", int_matmul=True, **common),
                wrap.Rule(pattern=".*", **common),
            ],
            X,
        )
    with pytest.raises(ValueError, match="it is a Conv"):
        wrap.make_plan(
            ConvAfterDense(),
            [
                wrap.Rule(pattern="Conv_0", int_matmul=True, **common),
                wrap.Rule(pattern=".*", **common),
            ],
            X,
        )
    with pytest.raises(ValueError, match="scale_mode='max' is not allowed"):
        wrap.Rule(pattern=".*", int_matmul=True, w_bits=2, scale_mode="max")
    with pytest.raises(ValueError, match="w_bits=32 is not allowed"):
        wrap.Rule(pattern=".*", int_matmul=True, w_bits=32, scale_mode="learned")
    with pytest.raises(ValueError, match="bf16_grads=True with int_matmul=False is not allowed"):
        wrap.Rule(pattern=".*", bf16_grads=True, w_bits=2, scale_mode="learned")
    model = models.MLP(hidden=(16,))
    plan = wrap.make_plan(
        model,
        [
            wrap.Rule(pattern="Dense_0", **common),
            wrap.Rule(pattern="Dense_1", int_matmul=True, **common),
        ],
        X,
    )
    with pytest.raises(
        ValueError, match="Dense_0.a_bits=32 is not allowed: Dense_1 runs int_matmul"
    ):
        plan.init_spec(a_bits=32)
    with pytest.raises(ValueError, match="Dense_1.w_bits=16 is not allowed"):
        plan.init_spec(w_bits=16)


class Scaled(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = 2.0 * x.reshape((x.shape[0], -1))  # not the model's input any more
        return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))


def test_int_matmul_on_the_first_layer_needs_an_input_on_a_grid():
    common = dict(w_bits=2, a_bits=2, scale_mode="learned", act_clip=1.0)
    model = models.MLP(hidden=(32,))
    ref = wrap.make_plan(model, [wrap.Rule(pattern=".*", **common)], X)
    fast = wrap.make_plan(
        model, [wrap.Rule(pattern=".*", int_matmul=True, **common)], X, input_bits=8
    )
    assert fast.layers["Dense_0"].int_input == wrap.MODEL_INPUT
    assert fast.layers["Dense_1"].int_input == "Dense_0"
    params = model.init(jax.random.key(0), X)["params"]
    pixels = jax.random.randint(jax.random.key(2), (6, 8, 8, 1), 0, 256).astype(jnp.uint8)
    x = data.normalize(pixels)  # uint8 / 255: the 8-bit grid input_bits=8 promises
    spec = fast.init_spec()
    qp = fast.init_qparams(params, spec)
    np.testing.assert_allclose(
        fast.apply(model, params, qp, spec, x), ref.apply(model, params, qp, spec, x), atol=2e-5
    )
    with pytest.raises(ValueError, match="its input is not the model's input"):
        wrap.make_plan(
            Scaled(), [wrap.Rule(pattern=".*", int_matmul=True, **common)], X, input_bits=8
        )
    with pytest.raises(ValueError, match="input_bits=16 is not allowed"):
        wrap.make_plan(model, [wrap.Rule(pattern=".*", **common)], X, input_bits=16)
