"""Small test networks written the way Flax's own examples write them.

These are plain Flax models, with nothing from qsparse, so tests can check that the library
handles models nobody here wrote. Each one follows a Flax example closely (names, structure,
call signatures), only smaller:

* ``CNN``: the Linen CNN of ``examples/mnist`` (conv, relu, avg_pool, twice; two Dense).
* ``NNXCNN``: the same network as the Flax NNX MNIST tutorial writes it.
* ``ResNet`` / ``ResNetBlock``: ``examples/imagenet/models.py`` (ResNet V1 with BatchNorm),
  laid out for 28x28 inputs the CIFAR way (3x3 stem conv, no max-pool, strides 1, 2, 2).
* ``NNXResNet`` / ``NNXResNetBlock``: the same ResNet in Flax NNX.
* ``TransformerLM``: the decoder-only language model of ``examples/lm1b/models.py``, with
  logically partitioned params and ``config.deterministic`` selecting dropout.
* ``TextClassifier``: the sentiment model of ``examples/sst2/models.py`` (embeddings, dropout,
  a bidirectional ``nn.RNN`` of ``nn.LSTMCell``, a tanh layer and the output), every sequence
  at full length.
* ``NNXTextClassifier`` / ``NNXTransformerEncoder``: the encoder of JAX's "Implement ViT from
  scratch" tutorial in Flax NNX (``nnx.MultiHeadAttention``, ``nnx.Dropout`` layers holding
  their RNG streams, ``nnx.Sequential``), on token embeddings with learned positions.
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx, struct
from jax import lax

ModuleDef = Any


# --------------------------------------------------------------------------------------------
# examples/mnist


class CNN(nn.Module):
    """A simple CNN model (flax examples/mnist)."""

    features: Sequence[int] = (32, 64)
    hidden: int = 256
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=self.features[0], kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=self.features[1], kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # flatten
        x = nn.Dense(features=self.hidden)(x)
        x = nn.relu(x)
        x = nn.Dense(features=self.num_classes)(x)
        return x


class NNXCNN(nnx.Module):
    """A simple CNN model (Flax NNX MNIST tutorial)."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        features: Sequence[int] = (32, 64),
        hidden: int = 256,
        num_classes: int = 10,
        in_features: int = 1,
        image_size: int = 28,
    ):
        self.conv1 = nnx.Conv(in_features, features[0], kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(features[0], features[1], kernel_size=(3, 3), rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        flat = (image_size // 4) * (image_size // 4) * features[1]  # 3136 for MNIST
        self.linear1 = nnx.Linear(flat, hidden, rngs=rngs)
        self.linear2 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.conv1(x)))
        x = self.avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.linear1(x))
        x = self.linear2(x)
        return x


# --------------------------------------------------------------------------------------------
# examples/imagenet/models.py


