"""Sparsity only: FP32 weights and activations, 4X block compression, Fashion-MNIST.

Run:
  python -m experiments.train --config=configs/sparse_only.py --workdir=runs/sparse_only
"""

from configs.base import get_base


def get_config():
    """Returns the sparsity-only config."""
    c = get_base()
    c.quant.w_bits = 32
    c.quant.a_bits = 32
    c.num_epochs = 30
    c.sparsity.prune_begin_epoch = 4
    c.sparsity.prune_end_epoch = 14
    return c
