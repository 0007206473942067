"""Digits (scikit-learn's 8x8, bundled, no download): joint 2/2/4X MLP 64-256-256-10 in seconds.

Run:
  python -m experiments.train --config=configs/digits.py --workdir=runs/digits
"""

from configs.base import get_base


def get_config():
    """Returns the digits config."""
    c = get_base()
    c.dataset = "digits"
    c.model.hidden = (256, 256)
    c.batch_size = 64
    c.learning_rate = 3e-3
    c.num_epochs = 60
    c.warmup_epochs = 1
    c.sparsity.prune_begin_epoch = 10
    c.sparsity.prune_end_epoch = 40
    c.sparsity.prune_every_steps = 22
    c.sparsity.prox_strength = 1e-3
    c.checkpoint_every_epochs = 10
    return c
