"""training.over_settings: settings split over devices, each device batching its own."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Pruning updates at per-setting step counts: 10 and 20 are on the mask schedule, 11-13 off it.
# Each device's schedule branch looks at its own settings only, so with two devices the second
# device (counts 12, 13) may skip the branch while the first takes it; every setting must still
# get exactly what it gets alone.
_CHECK = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from qsparse import optim, training

mode, counts = sys.argv[1], [int(c) for c in sys.argv[2].split(",")]
tx = optim.block_sparse_adam(1e-2, {"a": (4, 4)}, 4.0, begin=0, end=20, frequency=10)
params = {"a": jax.random.normal(jax.random.key(0), (16, 8))}
g = {"a": jax.random.normal(jax.random.key(1), (16, 8))}

def one(count, g):
    state = tx.init(params)
    state = state._replace(adam=state.adam._replace(count=count))
    return tx.update(g, state, params)

mesh = Mesh(np.array(jax.devices()), ("settings",))
batched = jax.jit(training.over_settings(one, mesh, (True, False), mode))
c = jax.device_put(jnp.array(counts, jnp.int32), NamedSharding(mesh, P("settings")))
got = batched(c, g)
assert len(got[1].masks["a"].sharding.device_set) == len(jax.devices())
for i, n in enumerate(counts):
    want = jax.jit(one)(jnp.asarray(n, jnp.int32), g)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b), rtol=1e-6, atol=1e-7)
kept = np.asarray(got[1].masks["a"]).reshape(len(counts), -1).sum(1)
print(" ".join(str(int(k)) for k in kept))
"""


