"""Reproduction, part "shapes": shallow-dense 784-256-10 (dense) vs wide-sparse 784-1024-10
(4X) vs deep-sparse 784-512-512-512-10 (4.58X), matched on kept weights (203,264 each), at
w2/a2 and w32/a32 (``sweep.bit_pairs``): 6 designs, each with seeds 0, 1, 2 (18 runs), 10
epochs, Fashion-MNIST.

Run:
  python -m experiments.sweep --config=configs/repro_shapes.py --workdir=runs/repro/shapes

See configs/sweep_shapes.py for how the budgets are matched; this part drops the 8X deep
variant and the mixed w2/a32, w32/a2 designs to fit the study in its time budget (about 6
minutes on 2 CPU cores).
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
    c.sweep.bit_pairs = [[2, 2], [32, 32]]
    c.sweep.seeds = (0, 1, 2)
    c.sweep.chunk_size = 6
    return c
