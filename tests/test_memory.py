import numpy as np

from qsparse import memory as mem


def test_two_layer_hand_computed():
    # Layer A: 16x8 kernel, 8 biases, 2-bit, blocks 4x4 (grid 4x2 = 8 blocks), keep 2.
    a = mem.layer_memory(
        (16, 8), 8, w_bits=2, kept=2, block_shape=(4, 4), a_bits=2, act_quantized=True
    )
    assert a["codes"] == 2 * 16 * 2  # 2 blocks * 16 weights * 2 bits = 64
    # bitmap 8 bits; CSR (4+1)*bitlen(8)=5*4=20 + 2*bitlen(1)=2 -> 22 -> bitmap wins
    assert a["index"] == 8 and not a["index_is_csr"]
    assert a["scales"] == 32 + 32  # weight scale + activation clip
    assert a["biases"] == 8 * 32
    assert a["total"] == 64 + 8 + 64 + 256
    assert a["fp32"] == 32 * (128 + 8)
    # Layer B: 8x4 dense float32 logits, 4 biases.
    b = mem.layer_memory((8, 4), 4, w_bits=32)
    assert b["codes"] == 32 * 32 and b["index"] == 0 and b["scales"] == 0
    acts = mem.activation_memory(16, [8, 4], [2, 32], input_bits=8)
    assert acts["buffers"] == [128, 16, 128]
    assert acts["peak"] == max(128 + 16, 16 + 128)
    assert acts["total"] == 128 + 16 + 128
    s = mem.summarize({"a": a, "b": b}, acts)
    assert s["weight_memory_bits"] == 392 + 32 * 32 + 128
    assert s["fp32_weight_memory_bits"] == 32 * 136 + 32 * 36
    np.testing.assert_allclose(s["weight_compression"], (32 * 172) / (392 + 1152), rtol=1e-6)
    assert s["total_memory_bits"] == s["weight_memory_bits"] + 144


def test_csr_wins_when_very_sparse():
    # 64x64 grid = 4096 blocks, keep 10: CSR = 65*13 + 10*6 = 905 < 4096
    bits, csr = mem.index_bits((64, 64), 10)
    assert csr and bits == 65 * 13 + 10 * 6


def test_per_channel_scales():
    m = mem.layer_memory((8, 4), 0, w_bits=4, per_channel=True)
    assert m["scales"] == 4 * 32 and m["codes"] == 32 * 4


def test_no_index_when_every_block_kept():
    full = mem.layer_memory((16, 8), 0, w_bits=2, kept=8, block_shape=(4, 4))
    assert full["index"] == 0 and full["codes"] == 128 * 2
