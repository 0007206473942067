"""Models written the way Flax's own examples write them (tests/zoo.py), wrapped unchanged.

For each: at a full-precision spec the wrapped model computes exactly what the model computes,
in training and evaluation mode; a few hundred steps at 2-bit weights, 4-bit activations and
4X blocks lower the loss, prune 3/4 of every layer's blocks to exact zeros and leave at most
2**k levels in each kernel; the memory breakdown counts every parameter of the model.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from flax import nnx

from qsparse import export, quant, training, wrap

IMG = (2, 28, 28, 1)


def _image_batch(n=2, seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, *IMG[1:]))


def _tokens(n=2, seed=1):
    return jax.random.randint(jax.random.key(seed), (n, 12), 1, 32)


def _lm():
    cfg = zoo.TransformerConfig()
    return zoo.TransformerLM(cfg), zoo.TransformerLM(cfg.replace(deterministic=True))


# name -> (model factory, make_plan kwargs, input batch, labels of that batch)
CASES = {
    "linen_cnn": (lambda: zoo.CNN(features=(4, 8), hidden=16), {}, _image_batch),
    "nnx_cnn": (lambda: zoo.NNXCNN(rngs=nnx.Rngs(0), features=(4, 8), hidden=16), {}, _image_batch),
    "linen_resnet": (lambda: zoo.ResNet(), {}, _image_batch),
    "nnx_resnet": (lambda: zoo.NNXResNet(rngs=nnx.Rngs(0)), {}, _image_batch),
    "transformer_lm": (lambda: _lm()[0], {"eval_model": _lm()[1]}, _tokens),
    "nnx_encoder": (lambda: zoo.NNXTextClassifier(rngs=nnx.Rngs(0, dropout=1)), {}, _tokens),
    "linen_lstm": (lambda: zoo.TextClassifier(), {}, _tokens),
}


def _reference(name, model, kwargs, params, state, x, train, rng):
    """What the user's own Linen model computes (the plan's training-mode conventions)."""
    if name == "transformer_lm":
        m = model if train else kwargs["eval_model"]
        return m.apply({"params": params}, x, rngs={"dropout": jax.random.fold_in(rng, 0)})
    if name == "linen_lstm":
        rngs = {"dropout": jax.random.fold_in(rng, 0)}
        return model.apply({"params": params}, x, deterministic=not train, rngs=rngs)
    variables = {"params": params, **state}
    if name == "linen_cnn":
        return model.apply(variables, x)
    if train:
        return model.apply(variables, x, train=True, mutable=list(state))[0]
    return model.apply(variables, x, train=False)


@pytest.mark.parametrize("name", list(CASES))
def test_full_precision_wrapped_model_computes_exactly_the_model(name):
    factory, kwargs, batch = CASES[name]
    model = factory()
    x = batch()
    plan = wrap.make_plan(model, [], x, **kwargs)
    params, state = plan.init_variables(jax.random.key(0), x)
    spec = plan.init_spec()
    qp = plan.init_qparams(params, spec)
    rng = jax.random.key(3)
    for train in (False, True):
        out = plan.apply(model, params, qp, spec, x, state=state, train=train, rng=rng)
        got = out[0] if train else out
        if isinstance(model, nnx.Module):
            m = nnx.merge(*nnx.split(model))
            m.train() if train else m.eval()
            want = m(x)
        else:
            want = _reference(name, model, kwargs, params, state, x, train, rng)
        assert got.shape == want.shape
        assert float(jnp.max(jnp.abs(got - want))) == 0.0, (name, train)


def _rules(name):
    """2-bit weights, 4-bit activations, 4X blocks on every covered layer."""
    q = dict(w_bits=2, a_bits=4, compression=4, scale_mode="learned", learn_clip=True)
    narrow = (4, 2)  # for matrix views 10 (classes) wide
    if name in ("transformer_lm", "nnx_encoder", "linen_lstm"):
        out = {"nnx_encoder": "classifier", "linen_lstm": "output"}
        shape = (2, 2) if name == "linen_lstm" else narrow  # an 8 x 10 view: 20 blocks
        head = [wrap.Rule(pattern=out[name], block_shape=shape, **q)] if name in out else []
        return [*head, wrap.Rule(pattern=".*", block_shape=(4, 4), **q)]
    head = {"linen_cnn": "Dense_1", "nnx_cnn": "linear2", "linen_resnet": "Dense_0"}.get(
        name, "linear"
    )
    stem = {"linen_cnn": "Conv_0", "nnx_cnn": "conv1"}.get(name, "conv_init")  # 9 x 4 view
    return [
        wrap.Rule(pattern=head, block_shape=narrow, **q),
        wrap.Rule(pattern=stem, block_shape=(1, 1), **q),
        wrap.Rule(pattern=".*", block_shape=(1, 4), **q),
    ]


@pytest.mark.parametrize("name", list(CASES))
def test_training_at_2_4_4x_prunes_quantizes_and_learns(name):
    factory, kwargs, batch = CASES[name]
    model = factory()
    x = batch(16, seed=5)
    lm = name == "transformer_lm"
    # Learnable targets: the next token a fixed function of the current one; the class a
    # linear function of the image.
    if lm:
        inp, y = x[:, 1:], (x[:, :-1] * 7 + 3) % 32
    else:
        proj = jax.random.normal(jax.random.key(7), (int(np.prod(x.shape[1:])), 10))
        inp, y = x, jnp.argmax(x.reshape(x.shape[0], -1) @ proj, -1)
    plan = wrap.make_plan(model, _rules(name), inp[:1], **kwargs)
    steps = 240
    sched = training.Schedule(total_steps=steps, prune_begin=60, prune_end=180, prune_every=20)
    spec = training.make_spec(plan.init_spec(), learning_rate=3e-3, prox_strength=1e-4)
    state = training.init_state(model, plan, sched, spec, jax.random.key(0), inp[:1])
    step = jax.jit(training.make_train_step(model, plan, sched))
    losses = []
    for _ in range(steps):
        state, m = step(state, (inp, y), spec)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-20:])
    q = plan.transform_params(
        state.params[training.PARAMS], state.params[training.QUANT], spec["layers"]
    )

    def zero_blocks(w, block_shape):
        (bm, bn), mat = block_shape, np.asarray(w).reshape(-1, w.shape[-1])
        blocks = mat.reshape(mat.shape[0] // bm, bm, -1, bn).swapaxes(1, 2)
        return np.all(blocks == 0, axis=(2, 3)).mean()

    for lname, lp in plan.layers.items():
        latent = wrap.get_path(state.params[training.PARAMS], lp.path)
        w = np.asarray(wrap.get_path(q, lp.path))
        # Pruning leaves exactly 1/4 of the blocks; 2-bit rounding may empty a few more.
        assert zero_blocks(latent, lp.rule.block_shape) == 0.75, lname
        assert zero_blocks(w, lp.rule.block_shape) >= 0.75, lname
        assert len(np.unique(w)) <= 2**2, lname
    # Evaluation uses the trained state (batch statistics) and the eval mode.
    logits = training.logits_fn(model, plan, state.params, spec, inp, state.model_state)
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("name", list(CASES))
def test_memory_counts_every_parameter_of_the_model(name):
    factory, kwargs, batch = CASES[name]
    model = factory()
    x = batch()
    plan = wrap.make_plan(model, _rules(name), x[:1], **kwargs)
    params, state = plan.init_variables(jax.random.key(0), x)
    m = plan.memory(plan.init_spec())
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert m["num_params"] == n_params
    assert sum(e["params"] for e in m["layers"].values()) == n_params
    covered = sum(int(np.prod(lp.kernel_shape)) for lp in plan.layers.values())
    assert covered < n_params  # biases, norms: counted beside the covered weights
    # Every weight is covered, inside remat or scan (an LSTM's cells) too.
    weights = {p for p in plan.params_shapes if p[-1] in ("kernel", "embedding")}
    assert {lp.path for lp in plan.layers.values()} == weights
    assert m["weight_memory_bits"] < m["fp32_weight_memory_bits"]


def test_boxed_params_keep_their_partitioning():
    model, eval_model = _lm()
    x = _tokens()
    plan = wrap.make_plan(model, [], x, eval_model=eval_model)
    params, _ = plan.init_variables(jax.random.key(0), x)
    assert not any(isinstance(v, nn.LogicallyPartitioned) for v in jax.tree.leaves(params))
    boxed = plan.boxed(params)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    names = {v.names for v in leaves}
    assert ("embed", "mlp") in names and ("vocab", "embed") in names


def test_batch_statistics_are_carried_and_used_by_evaluation():
    model = zoo.ResNet()
    x = _image_batch(8)
    plan = wrap.make_plan(model, [], x[:1])
    sched = training.Schedule(total_steps=3, prune_begin=3, prune_end=3)
    spec = training.make_spec(plan.init_spec(), learning_rate=1e-3)
    state = training.init_state(model, plan, sched, spec, jax.random.key(0), x[:1])
    before = state.model_state
    step = jax.jit(training.make_train_step(model, plan, sched))
    state, _ = step(state, (x, jnp.zeros(8, jnp.int32)), spec)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), before, state.model_state)
    assert max(jax.tree.leaves(moved)) > 0
    variables = {"params": state.params["params"], **state.model_state}
    want = model.apply(variables, x, train=False)
    got = training.logits_fn(model, plan, state.params, spec, x, state.model_state)
    assert float(jnp.max(jnp.abs(got - want))) == 0.0


def test_nnx_state_without_batch_statistics_is_refused_in_one_line():
    """RNG streams left out of an NNX state come from the module; statistics may not."""
    model = zoo.NNXResNet(rngs=nnx.Rngs(0))
    x = _image_batch()
    plan = wrap.make_plan(model, [], x)
    params, state = plan.init_variables(jax.random.key(0), x)
    qp = plan.init_qparams(params, plan.init_spec())
    blocks = {k: v for k, v in state["state"].items() if k != "bn_init"}
    with pytest.raises(ValueError, match=r"^state has no state/bn_init/mean: pass the model st"):
        plan.apply(model, params, qp, plan.init_spec(), x, state={"state": blocks})


@pytest.mark.parametrize("name", list(CASES))
def test_export_load_and_inference_give_the_trained_predictions(tmp_path, name):
    factory, kwargs, batch = CASES[name]
    model = factory()
    x = batch(8, seed=2)
    # Biases of the covered layers as int8 codes and a scale: trained, counted, stored so.
    rules = [dataclasses.replace(r, bias_bits=8) for r in _rules(name)]
    plan = wrap.make_plan(model, rules, x[:1], **kwargs)
    sched = training.Schedule(total_steps=4, prune_begin=1, prune_end=3, prune_every=1)
    spec = training.make_spec(plan.init_spec(), learning_rate=1e-2)
    state = training.init_state(model, plan, sched, spec, jax.random.key(0), x[:1])
    step = jax.jit(training.make_train_step(model, plan, sched))
    target = jnp.zeros(x.shape[:2] if name == "transformer_lm" else x.shape[:1], jnp.int32)
    for _ in range(sched.total_steps):  # pruned to 4X, batch statistics moved
        state, _ = step(state, (x, target), spec)
    want = training.logits_fn(model, plan, state.params, spec, x, state.model_state)
    info = export.save(
        tmp_path / "m.qsp", plan, state.params, spec, model=model, model_state=state.model_state
    )
    assert info["payload_bits"] == info["weight_memory_bits"]
    mem = plan.memory(
        spec["layers"],
        plan.transform_params(state.params["params"], state.params["quant"], spec["layers"]),
    )
    assert info["payload_bits"] == int(mem["weight_memory_bits"])
    r = export.restore(tmp_path / "m.qsp")
    int8 = [t for t in export.load(tmp_path / "m.qsp").manifest["tensors"] if "scale" in t]
    biases = [lp for lp in plan.layers.values() if plan.bias_path(lp) is not None]
    assert len(int8) == len(biases) > 0
    for lp in biases:  # at most 255 levels, and the restored values are the trained ones
        b = wrap.get_path(r.params, plan.bias_path(lp))
        assert len(np.unique(np.asarray(b))) <= 255
        trained = quant.quantize_bias(wrap.get_path(state.params["params"], plan.bias_path(lp)), 8)
        np.testing.assert_array_equal(np.asarray(b), np.asarray(trained))
    assert jax.tree.structure(r.params) == jax.tree.structure(state.params["params"])
    got = plan.apply(model, r.params, r.qparams, r.spec, x, state=r.model_state, quantized=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("name", ["linen_resnet", "nnx_resnet"])
def test_recalibrated_statistics_are_means_of_batch_statistics(name):
    """BatchNorm re-estimation at 2-bit weights: each moving average becomes the plain mean of
    its per-batch values (read off the model's own update, momentum 0.9 in tests/zoo.py)."""
    factory, kwargs, batch = CASES[name]
    model = factory()
    images = (255 * batch(24, seed=3)).astype(jnp.uint8)
    x = images[:1].astype(jnp.float32) / 255
    plan = wrap.make_plan(model, _rules(name), x, **kwargs)
    sched = training.Schedule(total_steps=4, prune_begin=4, prune_end=4)
    spec = training.make_spec(plan.init_spec(), learning_rate=1e-2)
    state = training.init_state(model, plan, sched, spec, jax.random.key(0), x)
    step = jax.jit(training.make_train_step(model, plan, sched))
    for _ in range(3):
        state, _ = step(state, (images[:8].astype(jnp.float32) / 255, jnp.arange(8) % 10), spec)
    key = jax.random.key(4)
    idx = np.asarray(jax.random.permutation(key, 24)).reshape(3, 8)
    batches = [images[rows].astype(jnp.float32) / 255 for rows in idx]
    got = training.make_recalibrate(model, plan)(state.params, spec, state.model_state, batches)
    old = state.model_state
    values = []
    apply = jax.jit(
        lambda x: plan.apply(
            model,
            state.params[training.PARAMS],
            state.params[training.QUANT],
            spec["layers"],
            x,
            state=old,
            train=True,
            rng=jax.random.key(0),
        )[1]
    )
    for x in batches:
        values.append(jax.tree.map(lambda n, o: (n - 0.9 * o) / 0.1, apply(x), old))
    want = jax.tree.map(lambda *v: sum(v) / 3, *values)
    for g, w, o in zip(*(jax.tree.leaves(t) for t in (got, want, old)), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
        assert not np.allclose(g, o)  # the moving averages were replaced
    with pytest.raises(ValueError, match="batches is empty"):
        training.make_recalibrate(model, plan)(state.params, spec, state.model_state, [])