def _run(mode: str, counts: str, devices: int) -> list[int]:
    """Masks' kept blocks per setting."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, mode, counts],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [int(k) for k in out.stdout.split()]


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_each_setting_gets_what_it_gets_alone_on_two_devices(mode):
    kept = _run(mode, "10,11,12,13", devices=2)
    # The on-schedule setting pruned; the off-schedule ones (one beside it on device 0, two
    # on device 1) kept all 8 blocks of their masks.
    assert kept[0] < 8 and kept[1:] == [8, 8, 8]


def test_bad_vectorize_is_refused():
    import jax
    from jax.sharding import Mesh

    from qsparse import training

    mesh = Mesh(np.array(jax.devices()[:1]), ("settings",))
    with pytest.raises(ValueError, match="vectorize='pmap'"):
        training.over_settings(lambda x: x, mesh, (True,), "pmap")


def _loop_setup(conv: bool):
    """A tiny LeNet or MLP on random 8x8 uint8 images: blocks pruned 2X, distillation on."""
    import jax
    import jax.numpy as jnp

    from qsparse import models, training, wrap

    kx, ky, kt = jax.random.split(jax.random.key(0), 3)
    images = jax.random.randint(kx, (96, 8, 8, 1), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(ky, (96,), 0, 10)
    teacher = jax.random.normal(kt, (96, 10))
    if conv:  # kernels 25x4, 100x8 (blocks 5x2), then Dense 32x16, 16x10 (blocks 4x2)
        model = models.LeNet(channels=(4, 8), hidden=16)
        rules = [wrap.Rule(pattern="Conv.*", compression=2, block_shape=(5, 2))]
    else:
        model = models.MLP(hidden=(32,))
        rules = []
    rules.append(wrap.Rule(pattern=".*", compression=2, block_shape=(4, 2)))
    plan = wrap.make_plan(model, rules, jnp.zeros((1, 8, 8, 1)))
    sched = training.Schedule(
        total_steps=18, prune_begin=4, prune_end=12, prune_every=2, distill_weight=0.5
    )
    return model, plan, sched, (images, labels, teacher)


@pytest.mark.parametrize("conv", [True, False], ids=["lenet", "mlp"])
def test_steps_loop_equals_scanned_epoch(conv):
    """The host loop of steps computes the scanned epoch: same metrics, same state."""
    import jax

    from qsparse import training

    model, plan, sched, (images, labels, teacher) = _loop_setup(conv)
    spec = training.make_spec(plan.init_spec(), learning_rate=3e-3, prox_strength=1e-3)
    out = {}
    for loop in ("scan", "steps"):
        epoch = training.make_epoch_runner(model, plan, sched, 16, loop=loop)
        assert epoch.loop == loop
        state = training.init_state(model, plan, sched, spec, jax.random.key(1), images[:1] / 255)
        history = []
        for e in range(3):  # 6 steps an epoch: prox, pruning, fine-tuning
            state, m = epoch(state, images, labels, jax.random.key(10 + e), spec, teacher)
            history.append(jax.device_get(m))
        out[loop] = history, jax.device_get(state)
    (h_scan, s_scan), (h_steps, s_steps) = out["scan"], out["steps"]
    for a, b in zip(h_steps, h_scan):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["accuracy"], b["accuracy"], rtol=1e-6)
        assert a["all_finite"] and a["first_nonfinite_step"] == b["first_nonfinite_step"] == -1
    assert int(s_steps.step) == int(s_scan.step) == 18
    assert jax.tree.structure(s_steps) == jax.tree.structure(s_scan)
    for a, b in zip(jax.tree.leaves(s_steps), jax.tree.leaves(s_scan)):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-4, atol=1e-6)
    masks = [jax.tree.leaves(training.masks_of(s)) for s in (s_steps, s_scan)]
    for a, b in zip(*masks):  # the same blocks pruned
        np.testing.assert_array_equal(a, b)
    assert 0.4 < 1 - np.mean(np.concatenate([m.ravel() for m in masks[0]])) < 0.6


def test_steps_loop_reports_the_first_nonfinite_step():
    import jax

    from qsparse import training

    model, plan, sched, (images, labels, _) = _loop_setup(conv=False)
    spec = training.make_spec(plan.init_spec(), learning_rate=1e30)
    got = []
    for loop in ("scan", "steps"):
        epoch = training.make_epoch_runner(model, plan, sched, 16, loop=loop)
        state = training.init_state(model, plan, sched, spec, jax.random.key(1), images[:1] / 255)
        state, _ = epoch(state, images, labels, jax.random.key(3), spec)
        _, m = epoch(state, images, labels, jax.random.key(4), spec)
        got.append((bool(m["all_finite"]), int(m["first_nonfinite_step"])))
    assert got[0] == got[1] and not got[0][0] and got[0][1] >= 6  # counted from step 0


def test_loop_choice():
    from qsparse import training

    conv = _loop_setup(conv=True)[1]
    mlp = _loop_setup(conv=False)[1]
    assert training.has_conv(conv) and not training.has_conv(mlp)
    assert training.pick_loop(conv, "auto", backend="cpu") == "steps"
    assert training.pick_loop(mlp, "auto", backend="cpu") == "scan"
    for backend in ("gpu", "tpu"):
        assert training.pick_loop(conv, "auto", backend=backend) == "scan"
    assert training.pick_loop(mlp, "steps") == "steps"
    assert training.pick_loop(conv, "scan") == "scan"
    with pytest.raises(ValueError, match="loop='while'"):
        training.pick_loop(mlp, "while")


def test_dampening_adds_its_term_and_pulls_weights_to_their_levels():
    """quant.dampen: the first step's loss is the cross-entropy plus dampen x the penalty, and
    after training the latent weights sit nearer their levels than without it."""
    import dataclasses

    import jax

    from qsparse import models, training, wrap

    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (64, 8, 8, 1))
    y = jax.random.randint(ky, (64,), 0, 10)
    model = models.MLP(hidden=(32,))
    rules = [wrap.Rule(pattern=".*", w_bits=2, scale_mode="learned", weight_grad="identity")]
    plan = wrap.make_plan(model, rules, x[:1])
    spec = training.make_spec(plan.init_spec(), learning_rate=3e-3)
    base = training.Schedule(total_steps=60, prune_begin=60, prune_end=60)
    out = {}
    for dampen in (0.0, 20.0):
        sched = dataclasses.replace(base, dampen=dampen)
        state = training.init_state(model, plan, sched, spec, jax.random.key(1), x[:1])
        step = jax.jit(training.make_train_step(model, plan, sched))
        losses = []
        for _ in range(60):
            state, m = step(state, (x, y), spec)
            losses.append(float(m["loss"]))
        p = state.params
        out[dampen] = losses, float(plan.level_penalty(p["params"], p["quant"], spec["layers"]))
    p0 = training.init_state(model, plan, base, spec, jax.random.key(1), x[:1]).params
    first = float(plan.level_penalty(p0["params"], p0["quant"], spec["layers"]))
    assert first > 0.02  # initial weights lie between levels
    np.testing.assert_allclose(out[20.0][0][0] - out[0.0][0][0], 20.0 * first, rtol=1e-4)
    assert out[20.0][1] < 0.5 * out[0.0][1]
