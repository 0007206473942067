"""Reproduction, part "cnn_shapes": shallow-dense vs wide-sparse vs deep-sparse CNNs at matched
kept weights on Fashion-MNIST, at w2/a2: 3 designs, each with seeds 0, 1, 2 (9 runs), 3 epochs.

Run:
  python -m experiments.sweep --config=configs/repro_cnn_shapes.py --workdir=runs/repro/cnn_shapes

The seed's claim that at the same memory a deep-sparse network beats a shallow-dense one, on
convolutional networks (kept weights: the codes that dominate weight memory):

* shallow-dense: LeNet conv 8, conv 16, Dense 32, dense: 200 + 3,200 + 25,088 + 320 = 28,808.
* wide-sparse: the same LeNet twice as wide (16, 32, 64) at 4X: 114,192 / 4 = 28,548.
* deep-sparse: a VGG-style network, two 3x3 convs per stage on three stages (8, 16, 32; the
  3x3x32 output flattened) and Dense 336, at 4.10X: 17,928 + 96,768 + 3,360 = 118,056 / 4.10
  = 28,794.

Every covered layer is quantized and blocked; the first conv's matrix (25 or 9 rows) takes
(1, 8) blocks, so one block shape serves all three. About 12 minutes on 2 CPU cores.
"""

from configs.repro_cnn_grid import get_config as _cnn_grid


def get_config():
    """Returns the CNN shape sweep."""
    c = _cnn_grid()
    c.sparsity.first_block_shape = (1, 8)
    c.sweep.bit_pairs = [[2, 2]]
    c.sweep.compression = (4.0,)  # each variant sets its own
    c.sweep.models = [
        {
            "name": "shallow-dense",
            "arch": "lenet",
            "channels": [8, 16],
            "hidden": [32],
            "compression": [1.0],
        },
        {
            "name": "wide-sparse",
            "arch": "lenet",
            "channels": [16, 32],
            "hidden": [64],
            "compression": [4.0],
        },
        {
            "name": "deep-sparse",
            "arch": "vgg",
            "channels": [8, 16, 32],
            "hidden": [336],
            "compression": [4.10],
        },
    ]
    c.sweep.chunk_size = 3  # one chunk per shape
    return c
