"""Quantization only: 2-bit weights and activations, dense (no block sparsity), Fashion-MNIST.

Run:
  python -m experiments.train --config=configs/quant_only.py --workdir=runs/quant_only
"""

from configs.base import get_base


def get_config():
    """Returns the quantization-only config."""
    c = get_base()
    c.sparsity.compression = 1.0
    c.sparsity.block_shape = ()
    c.sparsity.prox_strength = 0.0
    c.num_epochs = 30
    c.sparsity.prune_begin_epoch = 30
    c.sparsity.prune_end_epoch = 30
    return c
