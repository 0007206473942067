"""Reproduction, part "shapes": shallow-dense 784-256-10 (dense) vs wide-sparse 784-1024-10
(4X) vs deep-sparse 784-512-512-512-10 (4.58X), matched on kept weights (203,264 each), at
w_bits {2, 32} x a_bits {2, 32}: 12 designs, each with seeds 0, 1, 2 (36 runs), 10 epochs,
Fashion-MNIST.

Run:
  python -m experiments.sweep --config=configs/repro_shapes.py --workdir=runs/repro/shapes

See configs/sweep_shapes.py for how the budgets are matched; this part drops the 8X deep
variant to fit the study in its time budget (about 14 minutes on 2 CPU cores).
"""

from configs.sweep_shapes import get_config as _shapes


def get_config():
    """Returns the reproduction shape sweep."""
    c = _shapes()
    c.sweep.models = [
        {"name": "shallow-dense", "hidden": [256], "compression": [1.0]},
        {"name": "wide-sparse", "hidden": [1024], "compression": [4.0]},
        {"name": "deep-sparse", "hidden": [512, 512, 512], "compression": [4.58]},
    ]
    c.sweep.seeds = (0, 1, 2)
    c.sweep.chunk_size = 6
    return c
