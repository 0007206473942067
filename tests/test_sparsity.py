import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse.sparsity import (
    block_mask,
    block_norms,
    block_sparsity,
    global_block_masks,
    prox_block_lasso,
    top_k_keep,
)

W = jax.random.normal(jax.random.key(0), (64, 48))  # 8 x 6 = 48 blocks of 8x8


def kept(mask, bs=(8, 8)):
    return np.asarray(block_norms(mask, bs) > 0)


def _stable_rank_keep(s, k):
    """Reference: rank by a stable descending sort, keep ranks below k."""
    rank = np.argsort(np.argsort(-s, axis=-1, kind="stable"), axis=-1, kind="stable")
    return rank < k


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "tiny"])
def test_top_k_keep_is_the_stable_sort_set(kind):
    rng = np.random.RandomState(7)
    for _ in range(40):
        n = int(rng.randint(1, 300))
        s = rng.randn(4, n).astype(np.float32)
        if kind == "ties":  # few distinct values: the index order decides
            s = np.round(s * 2).astype(np.float32)
        elif kind == "zeros":  # pruned blocks: many exact zeros, both signs of zero
            s = np.abs(s)
            s[:, ::3] = 0.0
            s[:, 1::7] = -0.0
        elif kind == "tiny":  # tiny and negative values keep their order (XLA:CPU treats
            s = (s * 1e-30).astype(np.float32)  # subnormals as zero, so not those)
        k = int(rng.randint(0, n + 1))
        got = np.asarray(jax.jit(top_k_keep)(jnp.asarray(s), k))
        np.testing.assert_array_equal(got, _stable_rank_keep(s, k), err_msg=f"n={n} k={k}")


def test_top_k_keep_nan_ranks_last_and_k_traced():
    s = jnp.array([0.5, jnp.nan, 2.0, 1.0])
    keep = jax.vmap(lambda k: top_k_keep(s, k))(jnp.arange(5))
    assert np.asarray(keep).tolist() == [
        [False, False, False, False],
        [False, False, True, False],
        [False, False, True, True],
        [True, False, True, True],
        [True, True, True, True],
    ]


def test_block_norms_match_numpy():
    w = np.random.RandomState(3).randn(21, 35).astype(np.float32)
    ref = np.sqrt((w.astype(np.float64).reshape(3, 7, 7, 5) ** 2).sum(axis=(1, 3)))
    np.testing.assert_allclose(block_norms(jnp.asarray(w), (7, 5)), ref, rtol=1e-6)


def test_vmap_over_compression_exact_counts():
    cs = jnp.array([1, 2, 4, 8, 16], jnp.float32)
    masks = jax.jit(jax.vmap(lambda c: block_mask(W, (8, 8), c)))(cs)
    for c, m in zip([1, 2, 4, 8, 16], masks):
        assert kept(m).sum() == math.ceil(48 / c)
        assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}


def test_keeps_largest_blocks():
    m = block_mask(W, (8, 8), 4)
    norms = np.asarray(block_norms(W, (8, 8))).ravel()
    k = kept(m).ravel()
    assert norms[k].min() >= norms[~k].max()


def test_balanced_rows():
    for c in [2, 3, 4]:
        m = block_mask(W, (8, 8), c, balanced=True)
        per_row = kept(m).sum(axis=1)
        assert (per_row == math.ceil(6 / c)).all()


def test_balanced_columns_spread_the_layer_budget_over_output_groups():
    # Block column 0 is 100x smaller: a layer-wide ranking drops it entirely.
    w = np.asarray(W).copy()
    w[:, :8] *= 0.01
    assert kept(block_mask(w, (8, 8), 4)).sum(axis=0)[0] == 0
    norms = np.asarray(block_norms(w, (8, 8)))
    for c in [1, 2, 3, 4, 8]:
        k = kept(block_mask(w, (8, 8), c, balanced="columns"))
        per_col = k.sum(axis=0)
        assert k.sum() == math.ceil(48 / c)  # the layer's budget exactly
        assert per_col.max() - per_col.min() <= 1 and per_col.min() == math.ceil(48 / c) // 6
        for j in range(k.shape[1]):  # within a column, the largest blocks
            if 0 < per_col[j] < k.shape[0]:
                assert norms[k[:, j], j].min() >= norms[~k[:, j], j].max()
    # Under jit with a traced ratio, and the same as the concrete call.
    got = jax.jit(lambda c: block_mask(w, (8, 8), c, balanced="columns"))(jnp.float32(3.0))
    np.testing.assert_array_equal(got, block_mask(w, (8, 8), 3, balanced="columns"))
    with pytest.raises(ValueError, match="balanced='cols' is not allowed"):
        block_mask(w, (8, 8), 2, balanced="cols")


def test_conv_kernel_matrix_view():
    k = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))  # view (72, 16)
    m = block_mask(k, (9, 4), 4)
    assert m.shape == k.shape
    assert kept(m.reshape(72, 16), (9, 4)).sum() == math.ceil(8 * 4 / 4)


def test_global_masks_share_one_budget():
    a = jax.random.normal(jax.random.key(2), (32, 32)) * 10
    b = jax.random.normal(jax.random.key(3), (32, 32))
    ms = global_block_masks({"a": a, "b": b}, {"a": (8, 8), "b": (8, 8)}, 2)
    ka, kb = kept(ms["a"]).sum(), kept(ms["b"]).sum()
    assert ka + kb == 16 and ka == 16  # the large layer wins every block


def test_prox_closed_form():
    t = 2.0
    out = np.asarray(prox_block_lasso(W, (8, 8), t))
    w = np.asarray(W)
    for i in range(8):
        for j in range(6):
            blk = w[8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
            n = np.linalg.norm(blk)
            expect = blk * max(0.0, 1 - t / n)
            np.testing.assert_allclose(
                out[8 * i : 8 * i + 8, 8 * j : 8 * j + 8], expect, rtol=1e-5, atol=1e-6
            )
    big = np.asarray(prox_block_lasso(W, (8, 8), 100.0))
    assert (big == 0).all() and float(block_sparsity(big, (8, 8))) == 1.0


@pytest.mark.parametrize("bad", [0.5, 0, -2, float("nan")])
def test_bad_compression(bad):
    with pytest.raises(ValueError, match="compression"):
        block_mask(W, (8, 8), bad)


@pytest.mark.parametrize("bad", [(7, 8), (8, 5), (0, 8), (8,)])
def test_bad_block_shape(bad):
    with pytest.raises(ValueError, match="block_shape"):
        block_mask(W, bad, 2)
