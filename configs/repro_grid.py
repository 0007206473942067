"""Reproduction, part "grid": w_bits {1, 2, 4, 32} x a_bits {2, 4, 32} x compression
{1, 2, 4, 8, 16} on Fashion-MNIST (60 designs), each with seeds 0, 1, 2 (180 runs), MLP
784-256-256-10, 8 epochs.

Run:
  python -m experiments.sweep --config=configs/repro_grid.py --workdir=runs/repro/grid

The large set of dense and sparse designs the Pareto-optimal ones are drawn from. Narrower
and shorter than the headline runs (configs/joint.py: 784-512-512-10, 30 epochs) so that the
180 runs fit in about 24 minutes on 2 CPU cores; the FP32 dense setting of the same grid is
its own baseline for "within 1 point". The report compares means over the seeds.
"""

from configs.sweep_joint import get_config as _joint


def get_config():
    """Returns the reproduction grid sweep."""
    c = _joint()
    c.sweep.w_bits = (1, 2, 4, 32)
    c.sweep.seeds = (0, 1, 2)
    c.sweep.chunk_size = 15  # 180 runs = 12 chunks
    return c
