"""Reproduction, part "cnn": a LeNet-style CNN (conv 16, conv 32, Dense 256) on Fashion-MNIST,
w/a bits {2/2, 32/32} (``sweep.bit_pairs``) x compression {1, 4}: FP32 dense, quantization
only, sparsity only and joint (4 designs), each with seeds 0, 1, 2 (12 runs), 3 epochs.

Run:
  python -m experiments.sweep --config=configs/repro_cnn_grid.py --workdir=runs/repro/cnn_grid

The seed's claims on a convolutional network, at a size that fits the study's time budget on 2
CPU cores (about 20 minutes): narrower and shorter than configs/lenet.py (32/64 channels, 10
epochs), every covered layer quantized and blocked, the first conv's 25x16 matrix in (5, 8)
blocks.
"""

from configs.lenet import get_config as _lenet
from configs.sweep_joint import get_config as _sweep


def get_config():
    """Returns the CNN grid sweep."""
    c = _lenet()
    c.model.channels = (16, 32)
    c.num_epochs = 3
    c.warmup_epochs = 1
    c.sparsity.prune_begin_epoch = 1
    c.sparsity.prune_end_epoch = 2
    c.sweep = _sweep().sweep
    c.sweep.bit_pairs = [[2, 2], [32, 32]]
    c.sweep.compression = (1.0, 4.0)
    c.sweep.seeds = (0, 1, 2)
    c.sweep.chunk_size = 6  # 12 runs = 2 chunks
    return c
