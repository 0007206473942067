import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import models, wrap
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
