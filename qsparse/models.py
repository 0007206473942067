"""Plain Flax (Linen) models: MLPs (shallow-dense, wide-sparse, deep-sparse), LeNet, small VGG,
ResNet (ResNet-8 / ResNet-20 with BatchNorm, CIFAR layout for 28x28 images).

Nothing here knows about quantization or sparsity; :mod:`qsparse.wrap` applies both from
outside. Every hidden ``Dense``/``Conv`` is followed by a ReLU (the activation quantizer
stands in for it; in the ResNet by a BatchNorm and then a ReLU, or by the residual add and
then a ReLU), the last ``Dense`` gives the logits. Inputs are float images in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

MODELS = ("mlp", "lenet", "vgg", "resnet")
ModuleDef = Any


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


class ResNetBlock(nn.Module):
    """ResNet V1 basic block: conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU.

    The shortcut is the input itself, or a 1x1 convolution + BatchNorm (``conv_proj``,
    ``norm_proj``) where the block changes the shape (stride 2 or more channels). As in Flax's
    ``examples/imagenet/models.py``, the second BatchNorm's scale starts at zero, so every
    block starts as the identity.

    Attributes:
      filters: output channels.
      conv: the convolution (``nn.Conv`` without bias).
      norm: the normalization (``nn.BatchNorm`` with its mode set).
      act: the activation.
      strides: strides of the first convolution (and of the projection).
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        """Args: x: ``(batch, H, W, C)``. Returns: ``(batch, H/s, W/s, filters)``."""
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)

        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)

        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNet V1 with BatchNorm, CIFAR layout, for small images (28x28x1; 8x8 works too).

    A 3x3 stem convolution + BatchNorm + ReLU (no max-pool), then stages of
    :class:`ResNetBlock` (the first block of every stage after the first has stride 2),
    global average pooling and a ``Dense`` head, written as Flax's
    ``examples/imagenet/models.py`` writes its ResNet. Depth ``2 + 2 * blocks * stages``:
    ResNet-8 is one block per stage, ResNet-20 three, both on widths 16/32/64.

    Attributes:
      stage_sizes: blocks per stage.
      widths: channels per stage (the stem has ``widths[0]``).
      num_classes: outputs.
      act: the activation.
    """

    stage_sizes: Sequence[int] = (1, 1, 1)
    widths: Sequence[int] = (16, 32, 64)
    num_classes: int = 10
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = True):
        """Args: x: ``(batch, H, W, C)``; train: batch statistics (and their update) rather
        than the running averages. Returns: logits."""
        conv = partial(nn.Conv, use_bias=False)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)

        x = conv(self.widths[0], (3, 3), (1, 1), padding=[(1, 1), (1, 1)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = self.act(x)
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(
                    self.widths[i], strides=strides, conv=conv, norm=norm, act=self.act
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


ResNet8 = partial(ResNet, stage_sizes=(1, 1, 1), widths=(16, 32, 64))
ResNet20 = partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64))


def resnet_blocks(depth: int, stages: int) -> int | None:
    """Blocks per stage of a ResNet of ``depth`` layers over ``stages`` stages.

    Args:
      depth: weight layers on the main path, ``2 + 2 * blocks * stages`` (8, 14, 20, ...
        for three stages).
      stages: number of stages (at least 1).

    Returns:
      The blocks per stage, or None where no whole number of blocks gives ``depth``.
    """
    if not isinstance(depth, int) or stages < 1 or depth < 2 + 2 * stages:
        return None
    blocks, rem = divmod(depth - 2, 2 * stages)
    return blocks if rem == 0 else None


def build(
    name: str,
    *,
    num_classes: int,
    hidden: Sequence[int] = (512, 512),
    channels: Sequence[int] = (32, 64),
    depth: int = 8,
) -> nn.Module:
    """Builds a model by name.

    Args:
      name: ``"mlp"``, ``"lenet"``, ``"vgg"`` or ``"resnet"``.
      num_classes: outputs.
      hidden: MLP hidden widths (for LeNet/VGG the last entry is the Dense width; the ResNet
        has no hidden Dense layer).
      channels: conv channels (LeNet: two stages; VGG and ResNet: one entry per stage).
      depth: the ResNet's depth, ``2 + 2 * blocks * len(channels)`` (8 = ResNet-8 and
        20 = ResNet-20 on three stages); other models ignore it.

    Returns:
      An unbound Linen module.

    Raises:
      ValueError: unknown name, or a depth no whole number of ResNet blocks gives.
    """
    if name == "mlp":
        return MLP(hidden=tuple(int(h) for h in hidden), num_classes=num_classes)
    dense = int(hidden[-1]) if len(hidden) else 256
    if name == "lenet":
        return LeNet(channels=tuple(channels), hidden=dense, num_classes=num_classes)
    if name == "vgg":
        return VGG(stages=tuple(channels), hidden=dense, num_classes=num_classes)
    if name == "resnet":
        widths = tuple(int(c) for c in channels)
        blocks = resnet_blocks(depth, len(widths))
        if blocks is None:
            raise ValueError(
                f"model.depth={depth!r} is not allowed: use 2 + 2 * blocks * {len(widths)}"
                f" (blocks >= 1, {len(widths)} stages), e.g. {2 + 2 * len(widths)}"
            )
        return ResNet(stage_sizes=(blocks,) * len(widths), widths=widths, num_classes=num_classes)
    raise ValueError(f"model.name={name!r} is not allowed: use one of {MODELS}")
