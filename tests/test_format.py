"""docs/FORMAT.md against the code: CRC, input conversion, digits data, graph checks, meta."""

import json
import pathlib
import re
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_export import _decoder

from qsparse import data, export, models, wrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "FORMAT.md").read_text()


def _flat(text: str) -> str:
    return " ".join(text.split())


def _code_block_after(marker: str) -> str:
    """The first ```python block after ``marker`` in the document."""
    rest = DOC[DOC.index(marker) :]
    return re.search(r"```python\n(.*?)```", rest, re.S).group(1)


# ---- section 1: CRC32 ------------------------------------------------------------------------


def _reflected_crc(data: bytes, poly: int, init: int, xorout: int) -> int:
    crc = init
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (poly if crc & 1 else 0)
    return crc ^ xorout


def test_crc_statement_matches_zlib():
    text = _flat(DOC)
    poly = int(re.search(r"reflected polynomial `(0x[0-9A-F]+)`", text).group(1), 16)
    init = int(re.search(r"register initialised to `(0x[0-9A-F]+)`", text).group(1), 16)
    xorout = int(re.search(r"final xor `(0x[0-9A-F]+)`", text).group(1), 16)
    check = int(re.search(r"`123456789` is `(0x[0-9A-F]+)`", text).group(1), 16)
    assert (poly, init, xorout, check) == (0xEDB88320, 0xFFFFFFFF, 0xFFFFFFFF, 0xCBF43926)
    assert zlib.crc32(b"123456789") == check
    ns: dict = {}
    exec(_code_block_after("Bit by bit:"), ns)
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 3, 7, 64, 1000):
        buf = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _reflected_crc(buf, poly, init, xorout) == zlib.crc32(buf) == ns["crc32"](buf)


# ---- section 2: uint8 -> input ---------------------------------------------------------------


def test_decoder_input_conversion_matches_normalize_bit_for_bit():
    u8 = np.arange(256, dtype=np.uint8)
    want = np.asarray(data.normalize(jnp.asarray(u8))).view(np.uint32)
    jitted = np.asarray(jax.jit(data.normalize)(jnp.asarray(u8))).view(np.uint32)
    got = _decoder().uint8_to_input(u8, 1.0 / 255.0).view(np.uint32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jitted, want)
    # The reference reader's accuracy() converts the same way.
    packed_x = np.asarray(jnp.asarray(u8).astype(jnp.float32) / 255.0).view(np.uint32)
    np.testing.assert_array_equal(packed_x, want)
    # The document's statements: the float32 scale, and division rounding otherwise.
    text = _flat(DOC)
    assert "`0x3B808081`" in text and "126 of the 256 byte values" in text
    assert np.float32(1.0 / 255.0).view(np.uint32) == 0x3B808081
    divided = (u8.astype(np.float32) / np.float32(255)).view(np.uint32)
    assert int(np.sum(divided != want)) == 126


# ---- section 12: digits ----------------------------------------------------------------------


def test_digits_uint8_table_and_split_as_documented():
    from sklearn.datasets import load_digits

    digits = load_digits()
    row = re.search(r"\| `u8` \|([^\n]*)", DOC).group(1)
    table = [int(v) for v in row.strip(" |").split("|")]
    assert table == [int(np.round(v * 255.0 / 16.0)) for v in range(17)]
    u8 = np.asarray(table, np.uint8)[digits.images.astype(int)][..., None]
    ns = {"np": np, "sklearn": __import__("sklearn.datasets")}
    exec(_code_block_after("The digits test split"), ns)
    test = ns["test"]
    ds = data.load("digits")
    assert len(test) == 360 and np.all(np.diff(test) > 0)
    np.testing.assert_array_equal(u8[test], ds.test_x)
    np.testing.assert_array_equal(digits.target[test], ds.test_y)


# ---- section 8: the graph must describe the model --------------------------------------------


