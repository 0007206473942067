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
)

W = jax.random.normal(jax.random.key(0), (64, 48))  # 8 x 6 = 48 blocks of 8x8


def kept(mask, bs=(8, 8)):
    return np.asarray(block_norms(mask, bs) > 0)


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
