"""Bit-packed model files: writer, reader, and inference from the packed form.

A wrapped model (a :class:`qsparse.wrap.Plan`, its trained ``{"params", "quant"}`` tree and a
concrete layer spec) is written as ONE file whose payload holds exactly what the memory model
(:mod:`qsparse.memory`) counts: per layer the k-bit weight codes of the kept blocks only,
bit-packed as one continuous little-endian (LSB-first) bit stream, the block index (bitmap or
block-CSR, whichever is smaller; none when every block is kept), float32 scales, float32
biases and the float32 activation clip. The payload's size equals ``weight_memory_bits / 8``
up to byte rounding of each array; :func:`save` returns both numbers.

File layout (``docs/FORMAT.md`` is the full specification, enough to decode with numpy alone;
``tools/decode_numpy.py`` is a decoder written from it)::

    32-byte header | manifest (UTF-8 JSON) | payload (the arrays, back to back)

:func:`load` checks the magic, version, sizes, CRC32s and the manifest against the arrays, and
raises :class:`FormatError` (one line) on any mismatch. :class:`PackedModel` decodes the
kernels and runs the model with the same Flax/JAX ops as :func:`qsparse.training.logits_fn`,
so its logits are the trained model's (bit-identical in the tests; XLA may reorder a sum).

The quantizers keep pruned (exactly zero) weights at zero at every bit width, 1-bit and
mid-rise included, so pruned blocks are never stored and decoded kernels equal the trained
fake-quantized kernels bit for bit.

The package's modules:

* :mod:`~qsparse.export.format`: constants, header and CRC32s, bit packing, codes, arrays;
* :mod:`~qsparse.export.graph`: the op graph, traced from the model and proved against it;
* :mod:`~qsparse.export.encode`: one covered weight as codes, block index and scale(s);
* :mod:`~qsparse.export.writer`: :func:`save`, the manifest of either layout, the file;
* :mod:`~qsparse.export.reader`: :func:`load`, :func:`restore`;
* :mod:`~qsparse.export.infer`: :class:`PackedModel`, inference from the packed form.

Example:
  >>> info = save("model.qsp", plan, state.params, spec["layers"], model=model)
  >>> packed = load("model.qsp")
  >>> packed.accuracy(ds.test_x, ds.test_y)
"""

from qsparse.export.format import (
    FULL,
    HEADER_SIZE,
    MAGIC,
    RAW_DTYPES,
    VERSION,
    FormatError,
    code_levels,
    pack_bits,
    packed_nbytes,
    signed_codes,
    unpack_bits,
    unsigned_codes,
)
from qsparse.export.infer import PackedModel
from qsparse.export.reader import PackedLayer, Restored, load, restore
from qsparse.export.writer import save

__all__ = [
    "FULL",
    "HEADER_SIZE",
    "MAGIC",
    "RAW_DTYPES",
    "VERSION",
    "FormatError",
    "PackedLayer",
    "PackedModel",
    "Restored",
    "code_levels",
    "load",
    "pack_bits",
    "packed_nbytes",
    "restore",
    "save",
    "signed_codes",
    "unpack_bits",
    "unsigned_codes",
]
