"""Inference from the packed form: :class:`PackedModel` runs a graph-layout file's op graph.

The graph runs with the same Flax modules and quantizer calls as
:func:`qsparse.training.logits_fn`, so its logits are the trained model's (bit-identical in the
tests; XLA may reorder a sum).
"""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qsparse import quant
from qsparse.export.format import read_array


class PackedModel:
    """A model read from a packed file, ready for inference.

    Attributes:
      manifest: the parsed manifest.
      layers: layer name -> :class:`~qsparse.export.PackedLayer`, in execution order.
      graph: the op list.
      input_shape: one example's shape.
      file_bytes: the file's size.
      payload_bytes: the size of its arrays.
    """

    def __init__(self, manifest: dict, layers: dict, file_bytes: int, table=None, payload=None):
        self._table, self._payload = table or {}, payload
        self.manifest = manifest
        self.layers = layers
        self.graph = manifest.get("graph")
        self.input_shape = tuple(manifest["input"]["shape"])
        self.file_bytes = file_bytes
        self.payload_bytes = int(manifest["payload_bytes"])
        conv = {
            n: (tuple(lay.entry["strides"]), tuple(tuple(p) for p in lay.entry["pads"]))
            for n, lay in self.layers.items()
            if lay.kind == "conv" and self.graph is not None
        }
        # Static and hashable, so models of the same structure share one compiled program.
        self._program = json.dumps({"graph": self.graph, "conv": conv}, sort_keys=True)

    def raw(self, array: str) -> np.ndarray:
        """One array of the payload, decoded by its table entry (name as in the manifest)."""
        return read_array(self._table[array], self._payload)

    @property
    def kernels(self) -> dict[str, np.ndarray]:
        """Layer name -> decoded kernel."""
        return {k: v.kernel for k, v in self.layers.items()}

    def _arrays(self):
        return {
            name: {
                "kernel": jnp.asarray(lay.kernel),
                "bias": None if lay.bias is None else jnp.asarray(lay.bias),
                "a_bits": jnp.asarray(lay.a_bits, jnp.float32),
                "a_clip": None if lay.a_clip is None else jnp.asarray(lay.a_clip),
            }
            for name, lay in self.layers.items()
        }

    def predict(self, x, batch_size: int | None = None) -> np.ndarray:
        """Logits for a float batch (pixels in ``[0, 1]``, as the model was trained on).

        Args:
          x: ``(N, *input_shape)`` (or ``(N, prod(input_shape))``) float array, numpy or jnp.
          batch_size: run in chunks of this many examples (``None``: all at once).

        Returns:
          ``(N, num_classes)`` float32 numpy logits.

        Raises:
          ValueError: a model-layout file (it has no graph).
        """
        if self.graph is None:
            raise ValueError(
                "this file holds a model without a graph: run it through your own model with"
                " qsparse.export.restore(path) and plan.apply(..., quantized=True)"
            )
        x = jnp.asarray(x, jnp.float32)
        x = x.reshape((x.shape[0], *self.input_shape))
        arrays = self._arrays()
        if batch_size is None or x.shape[0] <= batch_size:
            return np.asarray(_forward(self._program, arrays, x))
        outs = [
            np.asarray(_forward(self._program, arrays, x[i : i + batch_size]))
            for i in range(0, x.shape[0], batch_size)
        ]
        return np.concatenate(outs)

    def accuracy(self, x_uint8, y, batch_size: int = 1000) -> float:
        """Top-1 accuracy on uint8 images (scaled by 1/255 as in training).

        Args:
          x_uint8: ``(N, H, W, C)`` uint8 images.
          y: ``(N,)`` integer labels.
          batch_size: evaluation chunk size.

        Returns:
          The fraction classified correctly.
        """
        x = jnp.asarray(x_uint8).astype(jnp.float32) / 255.0
        logits = self.predict(x, batch_size=batch_size)
        return float(np.mean(np.argmax(logits, -1) == np.asarray(y)))


def _layer(kind: str, a: dict, conv) -> nn.Module:
    """The Flax module of a dense or conv op (``conv``: its strides and pads)."""
    features = a["kernel"].shape[-1]
    if kind == "dense":
        return nn.Dense(features, use_bias=a["bias"] is not None)
    strides, pads = conv
    return nn.Conv(
        features,
        tuple(a["kernel"].shape[:2]),
        strides=tuple(strides),
        padding=[tuple(p) for p in pads],
        use_bias=a["bias"] is not None,
    )


def _run_layer(kind: str, a: dict, conv, x):
    """One dense or conv op, then the layer's output quantizer if it has one."""
    variables = {"kernel": a["kernel"]}
    if a["bias"] is not None:
        variables["bias"] = a["bias"]
    x = _layer(kind, a, conv).apply({"params": variables}, x)
    if a["a_clip"] is not None:
        x = quant.quantize_activation(x, a["a_bits"], a["a_clip"])
    return x


@functools.partial(jax.jit, static_argnums=0)
def _forward(program: str, arrays, x):
    """Runs the graph with the same Flax modules and quantizer calls as the trained model."""
    prog = json.loads(program)
    for op in prog["graph"]:
        kind = op["op"]
        if kind == "flatten":
            x = x.reshape((x.shape[0], -1))
        elif kind == "relu":
            x = nn.relu(x)
        elif kind == "max_pool":
            x = nn.max_pool(x, tuple(op["window"]), strides=tuple(op["strides"]))
        elif kind == "mean":
            x = jnp.mean(x, axis=tuple(op["axes"]))
        else:
            conv = prog["conv"][op["layer"]] if kind != "dense" else None
            x = _run_layer(kind, arrays[op["layer"]], conv, x)
    return x
