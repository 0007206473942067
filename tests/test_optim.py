import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsparse import optim
from qsparse.sparsity import block_norms, prox_block_lasso

SHAPES = {"a/kernel": (4, 4), "b/kernel": (4, 2)}


def make_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "a": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jnp.zeros(8)},
        "b": {"kernel": jax.random.normal(k2, (8, 4)), "bias": jnp.zeros(4)},
    }


def loss(p, x):
    h = jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"])
    return jnp.mean((h @ p["b"]["kernel"] + p["b"]["bias"] - 1.0) ** 2)


X = jax.random.normal(jax.random.key(9), (32, 16))


def run(tx, steps, params=None, objective=loss):
    params = make_params() if params is None else params
    state = tx.init(params)

    @jax.jit  # one compile instead of op-by-op dispatch of every step
    def step(p, s):
        u, s = tx.update(jax.grad(objective)(p, X), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _kernels(tree):
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: optim.path_str(kp).endswith("kernel"), tree
    )


def test_is_an_optax_transformation():
    tx = optim.block_sparse_adam(1e-2, SHAPES, 4.0, begin=5, end=10)
    assert isinstance(tx, optax.GradientTransformation)
    state = tx.init(make_params())
    assert isinstance(state, optim.BlockSparseAdamState)
    assert state.masks["a"]["kernel"].shape == (4, 2)  # one entry per block
    with pytest.raises(ValueError, match="needs params"):
        tx.update(make_params(), state)


def test_prox_lands_on_prox_of_the_adam_step():
    params = make_params()
    g = jax.grad(loss)(params, X)
    tx = optim.block_sparse_adam(0.1, SHAPES, 4.0, prox_strength=0.5, begin=5, end=10)
    u, _ = tx.update(g, tx.init(params), params)
    new = optax.apply_updates(params, u)
    adam = optax.adam(0.1)
    plain = optax.apply_updates(params, adam.update(g, adam.init(params), params)[0])
    np.testing.assert_allclose(
        new["a"]["kernel"], prox_block_lasso(plain["a"]["kernel"], (4, 4), 0.5), atol=1e-6
    )
    np.testing.assert_allclose(new["a"]["bias"], plain["a"]["bias"], atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_without_pruning_it_is_adamw(weight_decay):
    # Compression 1 and no prox: Adam(W) through every phase, decay on the kernels only.
    def lr(count):
        return 3e-2 * (1.0 - count / 40.0)

    tx = optim.block_sparse_adam(
        lr, SHAPES, 1.0, weight_decay=weight_decay, decay_mask=_kernels, begin=5, end=20
    )
    ref = optax.adamw(lr, weight_decay=weight_decay, mask=_kernels)
    p, s = run(tx, 30)
    p_ref, s_ref = run(ref, 30)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s.adam.nu), jax.tree.leaves(s_ref[0].nu)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_prox_stops_at_begin_also_under_vmap():
    # Off the prox phase the branch returns ones: a huge strength changes nothing then.
    def final(strength, steps):
        tx = optim.block_sparse_adam(
            1e-2, SHAPES, 2.0, prox_strength=strength, begin=3, end=6, frequency=3
        )
        return run(tx, steps)[0]["a"]["kernel"]

    weak, strong = final(0.0, 3), final(100.0, 3)
    assert (np.asarray(strong) == 0).all() and not (np.asarray(weak) == 0).all()

    def from_step(strength):
        tx = optim.block_sparse_adam(
            1e-2, SHAPES, 2.0, prox_strength=strength, begin=0, end=0, frequency=1
        )
        params = make_params()
        u, _ = tx.update(jax.grad(loss)(params, X), tx.init(params), params)
        return optax.apply_updates(params, u)["a"]["kernel"]

    ks = jax.jit(jax.vmap(from_step))(jnp.array([0.0, 100.0]))
    np.testing.assert_array_equal(ks[0], ks[1])  # begin=0: no prox step at all


