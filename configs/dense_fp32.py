"""FP32 dense baseline: MLP 784-512-512-10 on Fashion-MNIST, no quantization, no sparsity.

The quantization-only config (dense, 30 epochs) with 32-bit weights and activations.

Run:
  python -m experiments.train --config=configs/dense_fp32.py --workdir=runs/dense_fp32
"""

from configs.quant_only import get_config as _quant_only


def get_config():
    """Returns the FP32 dense baseline config."""
    c = _quant_only()
    c.quant.w_bits = 32
    c.quant.a_bits = 32
    return c
