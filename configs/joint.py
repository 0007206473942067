"""Joint: 2-bit weights, 2-bit activations, 4X block compression on every layer (first and
last included), Fashion-MNIST, MLP 784-512-512-10, 30 epochs; the forward matmuls after the
first layer run on the integer codes (``quant.int_matmul``), and their backward matmuls in
bfloat16 on the codes and the rounded output gradient (``quant.bf16_grads``).

Run:
  python -m experiments.train --config=configs/joint.py --workdir=runs/joint
"""

from configs.base import get_base


def get_config():
    """Returns the joint 2/2/4X config."""
    c = get_base()
    c.num_epochs = 30
    c.quant.int_matmul = True  # layers after the first multiply integer codes (exact, bf16)
    c.quant.bf16_grads = True  # and their gradients in bf16 (rounded output gradient)
    c.sparsity.prune_begin_epoch = 4
    c.sparsity.prune_end_epoch = 14
    return c
