"""qsparse.models' ResNet through configs/resnet.py: the run builds, the plan covers every conv
and the head, the full-precision wrapped model is the model, and training moves the batch
statistics, which checkpoints keep."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import resnet
from experiments import common
from qsparse import data as qdata
from qsparse import models, training


def _run(depth=8):
    c = resnet.get_config()
    c.model.depth = depth
    c.batch_size = 16
    c.num_epochs = 2
    c.sparsity.prune_begin_epoch = 0
    c.sparsity.prune_end_epoch = 1
    c.sparsity.prune_every_steps = 1
    c.dataset = "digits"  # 8x8x1: the same network, small activations
    return common.build_run(c)


def _kernel_layers(params):
    """Names of every ``kernel`` leaf's module (every conv and Dense of the model)."""
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(k.key for k in path[:-1]) for path, _ in paths if path[-1].key == "kernel"}


def test_resnet_depths_and_parameter_count():
    x = jnp.zeros((1, 28, 28, 1))
    counts = {}
    for depth, blocks in ((8, 1), (20, 3)):
        model = models.build("resnet", num_classes=10, channels=(16, 32, 64), depth=depth)
        assert model.stage_sizes == (blocks,) * 3
        variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), x)
        counts[depth] = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
        convs = [n for n in _kernel_layers(variables["params"]) if n != "Dense_0"]
        assert len(convs) == depth - 1 + 2  # the main path less the head, 2 projections
    assert counts[8] == 77754 and counts[20] == 272186
    with pytest.raises(ValueError, match="model.depth=9 is not allowed"):
        models.build("resnet", num_classes=10, channels=(16, 32, 64), depth=9)
    c = resnet.get_config()
    c.model.depth = 10
    with pytest.raises(common.ConfigError, match=r"model.depth=10 is not allowed"):
        common.validate(c)


@pytest.mark.parametrize("shape", [(28, 28, 1), (8, 8, 1)])
def test_resnet_config_builds_a_run_whose_plan_covers_every_conv_and_the_head(shape):
    c = resnet.get_config()
    common.validate(c)
    model = common.build_model(c, 10)
    assert isinstance(model, models.ResNet)
    plan, names = common.build_plan(c, model, shape)
    params, state = plan.init_variables(jax.random.key(0), jnp.zeros((1, *shape)))
    assert set(names) == set(plan.layers) == _kernel_layers(params)
    assert len(names) == 10 and set(state) == {"batch_stats"}
    assert names[0] == "conv_init" and names[-1] == "Dense_0"
    rules = {n: plan.layers[n].rule for n in names}
    assert rules["conv_init"].block_shape == (1, 8) and rules["conv_init"].a_bits == 32
    assert rules["Dense_0"].block_shape == (8, 2)
    for n in names:
        r = rules[n]
        assert (r.w_bits, r.compression, r.scale_mode, r.learn_clip) == (4, 2, "learned", True)
        if n != "conv_init":
            assert r.block_shape == (8, 8) or n == "Dense_0"
            assert r.a_bits == 4 and not plan.layers[n].a_signed  # every input is after a ReLU


def test_resnet_at_full_precision_is_the_model():
    run = _run()
    model, plan = run.model, run.plan
    x = qdata.normalize(jnp.asarray(run.dataset.train_x[:8]))
    params, state = plan.init_variables(jax.random.key(0), x[:1])
    # Non-trivial batch statistics and BatchNorm scales, so evaluation mode is tested.
    params = jax.tree.map(lambda p: p + 0.1 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    state = jax.tree.map(lambda s: s + 0.05 * jnp.cos(jnp.arange(s.size).reshape(s.shape)), state)
    spec = plan.init_spec(w_bits=32, a_bits=32, compression=1)
    qp = plan.init_qparams(params, spec)
    variables = {"params": params, **state}
    got = plan.apply(model, params, qp, spec, x, state=state, train=False)
    want = model.apply(variables, x, train=False)
    assert float(jnp.max(jnp.abs(got - want))) == 0.0
    got, got_state = plan.apply(model, params, qp, spec, x, state=state, train=True)
    want, want_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert float(jnp.max(jnp.abs(got - want))) == 0.0
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got_state, want_state)
    assert max(jax.tree.leaves(diff)) == 0.0


def test_resnet_trains_moves_batch_statistics_and_checkpoints_keep_them(tmp_path):
    run = _run()
    spec = common.make_spec(run)
    state = common.init_state(run, spec, seed=0)
    step = jax.jit(training.make_train_step(run.model, run.plan, run.sched))
    x = qdata.normalize(jnp.asarray(run.dataset.train_x[:16]))
    y = jnp.asarray(run.dataset.train_y[:16])
    before = state
    for _ in range(3):  # steps 0..2: pruning masks updated on each (prune_every_steps=1)
        state, metrics = step(state, (x, y), spec)
        assert bool(metrics["finite"])
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), before.model_state, state.model_state
    )
    assert set(state.model_state) == {"batch_stats"} and min(jax.tree.leaves(moved)) > 0
    assert (
        float(
            jnp.max(
                jnp.abs(
                    before.params["params"]["Dense_0"]["kernel"]
                    - state.params["params"]["Dense_0"]["kernel"]
                )
            )
        )
        > 0
    )
    # Evaluation reads the running statistics: the model itself, in eval mode, at this spec.
    logits = training.logits_fn(run.model, run.plan, state.params, spec, x, state.model_state)
    assert np.all(np.isfinite(np.asarray(logits)))
    # The checkpoint holds the batch statistics and the dropout key, and gives them back.
    mgr = common.checkpoint_manager(tmp_path / "checkpoints", 2)
    common.save_checkpoint(mgr, 3, state, {"epoch": 1})
    fresh = common.init_state(run, spec, seed=1)
    got = common.restore_checkpoint(mgr, fresh)
    assert got is not None and got[0] == 3 and got[2] == {"epoch": 1}
    restored = got[1]
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = training.logits_fn(run.model, run.plan, restored.params, spec, x, restored.model_state)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))


def test_a_trained_resnet_run_exports_and_checks_through_the_command_line(tmp_path):
    """`python -m experiments.export` on a BatchNorm network (no graph in the file): the file
    goes back through the model with its batch statistics and predicts what the run did."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from experiments.train import train_and_evaluate

    c = _run().config
    c.quant.w_bits, c.quant.a_bits, c.sparsity.compression = 2, 2, 4.0
    c.quant.zero_level, c.quant.weight_grad = False, "identity"  # four 2-bit levels
    r = train_and_evaluate(c, tmp_path / "run")
    root = Path(__file__).resolve().parents[1]

    def cli(*flags):
        out = subprocess.run(
            [sys.executable, "-m", "experiments.export", f"--workdir={tmp_path / 'run'}", *flags],
            cwd=root,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    out = cli(f"--output={tmp_path / 'm.qsp'}")
    assert "same predictions: True" in out and "max |logit diff| 0.00e+00" in out
    assert f"accuracy {r['test_accuracy']:.4f} (trained {r['test_accuracy']:.4f})" in out
    out = cli(f"--check={tmp_path / 'm.qsp'}")
    assert f"test accuracy {r['test_accuracy']:.4f} (recorded at export" in out
