"""End-to-end training on scikit-learn's digits (seconds), results.json, resume."""

import json
import math

import pytest
from killing import killed_at_checkpoint

from configs import digits
from experiments import common
from experiments.train import summary_line, train_and_evaluate


def small_config(**over):
    c = digits.get_config()
    c.num_epochs = 24
    c.sparsity.prune_begin_epoch = 4
    c.sparsity.prune_end_epoch = 14
    c.checkpoint_every_epochs = 4
    for k, v in over.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("digits")
    return wd, train_and_evaluate(small_config(), wd)


def test_end_to_end_accuracy_and_results_fields(digits_run):
    wd, r = digits_run
    assert r["test_accuracy"] > 0.85  # chance is 0.10
    on_disk = json.loads((wd / "results.json").read_text())
    for key in (
        "test_accuracy",
        "w_bits",
        "a_bits",
        "block_compression",
        "block_sparsity",
        "weight_memory_bits",
        "fp32_weight_memory_bits",
        "weight_compression",
        "peak_activation_bits",
        "total_activation_bits",
        "total_memory_bits",
        "num_params",
        "steps",
        "train_seconds",
        "examples_per_second",
        "config",
    ):
        assert key in on_disk, key
    for old in ("compression", "activation_memory_bits"):  # names that did not say what they are
        assert old not in on_disk, old
    assert on_disk["block_compression"] == 4.0
    # Rounded for reading: 4 significant digits for ratios, bits as ints.
    assert r["weight_compression"] == pytest.approx(
        r["fp32_weight_memory_bits"] / r["weight_memory_bits"], rel=1e-3
    )
    assert len(f"{on_disk['weight_compression']:g}".replace(".", "")) <= 4
    assert len(f"{on_disk['test_accuracy']:.15g}".lstrip("0.")) <= 6
    for key in ("w_bits", "a_bits", "weight_memory_bits", "peak_activation_bits"):
        assert type(on_disk[key]) is int, key
    assert (on_disk["w_bits"], on_disk["a_bits"]) == (2, 2)
    assert '"w_bits": 2,' in (wd / "results.json").read_text()
    assert r["block_sparsity"] == pytest.approx(1 - 1 / 4, abs=0.01)
    assert r["total_memory_bits"] == r["weight_memory_bits"] + r["peak_activation_bits"]
    assert r["peak_activation_bits"] < r["total_activation_bits"]
    assert [h["block_compression_now"] for h in r["history"]][-1] == 4.0
    assert r["steps"] == 24 * (1437 // 64)
    assert on_disk["config"]["quant"]["w_bits"] == 2
    # 64-256-256-10 at 2 bits and 4X: codes alone are ~1/64 of FP32.
    assert r["weight_compression"] > 30
    assert (wd / "config.json").exists() and any(wd.glob("events.out.tfevents*"))


def test_resume_continues_step_count(tmp_path):
    c = small_config(
        num_epochs=8,
        checkpoint_every_epochs=2,
        **{"sparsity.prune_begin_epoch": 2, "sparsity.prune_end_epoch": 5},
    )
    with killed_at_checkpoint(2):  # at epoch 6's checkpoint: epochs 5 and 6 are lost
        train_and_evaluate(c, tmp_path)
    mgr = common.checkpoint_manager(tmp_path / "checkpoints", 3)
    assert mgr.latest_step() == 4 * (1437 // 64)  # last checkpoint: epoch 4
    r = train_and_evaluate(c, tmp_path)
    hist = r["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 9))  # no epoch twice, none missing
    assert r["steps"] == 8 * (1437 // 64)
    # Resumed run equals an uninterrupted one exactly.
    full = train_and_evaluate(c, tmp_path / "full")
    assert full["test_accuracy"] == r["test_accuracy"]
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in hist]


def test_other_config_in_workdir_refused(tmp_path):
    one = {"num_epochs": 1, "sparsity.prune_begin_epoch": 0, "sparsity.prune_end_epoch": 1}
    train_and_evaluate(small_config(**one), tmp_path)
    with pytest.raises(common.ConfigError, match="quant.w_bits"):
        train_and_evaluate(small_config(**one, **{"quant.w_bits": 3}), tmp_path)
    r = train_and_evaluate(small_config(**one, **{"quant.w_bits": 3}), tmp_path, overwrite=True)
    assert r["w_bits"] == 3 and math.isfinite(r["test_accuracy"])


def test_a_run_saved_before_a_field_was_added_resumes(tmp_path):
    one = {"num_epochs": 1, "sparsity.prune_begin_epoch": 0, "sparsity.prune_end_epoch": 1}
    first = train_and_evaluate(small_config(**one), tmp_path)

    def drop(*names):  # the config.json of an older qsparse, without these fields
        saved = json.loads((tmp_path / "config.json").read_text())
        for name in names:
            *path, last = name.split(".")
            node = saved
            for p in path:
                node = node[p]
            del node[last]
        (tmp_path / "config.json").write_text(json.dumps(saved, sort_keys=True, indent=1))

    drop("init_from", "quant.bf16_grads")
    again = train_and_evaluate(small_config(**one), tmp_path)  # at their defaults: same run
    assert again["test_accuracy"] == first["test_accuracy"] and again["steps"] == first["steps"]
    assert "init_from" in json.loads((tmp_path / "config.json").read_text())
    # sparsity.balanced was a bool: false then is "none" now, the same run.
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["sparsity"]["balanced"] = False
    (tmp_path / "config.json").write_text(json.dumps(saved, sort_keys=True, indent=1))
    again = train_and_evaluate(small_config(**one), tmp_path)
    assert again["test_accuracy"] == first["test_accuracy"]
    assert json.loads((tmp_path / "config.json").read_text())["sparsity"]["balanced"] == "none"
    drop("distill.temperature")  # lacking, and this run sets it to another value: another run
    with pytest.raises(common.ConfigError, match=r"differs in distill.temperature\)"):
        train_and_evaluate(small_config(**one, **{"distill.temperature": 2.0}), tmp_path)


def test_export_of_a_run_matches_memory_model_and_accuracy(digits_run):
    from experiments.export import export_run

    wd, r = digits_run
    info = export_run(wd, wd / "model.qsp")
    assert abs(info["payload_bytes"] - r["weight_memory_bits"] / 8) <= 0.01 * info["payload_bytes"]
    assert info["packed_accuracy"] == info["trained_accuracy"]
    assert info["trained_accuracy"] == pytest.approx(r["test_accuracy"], abs=1e-6)
    assert info["max_abs_logit_diff"] <= 1e-5 and info["same_predictions"]


def test_target_reached_when_pruning_ends_with_training(tmp_path, capsys):
    over = {"num_epochs": 3, "sparsity.prune_begin_epoch": 1, "sparsity.prune_end_epoch": 3}
    r = train_and_evaluate(small_config(**over), tmp_path)
    assert r["block_sparsity"] == pytest.approx(0.75, abs=0.01)
    # The epoch lines name the block compression reached so far as such.
    epochs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    blocks = [line.split(" blocks ")[1].split()[0] for line in epochs]
    assert blocks[0] == "1.00x" and blocks[-1] == "4.00x" and 1 < float(blocks[1][:-1]) < 4
    assert "compression" not in " ".join(epochs)
    summary = summary_line(r)
    assert "blocks 4x (achieved block sparsity 0.750)" in summary
    assert f"= {r['weight_compression']:.1f}x" in summary


def test_init_from_a_finished_fp32_run(tmp_path):
    """A 2/2/4X run started from a finished FP32 run: its first step's weights are that run's,
    the weight quantizers' steps come from them, and another model is a one-line error."""
    import jax
    import numpy as np

    wd = tmp_path / "fp32"
    fp32 = {"quant.w_bits": 32, "quant.a_bits": 32, "sparsity.compression": 1.0}
    train_and_evaluate(small_config(num_epochs=8, **fp32, **{"sparsity.prune_end_epoch": 8}), wd)
    _, _, trained, _ = common.restore_run(wd)
    config = small_config(init_from=str(wd))
    run = common.build_run(config)
    spec = common.make_spec(run)
    state = common.init_state(run, spec, seed=7)
    jax.tree.map(np.testing.assert_array_equal, state.params["params"], trained.params["params"])
    fresh = common.init_state(common.build_run(small_config()), spec, seed=7)
    steps = [np.asarray(x) for x in jax.tree.leaves(state.params["quant"])]
    fresh_steps = [np.asarray(x) for x in jax.tree.leaves(fresh.params["quant"])]
    assert any(not np.array_equal(a, b) for a, b in zip(steps, fresh_steps, strict=True))
    short = {"num_epochs": 4, "sparsity.prune_begin_epoch": 0, "sparsity.prune_end_epoch": 2}
    tuned = train_and_evaluate(small_config(init_from=str(wd), **short), tmp_path / "ft")
    scratch = train_and_evaluate(small_config(**short), tmp_path / "scratch")
    assert tuned["test_accuracy"] > scratch["test_accuracy"] + 0.02
    other = small_config(init_from=str(wd), **{"model.hidden": (64, 64)})
    with pytest.raises(common.ConfigError, match="init_from=.* holds another model") as e:
        common.init_state(common.build_run(other), common.make_spec(common.build_run(other)), 0)
    assert "\n" not in str(e.value)
    with pytest.raises(common.ConfigError, match="init_from"):
        common.validate(small_config(init_from=str(tmp_path / "nowhere")))


@pytest.mark.slow
def test_cifar10_config_runs_end_to_end_on_a_synthetic_stand_in(tmp_path):
    """configs/cifar10_vgg.py as printed, on generated 32x32x3 images instead of TFDS."""
    from configs import cifar10_vgg

    c = cifar10_vgg.get_config()
    c.dataset = "synthetic_cifar10"
    c.num_epochs = 3
    c.sparsity.prune_begin_epoch = 1
    c.sparsity.prune_end_epoch = 2
    c.sparsity.prune_every_steps = 4
    c.checkpoint_every_epochs = 3
    r = train_and_evaluate(c, tmp_path)
    # The VGG on 32x32x3 inputs: 3x3x3 first conv, three 2x2 pools leave 4x4x128 for the Dense.
    model = common.build_model(c, 10)
    plan, names = common.build_plan(c, model, (32, 32, 3))
    assert plan.layers[names[0]].kernel_shape == (3, 3, 3, 32)
    assert plan.layers[names[-2]].kernel_shape == (4 * 4 * 128, 256)
    assert r["num_params"] == plan.memory(plan.init_spec())["num_params"]
    assert r["test_accuracy"] > 0.5  # chance is 0.10
    assert r["block_sparsity"] > 0.5 and r["weight_compression"] > 10
