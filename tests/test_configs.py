"""Every experiment config is valid and builds its model and plan (no data, no training)."""

import importlib
from pathlib import Path

import pytest

from experiments import common
from qsparse import quant, sparsity

CONFIGS = sorted(
    p.stem
    for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")
    if p.stem not in ("__init__", "base") and not p.stem.startswith(("sweep", "repro"))
)
SHAPES = {
    "fashion_mnist": (28, 28, 1),
    "mnist": (28, 28, 1),
    "kmnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "digits": (8, 8, 1),
    "synthetic": (28, 28, 1),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
    mod = importlib.import_module(f"configs.{name}")
    assert "python -m experiments.train --config=configs/" in mod.__doc__
    c = mod.get_config()
    common.validate(c)
    model = common.build_model(c, 10)
    plan, names = common.build_plan(c, model, SHAPES[c.dataset])
    assert names and set(plan.layers) == set(names)
    spec = plan.init_spec()
    mem = plan.memory(spec)
    assert mem["weight_memory_bits"] > 0
    if c.quant.w_bits == 2 and c.sparsity.compression == 4 and c.dataset == "fashion_mnist":
        # Target counts of the joint setting on every layer: >= 50X before training.
        assert float(mem["weight_compression"]) >= 50, name


def test_bf16_grads_runs_where_int_matmul_runs_and_needs_it():
    from configs import joint

    c = joint.get_config()
    model = common.build_model(c, 10)
    plan, names = common.build_plan(c, model, SHAPES[c.dataset])
    rules = [plan.layers[n].rule for n in names]
    assert [r.bf16_grads for r in rules] == [r.int_matmul for r in rules]
    assert not rules[0].int_matmul and all(r.bf16_grads for r in rules[1:])
    c.quant.int_matmul = False
    with pytest.raises(
        common.ConfigError, match=r"quant.bf16_grads=True is not allowed: .*int_matmul"
    ):
        common.validate(c)


def test_cli_errors_offer_every_config():
    """A mistyped --config lists these: every train config for train, every sweep for sweep."""
    train = [Path(p).stem for p in common.config_files("train")]
    assert train == CONFIGS
    sweeps = [Path(p).stem for p in common.config_files("sweep")]
    assert sweeps and all(s.startswith(("sweep", "repro")) for s in sweeps)
    assert not set(train) & set(sweeps)


@pytest.mark.parametrize(
    "field, value, library",
    [
        ("quant.w_bits", 9, quant.check_bits),
        ("quant.a_bits", 64, quant.check_bits),
        ("sparsity.compression", 0.5, sparsity.check_compression),
    ],
)
def test_setting_values_are_checked_by_the_library_rule(field, value, library):
    """A config's bits and compression fail with the library's own one-line error."""
    from configs import digits

    c = digits.get_config()
    group, name = field.split(".")
    c[group][name] = value
    with pytest.raises(ValueError) as lib:
        library(value, field)
    with pytest.raises(common.ConfigError) as got:
        common.validate(c)
    assert str(got.value) == str(lib.value)
    assert str(got.value).startswith(f"{field}={value:g} is not allowed: ")


@pytest.mark.parametrize("value", [16, 4, 0])
def test_bias_bits_outside_8_and_32_is_one_line(value):
    from configs import joint

    c = joint.get_config()
    c.quant.bias_bits = value
    with pytest.raises(common.ConfigError) as got:
        common.validate(c)
    assert str(got.value) == (
        f"quant.bias_bits={value!r} is not allowed: use one of (8, 32) (8: int8 codes and a"
        " float32 scale per layer)"
    )


def test_negative_dampening_is_one_line():
    from configs import resnet

    c = resnet.get_config()
    c.quant.dampen = -0.5
    with pytest.raises(common.ConfigError) as got:
        common.validate(c)
    assert str(got.value) == "quant.dampen=-0.5 is not allowed: use >= 0 (0 = off)"
