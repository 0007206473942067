"""Plain Flax (Linen) models: MLPs (shallow-dense, wide-sparse, deep-sparse), LeNet, small VGG.

Nothing here knows about quantization or sparsity; :mod:`qsparse.wrap` applies both from
outside. Every hidden ``Dense``/``Conv`` is followed by a ReLU (the activation quantizer
stands in for it), the last ``Dense`` gives the logits. Inputs are float images in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

MODELS = ("mlp", "lenet", "vgg")


class MLP(nn.Module):
    """Multi-layer perceptron ``in -> hidden[0] -> ... -> num_classes``.

    Attributes:
      hidden: hidden widths; wide-sparse = few wide layers, deep-sparse = more layers.
      num_classes: outputs.
    """

    hidden: Sequence[int]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        """Args: x: ``(batch, ...)`` images. Returns: ``(batch, num_classes)`` logits."""
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class LeNet(nn.Module):
    """LeNet-style CNN for 28x28 inputs: two 5x5 conv + 2x2 max-pool stages, two Dense.

    Attributes:
      channels: channels of the two conv layers.
      hidden: width of the hidden Dense layer.
      num_classes: outputs.
    """

    channels: Sequence[int] = (32, 64)
    hidden: int = 256
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        """Args: x: ``(batch, H, W, C)``. Returns: logits."""
        for ch in self.channels:
            x = nn.relu(nn.Conv(ch, (5, 5), padding="SAME")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class VGG(nn.Module):
    """Small VGG-style CNN for 32x32 inputs: stages of two 3x3 convs and a max-pool.

    Attributes:
      stages: channels per stage.
      hidden: width of the hidden Dense layer.
      num_classes: outputs.
    """

    stages: Sequence[int] = (32, 64, 128)
    hidden: int = 256
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        """Args: x: ``(batch, H, W, C)``. Returns: logits."""
        for ch in self.stages:
            x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME")(x))
            x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2)) if x.shape[1] > 4 else x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def build(
    name: str,
    *,
    num_classes: int,
    hidden: Sequence[int] = (512, 512),
    channels: Sequence[int] = (32, 64),
) -> nn.Module:
    """Builds a model by name.

    Args:
      name: ``"mlp"``, ``"lenet"`` or ``"vgg"``.
      num_classes: outputs.
      hidden: MLP hidden widths (for LeNet/VGG the last entry is the Dense width).
      channels: conv channels (LeNet: two stages; VGG: one entry per stage).

    Returns:
      An unbound Linen module.

    Raises:
      ValueError: unknown name.
    """
    if name == "mlp":
        return MLP(hidden=tuple(int(h) for h in hidden), num_classes=num_classes)
    dense = int(hidden[-1]) if len(hidden) else 256
    if name == "lenet":
        return LeNet(channels=tuple(channels), hidden=dense, num_classes=num_classes)
    if name == "vgg":
        return VGG(stages=tuple(channels), hidden=dense, num_classes=num_classes)
    raise ValueError(f"model.name={name!r} is not allowed: use one of {MODELS}")
