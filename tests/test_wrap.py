import contextlib
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

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
            wrap.Rule(pattern="Conv_0", w_bits=4, block_shape=(9, 4), compression=2),
            wrap.Rule(pattern="Dense_1", w_bits=8),
            wrap.Rule(pattern="Dense_.*", w_bits=2, a_bits=2, block_shape=(8, 8), compression=4),
        ],
        X,
    )
    assert list(plan.layers) == ["Conv_0", "Dense_0", "Dense_1"]
    assert [lp.rule.w_bits for lp in plan.layers.values()] == [4, 2, 8]
    assert plan.layers["Conv_0"].kernel_shape == (3, 3, 1, 8)
    assert plan.layers["Conv_0"].ops == ("conv_general_dilated",)
    # The conv reads the model's input (sign unknown); the Dense layers read ReLU outputs.
    assert plan.layers["Conv_0"].reads_input and plan.layers["Conv_0"].a_signed
    assert not plan.layers["Dense_0"].a_signed and not plan.layers["Dense_1"].a_signed
    assert plan.layers["Dense_0"].in_size == 512
    assert plan.block_shapes(("params",)) == {
        "params/Conv_0/kernel": (9, 4),
        "params/Dense_0/kernel": (8, 8),
    }


def test_unmatched_rule_and_bad_block_shape_are_one_line_errors():
    with pytest.raises(ValueError, match="Dense_7.*layers are"):
        wrap.make_plan(Net(), [wrap.Rule(pattern="Dense_7", w_bits=2)], X)
    with pytest.raises(ValueError, match="Dense_1.block_shape"):
        wrap.make_plan(Net(), [wrap.Rule(pattern="Dense_1", block_shape=(8, 8), compression=2)], X)


def test_apply_quantizes_kernels_and_input_activations():
    model = models.MLP(hidden=(16,))
    plan = wrap.make_plan(
        model,
        [
            wrap.Rule(pattern="Dense_0", w_bits=2),
            wrap.Rule(pattern="Dense_1", a_bits=2, act_clip=1.0),
        ],
        X,
    )
    params = model.init(jax.random.key(0), X)["params"]
    spec = plan.init_spec()
    qp = plan.init_qparams(params, spec)
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    out = plan.apply(model, params, qp, spec, x)
    k0 = quantize_weight(params["Dense_0"]["kernel"], 2)
    h = jax.nn.relu(x.reshape(4, -1) @ k0 + params["Dense_0"]["bias"])
    h = jnp.round(jnp.clip(h, 0, 1.0) * 3) / 3  # unsigned: Dense_1's input is a ReLU output
    expect = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    np.testing.assert_allclose(out, expect, atol=1e-5)
    spec32 = plan.init_spec(w_bits=32, a_bits=32)
    assert np.array_equal(
        plan.apply(model, params, qp, spec32, x), model.apply({"params": params}, x)
    )
    # Dense_0's rule leaves its input (the data) as it is: no quantizer, no clip, and a spec
    # cannot ask for one.
    assert not plan.layers["Dense_0"].act_quantized and "a_clip" not in qp.get("Dense_0", {})
    bad = plan.init_spec()
    bad["Dense_0"]["a_bits"] = jnp.float32(2)
    with pytest.raises(ValueError, match="Dense_0.a_bits=2 is not allowed: the layer's rule"):
        plan.memory(bad)


