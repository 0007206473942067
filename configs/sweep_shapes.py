"""Shape sweep: shallow-dense vs wide-sparse vs deep-sparse MLPs at matched weight memory, on
Fashion-MNIST, w_bits {2, 32} x a_bits {2, 32}, 10 epochs (16 settings).

Run:
  python -m experiments.sweep --config=configs/sweep_shapes.py --workdir=runs/sweep_shapes

The study's claim: at the same memory a deep-sparse network beats a shallow-dense one. The
three variants are matched on kept weights, i.e. on the codes that dominate weight memory:

* shallow-dense 784-256-10, dense: 784*256 + 256*10 = 203,264 weights.
* wide-sparse 784-1024-10 at 4X: 813,056 weights / 4 = 203,264 kept, the same codes exactly;
  its block index adds about 3% (at 2 bits: 55.3 KiB against 50.7 KiB).
* deep-sparse 784-512-512-512-10 at 4.58X: 930,816 weights / 4.58 = about 203,264 kept, the
  same codes again (57.5 KiB at 2 bits); and at 8X, with half the budget (36.2 KiB), to see
  whether depth still wins with less.

Every layer, first and logits included, has the same compression, so the kept weights scale
as above. Each shape compiles once. Sized for 2 CPU cores: a setting-epoch costs about 3
(shallow), 10 (wide) and 14 (deep) CPU-seconds, so the 16 settings x 10 epochs take about
30 minutes.
"""

import ml_collections

from configs.base import get_base


def get_config():
    """Returns the shallow/wide/deep shape sweep config."""
    c = get_base()
    c.num_epochs = 10
    c.warmup_epochs = 1
    c.sparsity.prune_begin_epoch = 2
    c.sparsity.prune_end_epoch = 6  # then 4 epochs of fine-tuning with frozen masks

    c.sweep = ml_collections.ConfigDict()
    c.sweep.w_bits = (2, 32)
    c.sweep.a_bits = (2, 32)
    c.sweep.compression = (4.0,)  # each variant below sets its own
    c.sweep.seeds = (0,)
    c.sweep.learning_rate = ()  # () = the config's learning_rate
    c.sweep.prox_strength = ()  # () = the config's sparsity.prox_strength
    c.sweep.models = [
        {"name": "shallow-dense", "hidden": [256], "compression": [1.0]},
        {"name": "wide-sparse", "hidden": [1024], "compression": [4.0]},
        {"name": "deep-sparse", "hidden": [512, 512, 512], "compression": [4.58, 8.0]},
    ]
    c.sweep.chunk_size = 8  # chunks of 4, 4 and 8 settings: one per shape, no padding
    # map: on CPU as fast as vmap, and each setting's numbers equal a lone experiments.train
    # run's bit for bit, on any device count; use vmap on accelerators (see experiments/sweep.py).
    c.sweep.vectorize = "map"
    return c
