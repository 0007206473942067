"""Deep-sparse: four hidden layers (784-512-512-512-512-10), 2-bit / 2-bit, 4X blocks.

Run:
  python -m experiments.train --config=configs/deep_sparse.py --workdir=runs/deep_sparse
"""

from configs.base import get_base


def get_config():
    """Returns the deep-sparse config."""
    c = get_base()
    c.model.hidden = (512, 512, 512, 512)
    return c