class Shifted(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(h - 0.5)  # can be negative: a signed input


def test_signed_input_quantizer_where_the_input_can_be_negative():
    rules = [wrap.Rule(pattern="Dense_1", a_bits=2, act_clip=1.0)]
    plan = wrap.make_plan(Shifted(), rules, X)
    assert plan.layers["Dense_1"].a_signed
    params = Shifted().init(jax.random.key(0), X)["params"]
    spec = plan.init_spec()
    qp = plan.init_qparams(params, spec)
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    h = jax.nn.relu(x.reshape(4, -1) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    hq = jnp.round(jnp.clip(h - 0.5, -1.0, 1.0))  # 2 bits signed: {-1, 0, 1} * clip
    expect = hq @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    np.testing.assert_allclose(plan.apply(None, params, qp, spec, x), expect, atol=1e-5)
    forced = wrap.make_plan(Shifted(), [wrap.Rule(pattern="Dense_1", a_bits=2, a_signed=False)], X)
    assert not forced.layers["Dense_1"].a_signed


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


def test_memory_counts_every_parameter_and_refuses_bad_values():
    model = models.MLP(hidden=(16,))
    plan = wrap.make_plan(
        model, [wrap.Rule(pattern="Dense_0", w_bits=2, block_shape=(8, 8), compression=2)], X
    )
    m = plan.memory(plan.init_spec())
    # Dense_0: 64x16, 8 of 16 blocks of 8x8 kept, 2-bit, one scale; Dense_1: float32.
    assert m["layers"]["Dense_0"]["codes"] == 8 * 64 * 2
    assert m["layers"]["Dense_0"]["other"] == 16 * 32  # its biases
    # Dense_1 is covered but matched by no rule: float32 codes, no scale.
    assert m["layers"]["Dense_1"]["codes"] == 160 * 32 and m["layers"]["Dense_1"]["scales"] == 0
    assert m["layers"]["Dense_1"]["other"] == 10 * 32
    assert m["num_params"] == 64 * 16 + 16 + 160 + 10
    assert m["fp32_weight_memory_bits"] == 32 * m["num_params"]
    assert float(m["block_sparsity"]) == 0.5
    for bad in (0, -3, 2.5, 64):
        with pytest.raises(ValueError, match=f"w_bits={bad:g} is not allowed"):
            plan.init_spec(w_bits=bad)
        spec = plan.init_spec()
        spec["Dense_0"]["w_bits"] = jnp.float32(bad)
        with pytest.raises(ValueError, match=f"Dense_0.w_bits={bad:g} is not allowed"):
            plan.memory(spec)
    with pytest.raises(ValueError, match="compression=0.5 is not allowed"):
        plan.init_spec(compression=0.5)
    with pytest.raises(ValueError, match="w_bits=2.5 is not allowed"):
        wrap.Rule(pattern=".*", w_bits=2.5)
    for bad in (4, 16, 8.5, "8"):
        with pytest.raises(ValueError, match=rf"bias_bits={bad!r} is not allowed: use one of"):
            wrap.Rule(pattern=".*", bias_bits=bad)
    # int8 biases: 8 bits each and one 32-bit scale, in the layer's own breakdown.
    rule8 = wrap.Rule(pattern="Dense_0", w_bits=2, block_shape=(8, 8), compression=2, bias_bits=8)
    plan8 = wrap.make_plan(model, [rule8], X)
    m8 = plan8.memory(plan8.init_spec())["layers"]
    assert m8["Dense_0"]["other"] == 16 * 8 and m8["Dense_0"]["scales"] == 32 + 32


class NoWeights(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x).sum(-1)


def test_models_without_covered_operations_and_other_objects_are_refused():
    with pytest.raises(ValueError, match="NoWeights has no covered operation"):
        wrap.make_plan(NoWeights(), [], X)
    with pytest.raises(TypeError, match="model=function is not allowed"):
        wrap.make_plan(lambda x: x, [], X)


class DenseGeneralNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
        return nn.DenseGeneral((2, 5))(h).reshape((x.shape[0], -1))


def test_int_matmul_matches_the_float_layer_and_runs_in_bfloat16():
    model = models.MLP(hidden=(32, 16))
    common = dict(w_bits=2, a_bits=2, scale_mode="learned", act_clip=1.0)
    first = wrap.Rule(pattern="Dense_0", **{**common, "a_bits": 32})
    ref = wrap.make_plan(model, [first, wrap.Rule(pattern=".*", **common)], X)
    fast = wrap.make_plan(model, [first, wrap.Rule(pattern=".*", int_matmul=True, **common)], X)
    assert [lp.int_matmul for lp in fast.layers.values()] == [False, True, True]
    params = model.init(jax.random.key(0), X)["params"]
    # Non-zero biases: with zero ones, a ternary layer's output can be exactly 0 on codes and
    # a float rounding residue in float32, and the ReLU after it passes only the latter.
    params = jax.tree_util.tree_map_with_path(
        lambda kp, p: p + 0.1 if "bias" in str(kp[-1]) else p, params
    )
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
    with pytest.raises(ValueError, match="Dense_1.a_bits=16 is not allowed: the layer runs"):
        fast.init_spec(a_bits=16)


def test_int_matmul_refuses_what_it_cannot_make_exact():
    common = dict(w_bits=2, a_bits=2, scale_mode="learned")
    with pytest.raises(ValueError, match="int_matmul on Conv_0 is not allowed"):
        wrap.make_plan(Net(), [wrap.Rule(pattern="Conv_0", int_matmul=True, **common)], X)
    with pytest.raises(ValueError, match="int_matmul on DenseGeneral_0 is not allowed"):
        wrap.make_plan(
            DenseGeneralNet(), [wrap.Rule(pattern="DenseGeneral_0", int_matmul=True, **common)], X
        )
    with pytest.raises(ValueError, match="scale_mode='max' is not allowed"):
        wrap.Rule(pattern=".*", int_matmul=True, w_bits=2, scale_mode="max")
    with pytest.raises(ValueError, match="w_bits=32 is not allowed"):
        wrap.Rule(pattern=".*", int_matmul=True, w_bits=32, scale_mode="learned")
    with pytest.raises(ValueError, match="a_bits=32 is not allowed"):
        wrap.Rule(pattern=".*", int_matmul=True, w_bits=2, a_bits=32, scale_mode="learned")
    with pytest.raises(ValueError, match="bf16_grads=True with int_matmul=False is not allowed"):
        wrap.Rule(pattern=".*", bf16_grads=True, w_bits=2, scale_mode="learned")


class Cell(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return nn.relu(nn.Dense(4)(c)), None


class Scanned(nn.Module):
    """Two layers stacked by ``nn.scan`` (params on a leading axis), then an RNN's shared cell."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x.reshape((x.shape[0], -1)))
        cells = nn.scan(Cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        x, _ = cells(name="cells")(x, None)
        return nn.RNN(nn.SimpleCell(4))(x[:, None, :].repeat(3, axis=1))[:, -1]


def test_layers_inside_a_scan_are_covered_stacked_or_shared():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    model = Scanned()
    plan = wrap.make_plan(model, [wrap.Rule(pattern=".*", w_bits=2, a_bits=4)], x[:1])
    assert plan.layers["cells/Dense_0"].kernel_shape == (2, 4, 4)  # one weight per step
    assert {"SimpleCell_0/i", "SimpleCell_0/h"} <= set(plan.layers)  # the cell, every step
    params, _ = plan.init_variables(jax.random.key(1), x)
    fp = wrap.make_plan(model, [], x[:1])
    spec = fp.init_spec()
    got = fp.apply(None, params, fp.init_qparams(params, spec), spec, x)
    assert float(jnp.max(jnp.abs(got - model.apply({"params": params}, x)))) == 0.0
    # At 4-bit inputs each step's matmul reads the quantized carry: the output moves.
    spec = plan.init_spec()
    low = plan.apply(None, params, plan.init_qparams(params, spec), spec, x)
    assert float(jnp.max(jnp.abs(low - got))) > 0


class Branched(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x.reshape((x.shape[0], -1)))
        branch = nn.Dense(4, name="branch")
        return nn.cond(jnp.sum(x) > 0, lambda m, v: m(v), lambda m, v: -m(v), branch, x)


def test_layers_inside_a_cond_are_named_as_not_covered():
    plan = wrap.make_plan(Branched(), [], X)
    assert list(plan.layers) == ["Dense_0"]
    with pytest.warns(UserWarning, match=r"stay float .*\['branch/bias', 'branch/kernel'\]"):
        plan = wrap.make_plan(Branched(), [wrap.Rule(pattern=".*", w_bits=2)], X)
    assert list(plan.layers) == ["Dense_0"]
    with pytest.raises(ValueError, match="not covered .*cond.*branch/kernel") as e:
        wrap.make_plan(Branched(), [wrap.Rule(pattern="branch", w_bits=2)], X)
    assert "\n" not in str(e.value)


class Residual(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(16)(nn.relu(nn.Dense(16)(x)))


class RematNet(nn.Module):
    """Residual blocks under ``nn.remat``, as memory-bound Flax models write them."""

    remat: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x)
        block = nn.remat(Residual) if self.remat else Residual
        for i in range(2):
            x = block(name=f"block{i}")(x)
        return nn.Dense(10)(x)


def test_layers_inside_remat_are_covered_and_stay_rematerialised():
    x = jax.random.normal(jax.random.key(1), (8, 8))
    q = dict(w_bits=2, a_bits=4, scale_mode="learned", learn_clip=True)
    runs = {}
    for remat in (True, False):
        model = RematNet(remat=remat)
        plan = wrap.make_plan(model, [wrap.Rule(pattern=".*", **q)], x[:1])
        params, _ = plan.init_variables(jax.random.key(0), x)
        spec = plan.init_spec()
        qp = plan.init_qparams(params, spec)

        def loss(p, plan=plan, qp=qp, spec=spec):
            return jnp.sum(plan.apply(None, p, qp, spec, x) ** 2)

        grads = jax.grad(loss)(params)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # one line per value kept for the backward pass
            print_saved_residuals(loss, params)
        saved = out.getvalue().splitlines()
        runs[remat] = (list(plan.layers), loss(params), grads, len(saved))
        fp = wrap.make_plan(model, [], x[:1])
        want = model.apply({"params": params}, x)
        got = fp.apply(None, params, fp.init_qparams(params, fp.init_spec()), fp.init_spec(), x)
        assert float(jnp.max(jnp.abs(got - want))) == 0.0
    layers, value, grads, saved = runs[True]
    assert layers == runs[False][0] and "block1/Dense_0" in layers
    assert float(value) == float(runs[False][1])
    jax.tree.map(np.testing.assert_array_equal, grads, runs[False][2])
    assert saved < runs[False][3]  # the blocks' activations are recomputed, not kept
