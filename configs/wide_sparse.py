"""Wide-sparse: one wide hidden layer (784-1024-10), 2-bit / 2-bit, 4X blocks, Fashion-MNIST.

Run:
  python -m experiments.train --config=configs/wide_sparse.py --workdir=runs/wide_sparse
"""

from configs.base import get_base


def get_config():
    """Returns the wide-sparse config."""
    c = get_base()
    c.model.hidden = (1024,)
    return c
