"""Joint sweep: w_bits {1, 2, 3, 4, 8, 32} x a_bits {2, 4, 32} x compression {1, 2, 4, 8, 16}
on Fashion-MNIST (90 settings), MLP 784-256-256-10, 8 epochs.

Run:
  python -m experiments.sweep --config=configs/sweep_joint.py --workdir=runs/sweep_joint

The large set of sparse and dense models from which the Pareto designs are extracted (the
study found 11): does quantization buy more than sparsity (about 16X against 2X there), and do
high-sparsity designs lose part of their edge once activation memory is counted
(pareto.png against pareto_weight.png)? Sized for 2 CPU cores: one setting-epoch costs about
4 CPU-seconds, so 90 settings x 8 epochs take about 50 minutes, in 6 chunks of 15 settings
(one compilation; a killed run resumes at the last finished epoch).
"""

import ml_collections

from configs.base import get_base


def get_config():
    """Returns the joint quantization x sparsity sweep config."""
    c = get_base()
    c.model.hidden = (256, 256)
    c.num_epochs = 8
    c.warmup_epochs = 1
    c.sparsity.prune_begin_epoch = 2
    c.sparsity.prune_end_epoch = 5  # then 3 epochs of fine-tuning with frozen masks

    c.sweep = ml_collections.ConfigDict()
    c.sweep.w_bits = (1, 2, 3, 4, 8, 32)
    c.sweep.a_bits = (2, 4, 32)
    c.sweep.compression = (1.0, 2.0, 4.0, 8.0, 16.0)
    c.sweep.seeds = (0,)
    c.sweep.learning_rate = ()  # () = the config's learning_rate
    c.sweep.prox_strength = ()  # () = the config's sparsity.prox_strength
    c.sweep.models = []  # [] = the config's model
    c.sweep.chunk_size = 15  # 90 settings = 6 chunks, no padding
    # map: on CPU as fast as vmap, and each setting's numbers equal a lone experiments.train
    # run's bit for bit, on any device count; use vmap on accelerators (see experiments/sweep.py).
    c.sweep.vectorize = "map"
    return c
