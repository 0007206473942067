"""LeNet-style CNN on Fashion-MNIST: 4-bit weights, 4-bit activations, 2X blocks.

Conv kernels are blocked on their (kh*kw*cin, cout) view: conv1 (5,5,1,32) is 25x32, blocks
(5, 8); the rest use (8, 8) and the logits layer (8, 2).

Run:
  python -m experiments.train --config=configs/lenet.py --workdir=runs/lenet
"""

from configs.base import get_base


def get_config():
    """Returns the LeNet config."""
    c = get_base()
    c.model.name = "lenet"
    c.model.channels = (32, 64)
    c.model.hidden = (256,)
    c.quant.w_bits = 4
    c.quant.a_bits = 4
    c.sparsity.compression = 2.0
    c.sparsity.first_block_shape = (5, 8)
    c.num_epochs = 10
    c.sparsity.prune_begin_epoch = 2
    c.sparsity.prune_end_epoch = 6
    return c
