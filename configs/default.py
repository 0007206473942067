"""Default: joint 2-bit weights, 2-bit activations, 4X blocks on every layer, Fashion-MNIST MLP.

MLP 784-512-512-10, 20 epochs (3 train + prox, 7 gradual pruning, 10 fine-tuning); a few
minutes on 2 CPU cores.

Run:
  python -m experiments.train --config=configs/default.py --workdir=runs/default
"""

from configs.base import get_base


def get_config():
    """Returns the default experiment config."""
    return get_base()
