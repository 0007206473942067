"""Packed export: bit packing, code round trips, payload = memory model, inference, errors."""

import importlib.util
import json
import pathlib
import struct
import subprocess
import sys
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import data, export, models, sparsity, training, wrap
from qsparse import memory as mem

ROOT = pathlib.Path(__file__).resolve().parents[1]
DECODER = ROOT / "tools" / "decode_numpy.py"


def _decoder():
    spec = importlib.util.spec_from_file_location("decode_numpy", DECODER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _random_params(shapes, seed):
    """LeCun-normal kernels and small non-zero biases, drawn with numpy.

    ``model.init`` would do, but compiling its random initialisers costs seconds on a CPU.
    """
    rng = np.random.default_rng(seed)

    def draw(kp, sd):
        if "bias" in str(kp[-1]):
            return rng.normal(0.0, 0.1, sd.shape).astype(np.float32)
        fan_in = int(np.prod(sd.shape[:-1]))
        return (rng.normal(0.0, 1.0, sd.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _masked_params(plan, params, spec):
    """Zeroes the smallest blocks of each block-sparse kernel, as training's pruning does.

    numpy, not sparsity.block_mask: it saves compilations, and any block choice will do here.
    """
    out = jax.tree.map(np.asarray, params)
    for name, lp in plan.layers.items():
        if lp.rule.block_shape is None:
            continue
        w = out[name]["kernel"]
        (bm, bn), (m, n) = lp.rule.block_shape, sparsity.matrix_shape(w.shape)
        norms = np.sqrt(np.square(w.reshape(m // bm, bm, n // bn, bn)).sum(axis=(1, 3)))
        keep = np.zeros(norms.size, np.float32)
        keep[np.argsort(-norms, axis=None)[: -(-norms.size // int(spec[name]["compression"]))]] = 1
        mask = np.kron(keep.reshape(norms.shape), np.ones((bm, bn), np.float32))
        out[name]["kernel"] = w * mask.reshape(w.shape)
    return out


class _Net:
    """A plan with jitted init, quantizer, memory model and logits, compiled once per plan.

    Settings (bits, compression) are spec values, so every case reuses the same programs.
    """

    def __init__(self, model, rules, x_shape):
        self.model, self.x_shape = model, x_shape
        x0 = jnp.zeros((1, *x_shape))
        self.plan = plan = wrap.make_plan(model, rules, x0)
        self._shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x0)["params"])
        self._quantize = jax.jit(lambda t, s: plan.transform_params(t["params"], t["quant"], s))
        self._memory = jax.jit(lambda s, q: plan.memory(s, q)["weight_memory_bits"])
        self._logits = jax.jit(lambda p, s, x: training.logits_fn(model, plan, p, {"layers": s}, x))

    def spec(self, **layers):
        """The rules' spec with ``layer={"w_bits": .., ...}`` entries overridden."""
        spec = self.plan.init_spec()
        for name, vals in layers.items():
            spec[name] = dict(spec[name], **{k: jnp.float32(v) for k, v in vals.items()})
        return spec

    def tree(self, spec, seed=0):
        """Random params with pruned blocks and non-zero biases, and their quantizer params."""
        params = _masked_params(self.plan, _random_params(self._shapes, seed), spec)
        return {"params": params, "quant": self.plan.init_qparams(params, spec)}

    def quantized(self, tree, spec):
        """Layer -> the fake-quantized kernel the trained model uses."""
        q = self._quantize(tree, spec)
        return {name: np.asarray(q[name]["kernel"]) for name in self.plan.layers}

    def memory_bits(self, tree, spec):
        """The memory model on the fake-quantized kernels."""
        return int(self._memory(spec, self._quantize(tree, spec)))

    def logits(self, tree, spec, x):
        return np.asarray(self._logits(tree, spec, x))


# ---- bit packing ---------------------------------------------------------------------------


def test_pack_bits_is_lsb_first_continuous_stream():
    assert export.pack_bits([1, 2, 3, 0], 2) == bytes([0b00111001])
    assert export.pack_bits([1, 0, 0, 0, 0, 0, 0, 1, 1], 1) == bytes([0b10000001, 0b1])
    # 3-bit codes cross byte boundaries: 5=101, 6=110, 7=111 -> stream 1010 1111 1.
    assert export.pack_bits([5, 6, 7], 3) == bytes([0b11110101, 0b00000001])
    rng = np.random.default_rng(0)
    for bits in range(1, 17):
        v = rng.integers(0, 2**bits, 37)
        buf = export.pack_bits(v, bits)
        assert len(buf) == (37 * bits + 7) // 8
        np.testing.assert_array_equal(export.unpack_bits(buf, bits, 37), v)
    with pytest.raises(ValueError, match="do not fit"):
        export.pack_bits([4], 2)


def test_code_levels_per_bit_width():
    np.testing.assert_array_equal(export.code_levels([0, 1], 1), [-1, 1])
    np.testing.assert_array_equal(export.code_levels([1, 2, 3], 2), [-1, 0, 1])
    np.testing.assert_array_equal(export.code_levels([1, 4, 7], 3), [-3, 0, 3])
    np.testing.assert_array_equal(export.code_levels([0, 3], 2, zero_level=False), [-1.5, 1.5])
    np.testing.assert_array_equal(export.unsigned_codes([-1, 1], 1), [0, 1])
    np.testing.assert_array_equal(export.unsigned_codes([-127, 0, 127], 8), [1, 128, 255])
    np.testing.assert_array_equal(export.signed_codes([0, 1], 1), [-1, 1])
    np.testing.assert_array_equal(export.signed_codes([1, 4, 7], 3), [-3, 0, 3])


# ---- round trips ---------------------------------------------------------------------------

# Dense_0: 16x32 on 4x4 blocks (4 x 8 grid, bitmap wins); Dense_1: 32x256 on 16x4 blocks
# (2 x 64 grid: block-CSR wins at 8X); Dense_2: the logits, 8-bit, not sparse.
MLP = models.MLP(hidden=(32, 256), num_classes=10)
MLP_RULES = [  # a_bits: each layer's input; the first reads the data as it is
    wrap.Rule(pattern="Dense_0", w_bits=2, block_shape=(4, 4), compression=2),
    wrap.Rule(pattern="Dense_1", w_bits=2, a_bits=2, block_shape=(16, 4), compression=2),
    wrap.Rule(pattern="Dense_2", w_bits=8, a_bits=2),
]


@pytest.fixture(scope="module")
def mlp():
    return _Net(MLP, MLP_RULES, (16,))


def _mlp_spec(net, bits, compression):
    vals = {"w_bits": bits, "compression": compression}
    return net.spec(Dense_0=vals, Dense_1={**vals, "a_bits": bits}, Dense_2={"a_bits": bits})


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("w_bits", 0, "Dense_0.w_bits=0 is not allowed"),
        ("w_bits", 2.5, "Dense_0.w_bits=2.5 is not allowed"),
        ("a_bits", -3, "Dense_0.a_bits=-3 is not allowed"),
        ("compression", 0.5, "Dense_0.compression=0.5 is not allowed"),
    ],
)
def test_bad_spec_values_are_refused_and_nothing_is_written(tmp_path, mlp, field, value, message):
    spec = mlp.spec(Dense_0={field: value})
    tree = mlp.tree(mlp.spec())
    with pytest.raises(ValueError, match=message) as e:
        export.save(tmp_path / "m.qsp", mlp.plan, tree, spec, model=MLP)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("compression", [1, 2, 4, 8])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_round_trip_codes_and_payload_size(tmp_path, mlp, bits, compression):
    plan, spec = mlp.plan, _mlp_spec(mlp, bits, compression)
    tree = mlp.tree(spec)
    info = export.save(tmp_path / "m.qsp", plan, tree, spec, model=MLP)
    packed = export.load(tmp_path / "m.qsp")

    q = mlp.quantized(tree, spec)
    for name, lay in packed.layers.items():
        # Bit-exact at every bit width (1-bit included): the decoded kernels are the
        # fake-quantized kernels, pruned blocks exact zeros.
        np.testing.assert_array_equal(lay.kernel, q[name])
        np.testing.assert_array_equal(lay.bias, np.asarray(tree["params"][name]["bias"]))

    # The payload is the memory model, up to byte rounding of each array.
    n_arrays = len(packed.manifest["arrays"])
    assert info["payload_bits"] == info["weight_memory_bits"] == mlp.memory_bits(tree, spec)
    assert 0 <= 8 * info["payload_bytes"] - info["weight_memory_bits"] < 8 * n_arrays
    assert info["file_bytes"] == (tmp_path / "m.qsp").stat().st_size
    assert info["file_bytes"] == info["header_bytes"] + info["payload_bytes"]
    # Stored blocks: exactly those not all zero after quantization.
    raw_same = True
    for name, lay in packed.layers.items():
        bm, bn = lay.entry["block_shape"]
        (m, n), (r, c) = lay.entry["matrix_shape"], lay.entry["block_grid"]

        def nonzero(w, bm=bm, bn=bn, m=m, n=n):
            return np.any(w.reshape(m // bm, bm, n // bn, bn) != 0, axis=(1, 3))

        np.testing.assert_array_equal(lay.keep, nonzero(q[name]))
        raw = nonzero(np.asarray(tree["params"][name]["kernel"]))
        # Pruned blocks stay zero at every bit width; a zero level may empty a small block.
        assert np.all(lay.keep <= raw)
        raw_same &= bool(np.all(lay.keep == raw))
        index_bits, is_csr = mem.index_bits((r, c), int(lay.keep.sum()))
        want = "none" if not index_bits else ("csr" if is_csr else "bitmap")
        assert lay.entry["index"] == want
    want = {1: "none", 8: "csr"}.get(compression, "bitmap")  # 8X: CSR beats the bitmap
    assert packed.layers["Dense_1"].entry["index"] == want
    if raw_same:
        assert info["memory_model_bits_params"] == info["weight_memory_bits"]
        assert int(plan.memory(spec)["weight_memory_bits"]) == info["weight_memory_bits"]
    x = jax.random.uniform(jax.random.key(1), (16, 16))
    got, ref = packed.predict(x), mlp.logits(tree, spec, x)
    assert np.max(np.abs(got - ref)) <= 1e-5


def test_round_trip_scale_modes_per_channel_midrise_and_float_layers(tmp_path):
    rules = [
        wrap.Rule(
            pattern="Dense_0",
            w_bits=3,
            block_shape=(4, 4),
            compression=2,
            scale_mode="learned",
            per_channel=True,
        ),
        wrap.Rule(
            pattern="Dense_1",
            w_bits=4,
            a_bits=4,
            block_shape=(16, 4),
            compression=8,
            scale_mode="mean",
            zero_level=False,
        ),
        wrap.Rule(pattern="Dense_2", w_bits=32, block_shape=(4, 2), compression=4),
    ]
    net = _Net(MLP, rules, (16,))
    plan, spec = net.plan, net.spec()
    tree = net.tree(spec, seed=3)
    info = export.save(tmp_path / "m.qsp", plan, tree, spec)  # model=None: an MLP chain
    packed = export.load(tmp_path / "m.qsp")
    q = net.quantized(tree, spec)
    for name, lay in packed.layers.items():
        np.testing.assert_array_equal(lay.kernel, q[name])
    d0, d1, d2 = (packed.layers[f"Dense_{i}"] for i in range(3))
    assert d0.scale.shape == (32,) and d0.a_clip is not None
    step = np.abs(np.asarray(tree["quant"]["Dense_0"]["w_step"]))
    np.testing.assert_array_equal(d0.scale, np.maximum(step, np.float32(1e-8)))  # as quant.py
    assert d1.a_clip is None and d1.entry["a_bits"] == 32
    # Mid-rise has no zero level, but pruned (exactly zero) weights stay zero: 128 blocks at 8X.
    assert d1.entry["kept_blocks"] == 16 and d1.entry["index"] == "csr"
    # Float32 layer: raw weights of the kept blocks, 320 blocks at 4X -> 80.
    assert d2.codes is None and d2.scale is None and d2.entry["kept_blocks"] == 80
    assert info["payload_bits"] == info["weight_memory_bits"] == net.memory_bits(tree, spec)
    x = jax.random.uniform(jax.random.key(2), (8, 16))
    assert np.max(np.abs(packed.predict(x) - net.logits(tree, spec, x))) <= 1e-5


@pytest.mark.parametrize(
    "model,x_shape",
    [
        (models.LeNet(channels=(4, 8), hidden=16), (8, 8, 1)),
        (models.VGG(stages=(4,), hidden=16), (16, 16, 1)),  # 8x8 left: global mean head
    ],
)
def test_conv_models_predict_like_the_trained_model(tmp_path, model, x_shape):
    rules = [
        wrap.Rule(pattern="Conv_0", w_bits=4, block_shape=(1, 4), compression=2),
        wrap.Rule(pattern="Conv_1", a_bits=3),
        wrap.Rule(pattern="Dense_0", w_bits=2, block_shape=(4, 4), compression=4),
        wrap.Rule(pattern="Dense_1", a_bits=2),
    ]
    net = _Net(model, rules, x_shape)
    plan, spec = net.plan, net.spec()
    tree = net.tree(spec)
    info = export.save(tmp_path / "c.qsp", plan, tree, spec, model=model, input_shape=x_shape)
    packed = export.load(tmp_path / "c.qsp")
    conv = packed.layers["Conv_0"].entry
    assert conv["kind"] == "conv" and conv["strides"] == [1, 1]
    k = conv["kernel_shape"][0]
    assert conv["pads"] == [[k // 2, k // 2]] * 2  # SAME at stride 1
    ops = [op["op"] for op in packed.graph]
    assert "max_pool" in ops and ("mean" in ops) == isinstance(model, models.VGG)
    assert info["payload_bits"] == info["weight_memory_bits"] == net.memory_bits(tree, spec)
    x = jax.random.uniform(jax.random.key(4), (6, *x_shape))
    ref = net.logits(tree, spec, x)
    assert np.max(np.abs(packed.predict(x) - ref)) <= 1e-5
    np.testing.assert_allclose(_decoder().predict(str(tmp_path / "c.qsp"), x), ref, atol=1e-4)


class _Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x.reshape((x.shape[0], -1))))
        return nn.Dense(4)(x)


def test_other_models_are_written_whole_or_with_a_graph(tmp_path):
    model = _Custom()
    rules = [wrap.Rule(pattern="Dense_0", w_bits=2), wrap.Rule(pattern="Dense_1", a_bits=2)]
    net = _Net(model, rules, (2, 2))
    spec = net.spec()
    tree = net.tree(spec)
    path = tmp_path / "m.qsp"
    x = jax.random.uniform(jax.random.key(0), (5, 2, 2))
    # Without a graph: the model layout, run through the model itself after restore().
    export.save(path, net.plan, tree, spec, model=model)
    packed = export.load(path)
    assert packed.graph is None and packed.manifest["layout"] == "model"
    with pytest.raises(ValueError, match="without a graph"):
        packed.predict(x)
    with pytest.raises(ValueError, match="model layout"):
        _decoder().predict(str(path), np.asarray(x))
    r = export.restore(path)
    got = net.plan.apply(model, r.params, r.qparams, r.spec, x, quantized=True)
    np.testing.assert_array_equal(np.asarray(got), net.logits(tree, spec, x))
    # With a graph: the graph layout, which PackedModel and the numpy decoder run.
    wrong = [{"op": "dense", "layer": "Dense_0"}, {"op": "dense", "layer": "Dense_1"}]
    with pytest.raises(ValueError, match="input shape"):
        export.save(path, net.plan, tree, spec, model=model, input_shape=(2, 2), graph=wrong)
    graph = [{"op": "flatten"}, wrong[0], {"op": "relu"}, wrong[1]]
    export.save(path, net.plan, tree, spec, model=model, input_shape=(2, 2), graph=graph)
    assert np.max(np.abs(export.load(path).predict(x) - net.logits(tree, spec, x))) <= 1e-5


class _Bf16(nn.Module):
    """Parameters and compute in bfloat16, as memory-bound fine-tuning keeps them."""

    @nn.compact
    def __call__(self, x):
        d = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        x = nn.relu(nn.Dense(16, **d)(x))
        return nn.Dense(4, **d)(x).astype(jnp.float32)


def test_bfloat16_parameters_restore_to_the_trained_predictions(tmp_path):
    model = _Bf16()
    x = jax.random.normal(jax.random.key(0), (16, 8))
    q = dict(w_bits=2, a_bits=4, scale_mode="learned", learn_clip=True)
    rules = [wrap.Rule(pattern=".*", block_shape=(4, 4), compression=2, **q)]
    plan = wrap.make_plan(model, rules, x[:1])
    sched = training.Schedule(total_steps=6, prune_begin=1, prune_end=4, prune_every=1)
    spec = training.make_spec(plan.init_spec(), learning_rate=1e-2)
    state = training.init_state(model, plan, sched, spec, jax.random.key(1), x[:1])
    step = jax.jit(training.make_train_step(model, plan, sched))
    for _ in range(sched.total_steps):
        state, _ = step(state, (x, jnp.arange(16) % 4), spec)
    want = training.logits_fn(model, plan, state.params, spec, x, state.model_state)
    export.save(tmp_path / "b.qsp", plan, state.params, spec, model=model)
    packed = export.load(tmp_path / "b.qsp")
    assert [lay["dtype"] for lay in packed.manifest["layers"]] == ["bfloat16"] * 2
    r = export.restore(packed)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(r.params))
    got = plan.apply(model, r.params, r.qparams, r.spec, x, quantized=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---- a trained digits model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    ds = data.load("digits")
    model = models.MLP(hidden=(64, 32))
    rules = [
        wrap.Rule(
            pattern="Dense_0",
            w_bits=2,
            block_shape=(8, 8),
            compression=4,
            scale_mode="learned",
            bias_bits=8,
        ),
        wrap.Rule(
            pattern="Dense_1", w_bits=3, a_bits=2, block_shape=(8, 8), compression=2, bias_bits=8
        ),
        wrap.Rule(pattern="Dense_2", w_bits=8, a_bits=3),
    ]
    x0 = jnp.zeros((1, 8, 8, 1))
    plan = wrap.make_plan(model, rules, x0)
    epochs, steps = 20, len(ds.train_y) // 64
    sched = training.Schedule(
        total_steps=epochs * steps, prune_begin=2 * steps, prune_end=12 * steps, prune_every=11
    )
    spec = training.make_spec(plan.init_spec(), learning_rate=1e-2, prox_strength=1e-3)
    # training.init_state, with numpy parameters instead of model.init (see _random_params).
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x0)["params"])
    params = _random_params(shapes, 0)
    tree = {"params": params, "quant": plan.init_qparams(params, spec["layers"])}
    opt_state = training.make_optimizer(plan, sched, spec).init(tree)
    state = training.TrainState(step=jnp.zeros([], jnp.int32), params=tree, opt_state=opt_state)
    epoch = jax.jit(training.make_train_epoch(model, plan, sched, 64))
    tx, ty = jnp.asarray(ds.train_x), jnp.asarray(ds.train_y)
    for e in range(epochs):
        state, _ = epoch(state, tx, ty, jax.random.key(e), spec)
    ev = jax.jit(training.make_eval(model, plan))(
        state.params, spec, jnp.asarray(ds.test_x), jnp.asarray(ds.test_y)
    )
    path = tmp_path_factory.mktemp("digits") / "digits.qsp"
    info = export.save(path, plan, state.params, spec["layers"], model=model, input_shape=(8, 8, 1))
    return {
        "ds": ds,
        "model": model,
        "plan": plan,
        "spec": spec,
        "state": state,
        "accuracy": float(ev["accuracy"]),
        "path": path,
        "info": info,
    }


def test_trained_model_payload_equals_memory_model(digits_model):
    d = digits_model
    memory = d["plan"].memory(d["spec"]["layers"], d["state"].params["params"])
    bits, info = int(memory["weight_memory_bits"]), d["info"]
    assert info["payload_bits"] == bits == info["memory_model_bits_params"]
    assert 0 <= info["payload_bytes"] * 8 - bits < 8 * 13  # 13 arrays, each rounded up
    # Dense_0 and Dense_1 store int8 biases and a scale, Dense_2 float32 ones.
    n0, n1, n2 = (d["plan"].layers[f"Dense_{i}"].kernel_shape[-1] for i in range(3))
    assert int(memory["other_bits"]) == 8 * (n0 + n1) + 32 * n2
    manifest = export.load(d["path"]).manifest
    assert [lay["bias_bits"] for lay in manifest["layers"]] == [8, 8, 32]
    assert info["fp32_bytes"] == int(memory["fp32_weight_memory_bits"]) // 8
    assert info["compression"] > 10
    assert all(v["kept_blocks"] < v["blocks"] for k, v in info["layers"].items() if k != "Dense_2")


def test_trained_model_packed_inference_is_identical(digits_model):
    d = digits_model
    ds = d["ds"]
    packed = export.load(d["path"])
    x = jnp.asarray(ds.test_x).astype(jnp.float32) / 255.0
    ref = jax.jit(lambda p, x: training.logits_fn(d["model"], d["plan"], p, d["spec"], x))(
        d["state"].params, x
    )
    got = packed.predict(x)
    assert np.max(np.abs(got - ref)) <= 1e-5
    assert packed.accuracy(ds.test_x, ds.test_y) == pytest.approx(d["accuracy"], abs=1e-6)
    assert d["accuracy"] > 0.7


def test_numpy_decoder_reproduces_accuracy(digits_model, tmp_path, capsys):
    d = digits_model
    ds = d["ds"]
    x = ds.test_x.astype(np.float32) / np.float32(255.0)
    logits = _decoder().predict(str(d["path"]), x)
    acc = float(np.mean(np.argmax(logits, -1) == ds.test_y))
    assert abs(acc - d["accuracy"]) <= 0.001
    npz = tmp_path / "test.npz"
    np.savez(npz, x=ds.test_x, y=ds.test_y)
    out = subprocess.run(
        [sys.executable, str(DECODER), str(d["path"]), "--npz", str(npz)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert abs(json.loads(out.stdout)["accuracy"] - d["accuracy"]) <= 0.001
    # The same from IDX files (MNIST's layout: big-endian header, then uint8 data).
    idx = tmp_path / "idx"
    idx.mkdir()
    images = ds.test_x[..., 0]
    (idx / "t10k-images-idx3-ubyte").write_bytes(
        struct.pack(">BBBBIII", 0, 0, 8, 3, *images.shape) + images.tobytes()
    )
    (idx / "t10k-labels-idx1-ubyte").write_bytes(
        struct.pack(">BBBBI", 0, 0, 8, 1, len(ds.test_y)) + ds.test_y.astype(np.uint8).tobytes()
    )
    assert _decoder().main([str(d["path"]), "--idx-dir", str(idx)]) == 0
    assert abs(json.loads(capsys.readouterr().out)["accuracy"] - d["accuracy"]) <= 0.001


# ---- errors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_file(mlp, tmp_path_factory):
    spec = _mlp_spec(mlp, 3, 4)
    path = tmp_path_factory.mktemp("small") / "s.qsp"
    export.save(path, mlp.plan, mlp.tree(spec), spec, model=MLP)
    return path.read_bytes()


def _load_bytes(tmp_path, data):
    p = tmp_path / "x.qsp"
    p.write_bytes(data)
    return export.load(p)


def _split(data):
    m = struct.unpack_from("<I", data, 12)[0]
    return json.loads(data[32 : 32 + m]), data[32 + m :]


def _rewrite(data, manifest):
    """Re-assembles a file with a changed manifest and correct CRCs."""
    _, payload = _split(data)
    man = json.dumps(manifest).encode()
    header = struct.pack(
        "<8sIIIQI",
        export.MAGIC,
        export.VERSION,
        len(man),
        zlib.crc32(man),
        len(payload),
        zlib.crc32(payload),
    )
    return header + man + payload


def test_bad_magic_and_version(tmp_path, small_file):
    with pytest.raises(export.FormatError, match="bad magic"):
        _load_bytes(tmp_path, b"PK\x03\x04" + small_file[4:])
    bad = bytearray(small_file)
    bad[8:12] = struct.pack("<I", 2)
    with pytest.raises(export.FormatError, match="version 2 is not supported"):
        _load_bytes(tmp_path, bytes(bad))
    dn = _decoder()
    (tmp_path / "v.qsp").write_bytes(bytes(bad))
    with pytest.raises(dn.DecodeError, match="version"):
        dn.predict(str(tmp_path / "v.qsp"), np.zeros((1, 16)))


@pytest.mark.parametrize("cut", [0, 5, 31, 100, -1, -200])
def test_truncated(tmp_path, small_file, cut):
    with pytest.raises(export.FormatError, match="truncated"):
        _load_bytes(tmp_path, small_file[:cut])


def test_corrupted_payload_manifest_and_trailing_bytes(tmp_path, small_file):
    bad = bytearray(small_file)
    bad[-3] ^= 0x10
    with pytest.raises(export.FormatError, match="corrupted payload.*Dense_2/bias"):
        _load_bytes(tmp_path, bytes(bad))
    bad = bytearray(small_file)
    bad[40] ^= 0x01
    with pytest.raises(export.FormatError, match="corrupted manifest"):
        _load_bytes(tmp_path, bytes(bad))
    with pytest.raises(export.FormatError, match="trailing"):
        _load_bytes(tmp_path, small_file + b"\0")


def test_manifest_disagreeing_with_arrays(tmp_path, small_file):
    manifest, _ = _split(small_file)
    m = json.loads(json.dumps(manifest))
    m["arrays"][0]["nbytes"] += 1
    with pytest.raises(export.FormatError, match="nbytes"):
        _load_bytes(tmp_path, _rewrite(small_file, m))
    m = json.loads(json.dumps(manifest))
    m["layers"][1]["kept_blocks"] -= 1
    with pytest.raises(export.FormatError, match="Dense_1"):
        _load_bytes(tmp_path, _rewrite(small_file, m))
    m = json.loads(json.dumps(manifest))
    m["arrays"][1]["offset"] += 1
    with pytest.raises(export.FormatError, match="offset"):
        _load_bytes(tmp_path, _rewrite(small_file, m))
    m = json.loads(json.dumps(manifest))
    del m["layers"][0]["arrays"]["w_scale"]
    with pytest.raises(export.FormatError, match="w_scale"):
        _load_bytes(tmp_path, _rewrite(small_file, m))
    # The unchanged manifest re-assembled loads fine (the rewriting itself is sound).
    _load_bytes(tmp_path, _rewrite(small_file, manifest))