def test_strong_prox_zeroes_some_blocks_and_shrinks_the_rest():
    tx = optim.block_sparse_adam(1e-1, SHAPES, 2.0, prox_strength=4.5, begin=5, end=8)
    params = make_params()
    new, _ = run(tx, 1, params)
    zeroed = np.asarray(block_norms(new["a"]["kernel"], (4, 4))) == 0
    assert zeroed.any() and not zeroed.all()


def test_schedule_endpoints():
    c = [float(optim.compression_schedule(s, 4.0, 10, 50)) for s in (0, 10, 30, 50, 80)]
    assert c[0] == 1.0 and c[1] == 1.0 and abs(c[3] - 4.0) < 1e-5 and c[4] == c[3]
    assert c[2] > 1.0 and c[2] < 4.0  # strictly between the endpoints mid-schedule


def test_100_adam_steps_pruned_blocks_zero_and_moments_zero():
    tx = optim.block_sparse_adam(
        1e-2, SHAPES, 4.0, prox_strength=1e-3, begin=10, end=40, frequency=10
    )
    p, s = run(tx, 100)
    masks = optim.expand_masks(optim.find_masks(s), p)
    for name, bs in [("a", (4, 4)), ("b", (4, 2))]:
        m = np.asarray(masks[name]["kernel"])
        k = np.asarray(p[name]["kernel"])
        assert (k[m == 0] == 0).all()
        kept = int(np.asarray(block_norms(jnp.asarray(m), bs) > 0).sum())
        n_blocks = m.size // (bs[0] * bs[1])
        assert kept == -(-n_blocks // 4)
    for moment in (s.adam.mu, s.adam.nu):
        for name in ("a", "b"):
            m = np.asarray(masks[name]["kernel"])
            assert (np.asarray(moment[name]["kernel"])[m == 0] == 0).all()
    assert np.asarray(s.adam.nu["a"]["kernel"])[np.asarray(masks["a"]["kernel"]) == 1].any()


def test_masks_only_recomputed_on_schedule():
    tx = optim.block_sparse_adam(1e-2, SHAPES, 4.0, begin=5, end=25, frequency=10)
    params = make_params()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        u, state = tx.update(jax.grad(loss)(params, X), state, params)
        return optax.apply_updates(params, u), state

    history = []
    for _ in range(30):
        params, state = step(params, state)
        history.append(np.asarray(state.masks["a"]["kernel"]))
    changes = [i for i in range(1, 30) if not (history[i] == history[i - 1]).all()]
    assert changes and set(changes) <= {5, 15, 25}  # mask updates only on schedule steps
    assert (history[4] == 1).all() and history[29].mean() == pytest.approx(0.25)


def test_works_under_vmap_over_compression():
    def final(c):
        tx = optim.block_sparse_adam(1e-2, SHAPES, c, begin=2, end=10, frequency=2)
        params = make_params()
        state = tx.init(params)

        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p, X), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, state), None, length=15)
        return p["a"]["kernel"]

    ks = jax.jit(jax.vmap(final))(jnp.array([1.0, 2.0, 8.0]))
    for c, k in zip([1, 2, 8], ks):
        assert int((block_norms(k, (4, 4)) > 0).sum()) == -(-8 // c)


def test_bad_schedule_and_paths():
    with pytest.raises(ValueError, match="begin"):
        optim.block_sparse_adam(1e-2, SHAPES, 2.0, begin=10, end=5)
    with pytest.raises(ValueError, match="compression"):
        optim.block_sparse_adam(1e-2, SHAPES, 0.5, begin=0, end=5)
    with pytest.raises(ValueError, match="frequency"):
        optim.block_sparse_adam(1e-2, SHAPES, 2.0, begin=0, end=5, frequency=0)
    tx = optim.block_sparse_adam(1e-2, {"nope/kernel": (2, 2)}, 2.0, begin=0, end=5)
    with pytest.raises(ValueError, match="nope/kernel"):
        tx.init(make_params())


def test_target_reached_when_end_is_off_the_frequency_grid():
    tx = optim.block_sparse_adam(1e-2, SHAPES, 4.0, begin=0, end=7, frequency=5)
    _, s = run(tx, 9)
    kept = int(s.masks["a"]["kernel"].sum())  # stored per block
    assert kept == 2  # ceil(8 / 4), not the schedule's value at step 5


def test_pruning_is_monotone_and_pruned_weights_get_no_update():
    # A loss that pulls every weight away from zero: without gradient and moment masking,
    # pruned blocks would move and could be chosen again at a later schedule step.
    def grow(p, x):
        return -jnp.sum(jnp.abs(p["a"]["kernel"])) - jnp.sum(jnp.abs(p["b"]["kernel"]))

    tx = optim.block_sparse_adam(1e-1, SHAPES, 4.0, begin=0, end=30, frequency=5)
    params = make_params()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        u, state = tx.update(jax.grad(grow)(params, X), state, params)
        new = optax.apply_updates(params, u)
        return new, state, optim.expand_masks(optim.find_masks(state), params)["a"]["kernel"]

    history = []
    for _ in range(40):
        new, state, m = step(params, state)
        m = np.asarray(m)
        # A weight pruned before this step did not move.
        before = np.asarray(params["a"]["kernel"]) == 0
        assert (np.asarray(new["a"]["kernel"])[before] == 0).all()
        history.append(m)
        params = new
    for prev, cur in zip(history, history[1:]):
        assert (cur <= prev).all()  # a pruned block never comes back
    assert history[-1].mean() == pytest.approx(0.25)


def test_vmapped_pruning_follows_each_settings_own_count():
    # Under vmap the mask branch runs when any setting is on schedule (any_setting); a setting
    # whose own count is off schedule must keep its masks exactly.
    tx = optim.block_sparse_adam(1e-2, SHAPES, 4.0, begin=0, end=20, frequency=10)
    params = make_params()
    g = jax.grad(loss)(params, X)

    def one(count):
        state = tx.init(params)
        state = state._replace(adam=state.adam._replace(count=count))
        return tx.update(g, state, params)

    counts = jnp.array([10, 11, 20], jnp.int32)  # on, off, on (the forced end) the schedule
    u_v, s_v = jax.jit(jax.vmap(one))(counts)
    for i, c in enumerate([10, 11, 20]):
        u, s = jax.jit(one)(jnp.asarray(c, jnp.int32))
        for a, b in zip(jax.tree.leaves((u_v, s_v)), jax.tree.leaves((u, s))):
            np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7)
        for a, b in zip(jax.tree.leaves(s_v.masks), jax.tree.leaves(s.masks)):
            np.testing.assert_array_equal(a[i], b)
    kept = np.asarray(s_v.masks["a"]["kernel"]).reshape(3, -1).sum(1)
    assert kept[1] == 8 and kept[0] < 8 and kept[2] == 2  # the off-schedule setting kept all


def test_column_balanced_pruning_keeps_every_output_group():
    # a's first block column (outputs 0-3) is 100x smaller: ranked layer-wide it is pruned away.
    params = make_params()
    params["a"]["kernel"] = params["a"]["kernel"].at[:, :4].multiply(0.01)
    for balanced, first_column in (("none", 0), ("columns", 2)):
        tx = optim.block_sparse_adam(
            1e-3, SHAPES, 2.0, begin=0, end=2, frequency=1, balanced=balanced
        )
        _, state = run(tx, 4, params)
        mask = np.asarray(state.masks["a"]["kernel"])  # 4 x 2 blocks, 4 kept
        assert mask.sum() == 4 and mask[:, 0].sum() == first_column
    with pytest.raises(ValueError, match="balanced='diagonal'"):
        optim.block_sparse_adam(1e-3, SHAPES, 2.0, begin=0, end=2, balanced="diagonal")
