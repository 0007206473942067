"""Precision sweep: w_bits {1, 2, 3, 4, 8, 32} x a_bits {1, 2, 4, 8, 32} at a fixed 4X block
compression on Fashion-MNIST (30 settings), MLP 784-256-256-10, 10 epochs.

Run:
  python -m experiments.sweep --config=configs/sweep_precision.py --workdir=runs/sweep_precision

Which precisions can a 4X block-sparse network afford? (The study's claim: 2-bit weights and
activations at 4X stay close to float.) Sized for 2 CPU cores: one setting-epoch costs about
4 CPU-seconds, so the 30 settings x 10 epochs take about 20-25 minutes, in 3 chunks of 10
settings (one compilation; a killed run resumes at the last finished epoch).
"""

import ml_collections

from configs.base import get_base


def get_config():
    """Returns the precision sweep config."""
    c = get_base()
    c.model.hidden = (256, 256)
    c.num_epochs = 10
    c.warmup_epochs = 1
    c.sparsity.compression = 4.0
    c.sparsity.prune_begin_epoch = 2
    c.sparsity.prune_end_epoch = 6  # then 4 epochs of fine-tuning with frozen masks

    c.sweep = ml_collections.ConfigDict()
    c.sweep.w_bits = (1, 2, 3, 4, 8, 32)
    c.sweep.a_bits = (1, 2, 4, 8, 32)
    c.sweep.compression = (4.0,)
    c.sweep.seeds = (0,)
    c.sweep.learning_rate = ()  # () = the config's learning_rate
    c.sweep.prox_strength = ()  # () = the config's sparsity.prox_strength
    c.sweep.models = []  # [] = the config's model
    c.sweep.chunk_size = 10  # 30 settings = 3 chunks, no padding
    # map: on CPU as fast as vmap, and each setting's numbers equal a lone experiments.train
    # run's bit for bit, on any device count; use vmap on accelerators (see experiments/sweep.py).
    c.sweep.vectorize = "map"
    return c