class ResNetBlock(nn.Module):
    """ResNet block."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
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
    """ResNetV1, CIFAR layout (3x3 stem, no max-pool) for small images such as 28x28x1."""

    stage_sizes: Sequence[int] = (1, 1, 1)
    block_cls: ModuleDef = ResNetBlock
    num_classes: int = 10
    num_filters: int = 4
    dtype: Any = jnp.float32
    act: Callable = nn.relu
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
        )

        x = conv(self.num_filters, (3, 3), (1, 1), padding=[(1, 1), (1, 1)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**i,
                    strides=strides,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        x = jnp.asarray(x, self.dtype)
        return x


ResNet8 = partial(ResNet, stage_sizes=(1, 1, 1), num_filters=16, block_cls=ResNetBlock)
ResNet20 = partial(ResNet, stage_sizes=(3, 3, 3), num_filters=16, block_cls=ResNetBlock)


class NNXResNetBlock(nnx.Module):
    """ResNet block (Flax NNX)."""

    def __init__(
        self,
        in_features: int,
        filters: int,
        *,
        strides: tuple[int, int] = (1, 1),
        rngs: nnx.Rngs,
    ):
        conv = partial(nnx.Conv, use_bias=False, rngs=rngs)
        norm = partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.conv1 = conv(in_features, filters, (3, 3), strides)
        self.bn1 = norm(filters)
        self.conv2 = conv(filters, filters, (3, 3))
        self.bn2 = norm(filters, scale_init=nnx.initializers.zeros_init())
        if in_features != filters or strides != (1, 1):
            self.conv_proj = conv(in_features, filters, (1, 1), strides)
            self.norm_proj = norm(filters)
        else:
            self.conv_proj = None
            self.norm_proj = None

    def __call__(self, x):
        residual = x
        y = self.conv1(x)
        y = self.bn1(y)
        y = nnx.relu(y)
        y = self.conv2(y)
        y = self.bn2(y)

        if self.conv_proj is not None:
            residual = self.conv_proj(residual)
            residual = self.norm_proj(residual)

        return nnx.relu(residual + y)


class NNXResNet(nnx.Module):
    """ResNetV1, CIFAR layout, in Flax NNX; ``model.train()`` / ``model.eval()`` pick the mode."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        stage_sizes: Sequence[int] = (1, 1, 1),
        num_filters: int = 4,
        num_classes: int = 10,
        in_features: int = 1,
    ):
        self.conv_init = nnx.Conv(
            in_features,
            num_filters,
            (3, 3),
            padding=[(1, 1), (1, 1)],
            use_bias=False,
            rngs=rngs,
        )
        self.bn_init = nnx.BatchNorm(num_filters, momentum=0.9, epsilon=1e-5, rngs=rngs)
        blocks = []
        features = num_filters
        for i, block_size in enumerate(stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                filters = num_filters * 2**i
                blocks.append(NNXResNetBlock(features, filters, strides=strides, rngs=rngs))
                features = filters
        self.blocks = nnx.List(blocks)
        self.linear = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.conv_init(x)
        x = self.bn_init(x)
        x = nnx.relu(x)
        for block in self.blocks:
            x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        x = self.linear(x)
        return x


# --------------------------------------------------------------------------------------------
# examples/lm1b/models.py


@struct.dataclass
class TransformerConfig:
    """Global hyperparameters used to minimize obnoxious kwarg plumbing."""

    vocab_size: int = 32
    logits_via_embedding: bool = False
    dtype: Any = jnp.float32
    emb_dim: int = 16
    num_heads: int = 2
    num_layers: int = 2
    qkv_dim: int = 16
    mlp_dim: int = 32
    max_len: int = 16
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    deterministic: bool = False
    kernel_init: Callable = nn.initializers.xavier_uniform()
    bias_init: Callable = nn.initializers.normal(stddev=1e-6)
    posemb_init: Callable | None = None


def shift_right(x, axis=1):
    """Shift the input to the right by padding and slicing on axis."""
    pad_widths = [(0, 0)] * len(x.shape)
    pad_widths[axis] = (1, 0)
    padded = jnp.pad(x, pad_widths, mode="constant", constant_values=x.dtype.type(0))
    return lax.dynamic_slice_in_dim(padded, 0, padded.shape[axis] - 1, axis)


def shift_inputs(x, segment_ids=None, axis=1):
    """Shift inputs and replace EOS by 0 for packed inputs."""
    shifted = shift_right(x, axis=axis)
    # For packed targets, the first shifted token of a new sequence is made
    # 0, rather than being the EOS token for the last sequence.
    if segment_ids is not None:
        shifted *= segment_ids == shift_right(segment_ids, axis=axis)
    return shifted


def sinusoidal_init(max_len=2048, min_scale=1.0, max_scale=10000.0):
    """1D Sinusoidal Position Embedding Initializer; returns an init giving (1, max_len, d)."""

    def init(key, shape, dtype=np.float32):
        """Sinusoidal init."""
        del key, dtype
        d_feature = shape[-1]
        pe = np.zeros((max_len, d_feature), dtype=np.float32)
        position = np.arange(0, max_len)[:, np.newaxis]
        scale_factor = -np.log(max_scale / min_scale) / (d_feature // 2 - 1)
        div_term = min_scale * np.exp(np.arange(0, d_feature // 2) * scale_factor)
        pe[:, : d_feature // 2] = np.sin(position * div_term)
        pe[:, d_feature // 2 : 2 * (d_feature // 2)] = np.cos(position * div_term)
        pe = pe[np.newaxis, :, :]  # [1, max_len, d_feature]
        return jnp.array(pe)

    return init


class AddPositionEmbs(nn.Module):
    """Adds (optionally learned) positional embeddings to the inputs."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs, inputs_positions=None):
        """Applies AddPositionEmbs module; sinusoidal unless config.posemb_init is given."""
        config = self.config
        # inputs.shape is (batch_size, seq_len, emb_dim)
        assert inputs.ndim == 3, f"Number of dimensions should be 3, but it is: {inputs.ndim}"
        length = inputs.shape[1]
        pos_emb_shape = (1, config.max_len, inputs.shape[-1])
        if config.posemb_init is None:
            # Use a fixed (non-learned) sinusoidal position embedding.
            pos_embedding = sinusoidal_init(max_len=config.max_len)(None, pos_emb_shape, None)
        else:
            pos_embedding = self.param("pos_embedding", config.posemb_init, pos_emb_shape)
        pe = pos_embedding[:, :length, :]
        if inputs_positions is None:
            # normal unpacked case:
            return inputs + pe
        else:
            # for packed data we need to use known position indices:
            return inputs + jnp.take(pe[0], inputs_positions, axis=0)


class MlpBlock(nn.Module):
    """Transformer MLP / feed-forward block."""

    config: TransformerConfig
    out_dim: int | None = None

    @nn.compact
    def __call__(self, inputs):
        """Applies Transformer MlpBlock module."""
        config = self.config
        actual_out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
        x = nn.Dense(
            config.mlp_dim,
            dtype=config.dtype,
            kernel_init=nn.with_logical_partitioning(config.kernel_init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(config.bias_init, ("mlp",)),
        )(inputs)
        x = nn.relu(x)
        x = nn.Dropout(rate=config.dropout_rate)(x, deterministic=config.deterministic)
        output = nn.Dense(
            actual_out_dim,
            dtype=config.dtype,
            kernel_init=nn.with_logical_partitioning(config.kernel_init, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(config.bias_init, ("embed",)),
        )(x)
        output = nn.Dropout(rate=config.dropout_rate)(output, deterministic=config.deterministic)
        return output


class EncoderDecoder1DBlock(nn.Module):
    """Transformer encoder-decoder layer (pre-LayerNorm, causal self-attention, MLP)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs, decoder_mask=None):
        """Applies EncoderDecoder1DBlock module."""
        config = self.config

        # Decoder block.
        assert inputs.ndim == 3
        x = nn.LayerNorm(
            dtype=config.dtype,
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        )(inputs)
        x = nn.MultiHeadDotProductAttention(
            num_heads=config.num_heads,
            dtype=config.dtype,
            qkv_features=config.qkv_dim,
            kernel_init=nn.with_logical_partitioning(config.kernel_init, ("embed", "kv")),
            bias_init=nn.with_logical_partitioning(config.bias_init, ("embed",)),
            use_bias=False,
            broadcast_dropout=False,
            dropout_rate=config.attention_dropout_rate,
            deterministic=config.deterministic,
        )(x, mask=decoder_mask)
        x = nn.Dropout(rate=config.dropout_rate)(x, deterministic=config.deterministic)
        x = x + inputs

        # MLP block.
        z = nn.LayerNorm(
            dtype=config.dtype,
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        )(x)
        z = MlpBlock(config=config)(z)

        return x + z


class Decoder(nn.Module):
    """Transformer decoder stack: embedding, position embeddings, blocks, norm, logits."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs, inputs_positions=None, inputs_segmentation=None, decoder_mask=None):
        """Applies the decoder to int token ids of shape (batch, len); returns logits."""
        config = self.config
        assert inputs.ndim == 2  # (batch, len)

        # Target Embedding
        output_embed = nn.Embed(
            num_embeddings=config.vocab_size,
            features=config.emb_dim,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0), ("vocab", "embed")
            ),
        )

        y = inputs.astype("int32")
        y = shift_inputs(y, segment_ids=inputs_segmentation)
        y = output_embed(y)
        y = AddPositionEmbs(config=config, name="posembed_output")(
            y, inputs_positions=inputs_positions
        )
        y = nn.Dropout(rate=config.dropout_rate)(y, deterministic=config.deterministic)

        y = y.astype(config.dtype)

        # Target-Input Decoder
        for lyr in range(config.num_layers):
            y = EncoderDecoder1DBlock(config=config, name=f"encoderdecoderblock_{lyr}")(
                y, decoder_mask=decoder_mask
            )
        y = nn.LayerNorm(
            dtype=config.dtype,
            name="encoderdecoder_norm",
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        )(y)

        # Decoded Logits
        if config.logits_via_embedding:
            # Use the transpose of embedding matrix for logit transform.
            logits = output_embed.attend(y.astype(jnp.float32))
            # Correctly normalize pre-softmax logits for this shared case.
            logits = logits / jnp.sqrt(y.shape[-1])
        else:
            logits = nn.Dense(
                config.vocab_size,
                dtype=config.dtype,
                kernel_init=nn.with_logical_partitioning(config.kernel_init, ("embed", "vocab")),
                bias_init=nn.with_logical_partitioning(config.bias_init, ("vocab",)),
                name="logitdense",
            )(y)
        return logits


class TransformerLM(nn.Module):
    """Transformer pure decoder stack for language modelling (flax examples/lm1b)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs, inputs_positions=None, inputs_segmentation=None):
        """Applies TransformerLM to int32 token ids of shape (batch, len); returns logits."""
        config = self.config

        # Make padding attention masks.
        decoder_mask = nn.combine_masks(
            nn.make_attention_mask(inputs > 0, inputs > 0, dtype=config.dtype),
            nn.make_causal_mask(inputs, dtype=config.dtype),
        )

        # Add segmentation block-diagonal attention masks if using segmented data.
        if inputs_segmentation is not None:
            decoder_mask = nn.combine_masks(
                decoder_mask,
                nn.make_attention_mask(
                    inputs_segmentation,
                    inputs_segmentation,
                    jnp.equal,
                    dtype=config.dtype,
                ),
            )

        logits = Decoder(config=config, name="decoder")(
            inputs,
            inputs_positions=inputs_positions,
            inputs_segmentation=inputs_segmentation,
            decoder_mask=decoder_mask,
        )
        return logits.astype(self.config.dtype)


# --------------------------------------------------------------------------------------------
# examples/sst2/models.py


class TextClassifier(nn.Module):
    """Embeddings, dropout, a bidirectional LSTM, a tanh layer and the output layer."""

    embedding_size: int = 8
    hidden_size: int = 8
    vocab_size: int = 32
    output_size: int = 10
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, token_ids, deterministic: bool = False):
        embedded = nn.Embed(self.vocab_size, self.embedding_size, name="embedder")(token_ids)
        embedded = nn.Dropout(self.dropout_rate, deterministic=deterministic)(embedded)
        encoded = nn.Bidirectional(
            nn.RNN(nn.LSTMCell(self.hidden_size)),
            nn.RNN(nn.LSTMCell(self.hidden_size)),
            name="encoder",
        )(embedded)
        hidden = nn.tanh(nn.Dense(self.hidden_size, name="intermediate")(encoded[:, -1]))
        hidden = nn.Dropout(self.dropout_rate, deterministic=deterministic)(hidden)
        return nn.Dense(self.output_size, name="output")(hidden)


# --------------------------------------------------------------------------------------------
# JAX "Implement ViT from scratch" tutorial (Flax NNX), on tokens


class NNXTransformerEncoder(nnx.Module):
    """Pre-norm Transformer encoder block; dropout layers keep their own RNG streams."""

    def __init__(
        self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float, *, rngs
    ):
        self.norm1 = nnx.LayerNorm(hidden_size, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=num_heads,
            in_features=hidden_size,
            dropout_rate=dropout_rate,
            broadcast_dropout=False,
            decode=False,
            deterministic=False,
            rngs=rngs,
        )
        self.norm2 = nnx.LayerNorm(hidden_size, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(hidden_size, mlp_dim, rngs=rngs),
            nnx.gelu,
            nnx.Dropout(dropout_rate, rngs=rngs),
            nnx.Linear(mlp_dim, hidden_size, rngs=rngs),
            nnx.Dropout(dropout_rate, rngs=rngs),
        )

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class NNXTextClassifier(nnx.Module):
    """Token embeddings plus learned positions, encoder blocks, a mean-pooled linear head."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        vocab_size: int = 32,
        max_len: int = 12,
        hidden_size: int = 16,
        mlp_dim: int = 32,
        num_heads: int = 2,
        num_layers: int = 1,
        num_classes: int = 10,
        dropout_rate: float = 0.1,
    ):
        self.embed = nnx.Embed(vocab_size, hidden_size, rngs=rngs)
        init = nnx.initializers.truncated_normal(stddev=0.02)
        self.pos_embedding = nnx.Param(init(rngs.params(), (1, max_len, hidden_size)))
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.encoder = nnx.List(
            [
                NNXTransformerEncoder(hidden_size, mlp_dim, num_heads, dropout_rate, rngs=rngs)
                for _ in range(num_layers)
            ]
        )
        self.final_norm = nnx.LayerNorm(hidden_size, rngs=rngs)
        self.classifier = nnx.Linear(hidden_size, num_classes, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos_embedding[:, : tokens.shape[1]]
        x = self.dropout(x)
        for block in self.encoder:
            x = block(x)
        return self.classifier(self.final_norm(x).mean(axis=1))
