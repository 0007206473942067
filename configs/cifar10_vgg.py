"""Small VGG on CIFAR-10 (needs TFDS with network; TensorFlow via `pip install qsparse[tf]`):
2-bit weights, 2-bit activations, 4X blocks; the first conv stays 8-bit and dense-ish.

Run:
  python -m experiments.train --config=configs/cifar10_vgg.py --workdir=runs/cifar10_vgg
"""

from configs.base import get_base


def get_config():
    """Returns the CIFAR-10 VGG config."""
    c = get_base()
    c.dataset = "cifar10"
    c.model.name = "vgg"
    c.model.channels = (32, 64, 128)
    c.model.hidden = (256,)
    c.quant.first_w_bits = 8
    c.sparsity.first_block_shape = (9, 8)  # conv1 (3,3,3,32) is a 27x32 matrix
    c.sparsity.first_compression = 1.0
    c.num_epochs = 60
    c.batch_size = 128
    c.sparsity.prune_begin_epoch = 10
    c.sparsity.prune_end_epoch = 35
    return c
