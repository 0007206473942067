"""Sweep smoke test on scikit-learn's digits (bundled, no download): w_bits {2, 32} x a_bits
{2, 32} x compression {1, 4}, one seed, MLP 64-128-128-10, 8 epochs: 8 settings in seconds.

Run:
  python -m experiments.sweep --config=configs/sweep_digits_smoke.py --workdir=runs/smoke

The 8 settings share one model shape, so they train in two chunks of 4 (sweep.chunk_size)
with one compilation. On 4 devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=4)
each chunk is split over the devices and results.csv is the same. The tests and the analysis
notebook's test use this config, cut down.
"""

import ml_collections

from configs.base import get_base


def get_config():
    """Returns the digits smoke sweep config."""
    c = get_base()
    c.dataset = "digits"
    c.model.hidden = (128, 128)
    c.batch_size = 64
    c.learning_rate = 3e-3
    c.num_epochs = 8
    c.warmup_epochs = 1
    c.sparsity.prune_begin_epoch = 2
    c.sparsity.prune_end_epoch = 5
    c.sparsity.prune_every_steps = 11
    c.sparsity.prox_strength = 1e-3
    c.checkpoint_every_epochs = 2
    c.keep_checkpoints = 2

    c.sweep = ml_collections.ConfigDict()
    c.sweep.w_bits = (2, 32)
    c.sweep.a_bits = (2, 32)
    c.sweep.compression = (1.0, 4.0)
    c.sweep.seeds = (0,)
    c.sweep.learning_rate = ()  # () = the config's learning_rate
    c.sweep.prox_strength = ()  # () = the config's sparsity.prox_strength
    c.sweep.models = []  # [] = the config's model
    c.sweep.chunk_size = 4
    # map: each setting's numbers equal a lone experiments.train run's bit for bit, on any
    # device count; vmap batches the settings (the accelerator path; see experiments/sweep.py).
    c.sweep.vectorize = "map"
    return c
