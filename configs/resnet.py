"""ResNet-8 with BatchNorm on Fashion-MNIST: 4-bit weights, 4-bit activations, 2X blocks.

CIFAR-style ResNet-8 (3x3 stem, three stages of one basic block at widths 16/32/64, strides
1, 2, 2, global average pool, Dense head; ``--config.model.depth=20`` gives ResNet-20) with
learned per-output-channel weight steps (LSQ) and clips (PACT). Conv kernels are blocked on their
(kh*kw*cin, cout) view: the stem (3,3,1,16) is 9x16, blocks (1, 8); every other conv (144,
288 or 576 rows; the 1x1 projections 16x32 and 32x64) takes (8, 8), the Dense head 64x10
(8, 2). BatchNorm scales, offsets and batch statistics stay float32 and are counted as such;
``--config.recalibrate_batches=50`` recomputes the statistics at each epoch's weights (2-bit
weights flip between levels, so the moving averages lag them).

Run:
  python -m experiments.train --config=configs/resnet.py --workdir=runs/resnet
Smoke run on scikit-learn's 8x8 digits (seconds):
  python -m experiments.train --config=configs/resnet.py --workdir=/tmp/resnet_digits \\
      --config.dataset=digits --config.num_epochs=2 --config.sparsity.prune_begin_epoch=0 \\
      --config.sparsity.prune_end_epoch=1 --config.sparsity.prune_every_steps=2
"""

from configs.base import get_base


def get_config():
    """Returns the ResNet config."""
    c = get_base()
    c.model.name = "resnet"
    c.model.channels = (16, 32, 64)
    c.model.depth = 8
    c.quant.w_bits = 4
    c.quant.a_bits = 4
    c.quant.scale_mode = "learned"
    c.quant.learn_clip = True
    c.quant.per_channel = True
    c.sparsity.compression = 2.0
    c.sparsity.block_shape = (8, 8)
    c.sparsity.first_block_shape = (1, 8)
    c.sparsity.last_block_shape = (8, 2)
    c.num_epochs = 12
    c.sparsity.prune_begin_epoch = 2
    c.sparsity.prune_end_epoch = 8
    return c
