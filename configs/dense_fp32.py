"""FP32 dense baseline: MLP 784-512-512-10 on Fashion-MNIST, no quantization, no sparsity.

Run:
  python -m experiments.train --config=configs/dense_fp32.py --workdir=runs/dense_fp32
"""

from configs.base import get_base


def get_config():
    """Returns the FP32 dense baseline config."""
    c = get_base()
    c.quant.w_bits = 32
    c.quant.a_bits = 32
    c.sparsity.compression = 1.0
    c.sparsity.block_shape = ()
    c.sparsity.prox_strength = 0.0
    c.num_epochs = 30
    c.sparsity.prune_begin_epoch = 30
    c.sparsity.prune_end_epoch = 30
    return c
