import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse.reductions import tree_sum
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


@pytest.mark.parametrize("shape,axis", [((7, 5), 0), ((3, 13, 4), 1), ((6, 11), 1), ((1, 3), 0)])
def test_tree_sum_equals_sum(shape, axis):
    x = jax.random.normal(jax.random.key(4), shape)
    got = tree_sum(x, axis)
    assert got.shape == np.sum(np.asarray(x), axis).shape
    np.testing.assert_allclose(got, np.sum(np.asarray(x, np.float64), axis), rtol=1e-5, atol=1e-6)


def _tree_reference(x, axis, until=1):
    """The pairwise order tree_sum promises, in numpy float32: each level adds the first half
    to the second; an odd level's last row joins the first slot."""
    x = np.moveaxis(np.asarray(x, np.float32), axis, 0)
    while x.shape[0] > until:
        half = x.shape[0] // 2
        pair = x[:half] + x[half : 2 * half]
        if x.shape[0] % 2:
            pair[0] = pair[0] + x[-1]
        x = pair
    return x[0] if until == 1 else np.moveaxis(x, 0, axis)


@pytest.mark.parametrize(
    "rows,until,left", [(1024, 256, 256), (784, 256, 196), (49, 8, 6), (5, 8, 5)]
)
def test_tree_sum_until_keeps_the_partial_sums(rows, until, left):
    # The LSQ step gradient folds a kernel's rows to at most 256 in fused loops, then one
    # reduce op finishes the sum.
    x = jax.random.normal(jax.random.key(rows), (3, rows, 24)) * 100.0
    got = np.asarray(jax.jit(lambda x: tree_sum(x, 1, until=until))(x))
    assert got.shape == (3, left, 24)
    want = _tree_reference(x, 1, until)
    assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()
    with pytest.raises(ValueError, match="until=0"):
        tree_sum(x, 1, until=0)


@pytest.mark.parametrize("rows", [784, 49, 6, 3, 1024, 100])
def test_tree_sum_keeps_its_order_bit_for_bit(rows):
    # The study's numbers are reproducible bit for bit: the LSQ step gradient sums a kernel's
    # rows (784 for the first layer) in exactly this order.
    x = jax.random.normal(jax.random.key(rows), (rows, 24)) * 100.0
    got = np.asarray(jax.jit(lambda x: tree_sum(x, 0))(x))
    want = _tree_reference(x, 0)
    assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()


def test_tree_sum_of_784_rows_writes_no_full_size_array():
    # Fused with its summand into one loop, a 784-row sum must not write the summand out (an
    # odd level joined by concatenation made XLA write it out and sum it twice).
    x = jnp.ones((784, 256))
    hlo = jax.jit(lambda x: tree_sum(jnp.round(x * 3.0) * x, 0)).lower(x).compile().as_text()
    assert re.findall(r"= f32\[\d+,256\]\S* fusion", hlo), "no fused loop found"
    assert not re.findall(r"= f32\[784,256\]\S* fusion", hlo)


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