def _tree(plan, model, x_shape, spec, seed=0):
    """Random parameters (numpy, no initialiser compilations) and their quantizer params."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *x_shape))))
    rng = np.random.default_rng(seed)

    def draw(kp, sd):
        if "bias" in str(kp[-1]):
            return rng.normal(0.0, 0.1, sd.shape).astype(np.float32)
        return (rng.normal(0.0, 1.0, sd.shape) / np.sqrt(np.prod(sd.shape[:-1]))).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    return {"params": params, "quant": plan.init_qparams(params, spec)}


def _setup(model, rules, x_shape):
    plan = wrap.make_plan(model, rules, jnp.zeros((1, *x_shape)))
    spec = plan.init_spec()
    return plan, spec, _tree(plan, model, x_shape, spec)


MLP = models.MLP(hidden=(16, 16), num_classes=4)
FLOAT_ACT = [wrap.Rule(pattern="Dense_[01]", w_bits=4, a_bits=32), wrap.Rule(pattern="Dense_2")]
MLP_GRAPH = [
    {"op": "flatten"},
    {"op": "dense", "layer": "Dense_0"},
    {"op": "relu"},
    {"op": "dense", "layer": "Dense_1"},
    {"op": "relu"},
    {"op": "dense", "layer": "Dense_2"},
]


def _refused(path, *args, **kw) -> str:
    with pytest.raises(ValueError) as e:
        export.save(path, *args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "graph does not describe the model" in msg
    assert not path.exists() and not path.with_name(path.name + ".tmp").exists()
    return msg


@pytest.mark.parametrize("model", [MLP, None])
def test_wrong_graph_of_the_right_shapes_is_refused(tmp_path, model):
    plan, spec, tree = _setup(MLP, FLOAT_ACT, (4, 4, 1))
    kw = {"model": model, "input_shape": (4, 4, 1)}
    path = tmp_path / "m.qsp"
    export.save(path, plan, tree, spec, graph=MLP_GRAPH, **kw)  # the right graph
    path.unlink()
    no_relu = [op for op in MLP_GRAPH if op["op"] != "relu"]
    msg = _refused(path, plan, tree, spec, graph=no_relu, **kw)
    assert "flatten, dense Dense_0, dense Dense_1, dense Dense_2" in msg
    _refused(path, plan, tree, spec, graph=[*MLP_GRAPH, {"op": "relu"}], **kw)


def test_equivalent_graph_is_accepted(tmp_path):
    # Another description of the same function: a second relu, a second flatten.
    plan, spec, tree = _setup(MLP, FLOAT_ACT, (4, 4, 1))
    same = [MLP_GRAPH[0], MLP_GRAPH[0], *MLP_GRAPH[1:3], {"op": "relu"}, *MLP_GRAPH[3:]]
    path = tmp_path / "m.qsp"
    export.save(path, plan, tree, spec, model=MLP, input_shape=(4, 4, 1), graph=same)
    packed = export.load(path)
    assert packed.graph == same
    x = jax.random.uniform(jax.random.key(0), (8, 4, 4, 1))
    ref = plan.apply(MLP, tree["params"], tree["quant"], spec, x)
    assert np.max(np.abs(packed.predict(x) - np.asarray(ref))) <= 1e-5


def test_wrong_pooling_of_the_same_shape_is_refused(tmp_path):
    model = models.LeNet(channels=(4, 8), hidden=16)
    rules = [wrap.Rule(pattern="Conv_0", w_bits=4, a_bits=32), wrap.Rule(pattern="Dense_.*")]
    plan, spec, tree = _setup(model, rules, (8, 8, 1))
    path = tmp_path / "c.qsp"
    export.save(path, plan, tree, spec, model=model, input_shape=(8, 8, 1))
    graph = export.load(path).graph
    path.unlink()
    # Window 1 at stride 2 keeps the shapes of the 2x2 max-pool but subsamples instead.
    wrong = [dict(op, window=[1, 1]) if op["op"] == "max_pool" else op for op in graph]
    _refused(path, plan, tree, spec, model=model, input_shape=(8, 8, 1), graph=wrong)
    # A layer order other than the model's is refused on its own.
    swapped = list(graph)
    i, j = (k for k, op in enumerate(graph) if op.get("layer") in ("Dense_0", "Dense_1"))
    swapped[i], swapped[j] = graph[j], graph[i]
    with pytest.raises(ValueError, match="graph") as e:
        export.save(path, plan, tree, spec, model=model, input_shape=(8, 8, 1), graph=swapped)
    assert "\n" not in str(e.value)


def _with_graph(raw: bytes, graph) -> bytes:
    m = struct.unpack_from("<I", raw, 12)[0]
    manifest, payload = json.loads(raw[32 : 32 + m]), raw[32 + m :]
    manifest["graph"] = graph
    man = json.dumps(manifest).encode()
    head = struct.pack(
        "<8sIIIQI", export.MAGIC, 1, len(man), zlib.crc32(man), len(payload), zlib.crc32(payload)
    )
    return head + man + payload


@pytest.mark.parametrize(
    "graph,match",
    [
        (MLP_GRAPH[1:], "takes"),  # no flatten: Dense_0 gets (N, 4, 4, 1)
        (MLP_GRAPH[:3] + MLP_GRAPH[1:], "runs layers"),  # Dense_0 twice
        ([*MLP_GRAPH[:5], {"op": "dense", "layer": "Dense_0"}], "runs layers|takes"),
        ([*MLP_GRAPH, {"op": "softmax"}], "not allowed"),
        ([*MLP_GRAPH[:2], {"op": "mean", "axes": [0]}, *MLP_GRAPH[2:]], "axes"),
        ([*MLP_GRAPH, {"op": "flatten"}, {"op": "mean", "axes": [1]}], "ends with shape"),
        ([*MLP_GRAPH[:2], {"op": "conv", "layer": "Dense_1"}], "names no conv layer"),
    ],
)
def test_reader_refuses_a_graph_that_does_not_fit_the_layers(tmp_path, graph, match):
    plan, spec, tree = _setup(MLP, FLOAT_ACT, (4, 4, 1))
    path = tmp_path / "m.qsp"
    export.save(path, plan, tree, spec, model=MLP, input_shape=(4, 4, 1))
    path.write_bytes(_with_graph(path.read_bytes(), graph))
    with pytest.raises(export.FormatError, match=match) as e:
        export.load(path)
    assert "\n" not in str(e.value)


# ---- meta of an exported run -----------------------------------------------------------------


def test_exported_run_meta_holds_accuracy_and_split(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits

    monkeypatch.syspath_prepend(str(ROOT))  # configs/ is not an installed package
    from configs import digits as digits_config
    from experiments.export import export_run
    from experiments.train import train_and_evaluate

    c = digits_config.get_config()
    c.model.hidden = (32,)
    c.num_epochs = 3
    c.sparsity.prune_begin_epoch = 1
    c.sparsity.prune_end_epoch = 2
    c.checkpoint_every_epochs = 3
    results = train_and_evaluate(c, tmp_path)
    info = export_run(tmp_path, tmp_path / "model.qsp")
    meta = export.load(tmp_path / "model.qsp").manifest["meta"]
    assert meta == json.loads(json.dumps(info["meta"]))
    assert meta["dataset"] == "digits" and meta["split"] == "test"
    assert meta["test_examples"] == 360 and meta["input_shape"] == [8, 8, 1]
    assert meta["test_accuracy"] == info["trained_accuracy"] == info["packed_accuracy"]
    assert meta["results_test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)
    assert meta["input_conversion"].startswith("x = float32(u8) * float32(1/255)")
    # From the file and scikit-learn alone: the documented bytes, the listed test split, the
    # numpy decoder and its input conversion give back the recorded accuracy.
    digits = load_digits()
    idx = np.asarray(meta["test_indices"])
    u8 = np.round(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    dn = _decoder()
    logits = dn.predict(str(tmp_path / "model.qsp"), dn.uint8_to_input(u8))
    acc = float(np.mean(logits.argmax(-1) == digits.target[idx]))
    assert abs(acc - meta["test_accuracy"]) <= 1 / 360
