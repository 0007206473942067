"""The file format's building blocks: constants, header and CRC32s, bit packing, codes, arrays.

Everything here is specified in ``docs/FORMAT.md`` and shared by the writer and the reader::

    32-byte header | manifest (UTF-8 JSON) | payload (the arrays, back to back)
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import NoReturn

import jax.numpy as jnp
import numpy as np

from qsparse import quant

MAGIC = b"\x89QSPARSE"
VERSION = 1
# magic, version, manifest length, manifest CRC32, payload length, payload CRC32.
HEADER = struct.Struct("<8sIIIQI")
HEADER_SIZE = HEADER.size  # 32
FULL = quant.FULL_PRECISION
# Parameters and statistics that are not covered weights are stored as they are, little-endian.
RAW_DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int32", "uint32")
# Dtypes a model-layout kernel decodes to (float32 ``code * scale``, rounded to it).
KERNEL_DTYPES = ("float32", "bfloat16", "float16")


class FormatError(ValueError):
    """A packed model file is malformed: bad magic or version, truncated, or corrupted."""


def fail(msg: str) -> NoReturn:
    """Raises :class:`FormatError` with the one-line message ``msg``."""
    raise FormatError(msg)


# ---- bit packing -----------------------------------------------------------------------------


def pack_bits(values, bits: int) -> bytes:
    """Packs unsigned integers into a continuous LSB-first bit stream.

    Element ``i`` occupies stream bits ``i*bits .. (i+1)*bits - 1``, its least significant bit
    first; stream bit ``j`` is bit ``j % 8`` (value ``1 << (j % 8)``) of byte ``j // 8``. The
    unused high bits of the last byte are zero.

    Args:
      values: non-negative integers, each ``< 2**bits`` (any shape; flattened row-major).
      bits: bits per value, 1..31.

    Returns:
      ``ceil(len(values) * bits / 8)`` bytes.

    Raises:
      ValueError: a value does not fit in ``bits`` bits.
    """
    v = np.asarray(values, np.int64).ravel()
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"values in [{v.min()}, {v.max()}] do not fit in {bits} unsigned bits")
    stream = ((v[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(stream.ravel(), bitorder="little").tobytes()


def unpack_bits(data, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    Args:
      data: the packed bytes (at least ``ceil(count * bits / 8)``).
      bits: bits per value.
      count: number of values.

    Returns:
      int64 array of ``count`` values.
    """
    buf = np.frombuffer(data, np.uint8)
    stream = np.unpackbits(buf, bitorder="little", count=count * bits)
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    return stream.reshape(count, bits).astype(np.int64) @ weights


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` values packed at ``bits`` bits each.

    Args:
      count: number of values.
      bits: bits per value.

    Returns:
      ``ceil(count * bits / 8)``.
    """
    return (count * bits + 7) // 8


# ---- codes -----------------------------------------------------------------------------------


def unsigned_codes(c, bits: int) -> np.ndarray:
    """Signed codes -> the unsigned codes stored in the file.

    Args:
      c: signed integer codes (binary: -1/+1; else -n..n, or -2**(b-1)..2**(b-1)-1 mid-rise).
      bits: weight bits (1..31).

    Returns:
      int64 ``u``: ``(c + 1) / 2`` for ``bits == 1``, else ``c + 2**(bits - 1)``.
    """
    c = np.asarray(c, np.int64)
    return (c + 1) // 2 if bits == 1 else c + (1 << (bits - 1))


def signed_codes(u, bits: int) -> np.ndarray:
    """Inverse of :func:`unsigned_codes`.

    Args:
      u: unsigned codes.
      bits: weight bits.

    Returns:
      int64 ``c``: ``2u - 1`` for ``bits == 1``, else ``u - 2**(bits - 1)``.
    """
    u = np.asarray(u, np.int64)
    return 2 * u - 1 if bits == 1 else u - (1 << (bits - 1))


def code_levels(u, bits: int, zero_level: bool = True) -> np.ndarray:
    """The level multiplier (value / scale) of unsigned codes, float32.

    ``bits == 1``: ``2u - 1`` (``{-1, +1}``). ``zero_level``: ``u - 2**(bits-1)`` (``-n .. n``,
    ``n = 2**(bits-1) - 1``; ``u = 0`` unused). Mid-rise: ``u - 2**(bits-1) + 1/2``.

    Args:
      u: unsigned codes (integer array).
      bits: weight bits.
      zero_level: the level set.

    Returns:
      float32 array of the same shape.
    """
    u = np.asarray(u, np.int64)
    if bits == 1:
        return (2 * u - 1).astype(np.float32)
    v = (u - (1 << (bits - 1))).astype(np.float32)
    return v if zero_level else v + np.float32(0.5)


# ---- blocks ----------------------------------------------------------------------------------


def blocks(mat: np.ndarray, bm: int, bn: int) -> np.ndarray:
    """Cuts a matrix into blocks.

    Args:
      mat: an ``(R*bm, C*bn)`` matrix.
      bm: block rows.
      bn: block columns.

    Returns:
      The ``(R*C, bm, bn)`` blocks in row-major block order.
    """
    m, n = mat.shape
    return mat.reshape(m // bm, bm, n // bn, bn).transpose(0, 2, 1, 3).reshape(-1, bm, bn)


def unblocks(blocks: np.ndarray, grid, bm: int, bn: int) -> np.ndarray:
    """Inverse of :func:`blocks`.

    Args:
      blocks: ``(R*C, bm, bn)`` blocks in row-major block order.
      grid: ``(R, C)``.
      bm: block rows.
      bn: block columns.

    Returns:
      The ``(R*bm, C*bn)`` matrix.
    """
    r, c = grid
    return blocks.reshape(r, c, bm, bn).transpose(0, 2, 1, 3).reshape(r * bm, c * bn)


# ---- header and arrays -----------------------------------------------------------------------


def pack_file(manifest: bytes, payload: bytes) -> bytes:
    """Puts the header in front of the manifest and payload.

    Args:
      manifest: the UTF-8 JSON manifest.
      payload: the arrays, back to back.

    Returns:
      The whole file: header (magic, version, sizes and CRC32s), manifest, payload.
    """
    header = HEADER.pack(
        MAGIC, VERSION, len(manifest), zlib.crc32(manifest), len(payload), zlib.crc32(payload)
    )
    return header + manifest + payload


def _check_header(data: bytes) -> tuple[int, int, int, int]:
    """Magic, version and sizes; returns the manifest and payload lengths and CRC32s."""
    if len(data) < len(MAGIC) and data == MAGIC[: len(data)]:
        fail(f"truncated file: {len(data)} bytes, the header alone needs {HEADER_SIZE}")
    if data[: len(MAGIC)] != MAGIC:
        fail(f"bad magic {bytes(data[:8])!r}: not a qsparse packed model (expected {MAGIC!r})")
    if len(data) < HEADER_SIZE:
        fail(f"truncated file: {len(data)} bytes, the header alone needs {HEADER_SIZE}")
    _, version, man_len, man_crc, pay_len, pay_crc = HEADER.unpack_from(data)
    if version != VERSION:
        fail(f"format version {version} is not supported: this reader reads version {VERSION}")
    need = HEADER_SIZE + man_len + pay_len
    if len(data) < need:
        fail(f"truncated file: {len(data)} bytes, the header announces {need}")
    if len(data) > need:
        fail(f"{len(data) - need} unexpected trailing bytes after the payload")
    return man_len, man_crc, pay_len, pay_crc


def parse_file(data: bytes) -> tuple[dict, memoryview]:
    """Checks header, sizes and CRCs.

    Args:
      data: the file's bytes.

    Returns:
      ``(manifest, payload)``: the parsed manifest and a view of the payload.

    Raises:
      FormatError: bad magic or version, a truncated file, trailing bytes, a CRC32 mismatch
        or a manifest that is not a JSON object.
    """
    man_len, man_crc, _, pay_crc = _check_header(data)
    view = memoryview(data)
    man = view[HEADER_SIZE : HEADER_SIZE + man_len]
    if zlib.crc32(man) != man_crc:
        fail("corrupted manifest: CRC32 mismatch")
    try:
        manifest = json.loads(bytes(man).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"manifest is not valid JSON: {e}")
    if not isinstance(manifest, dict):
        fail("manifest is not a JSON object")
    payload = view[HEADER_SIZE + man_len :]
    if zlib.crc32(payload) != pay_crc:
        fail(f"corrupted payload: CRC32 mismatch{_bad_array(manifest, payload)}")
    return manifest, payload


def _bad_array(manifest: dict, payload: memoryview) -> str:
    """Names the first array whose CRC32 fails, for the error message."""
    try:
        for a in manifest["arrays"]:
            if zlib.crc32(payload[a["offset"] : a["offset"] + a["nbytes"]]) != a["crc32"]:
                return f" (array {a['name']})"
    except (KeyError, TypeError):
        pass
    return ""


def array_nbytes(entry: dict, count: int) -> int:
    """The size an array must have.

    Args:
      entry: the array's table entry (``name``, ``dtype``, ``bits``).
      count: its number of values.

    Returns:
      Its bytes: ``count`` items of a raw dtype, or ``count`` values bit-packed.

    Raises:
      FormatError: a dtype the format does not allow.
    """
    if entry["dtype"] in RAW_DTYPES:
        return np.dtype(jnp.dtype(entry["dtype"])).itemsize * count
    if entry["dtype"] == "packed":
        return packed_nbytes(count, entry["bits"])
    fail(f"array {entry['name']}: dtype {entry['dtype']!r} is not allowed")


def read_array(entry: dict, payload: memoryview) -> np.ndarray:
    """One array of the payload, decoded by its (checked) array table entry.

    Args:
      entry: the array's table entry (``dtype``, ``bits``, ``shape``, ``offset``, ...).
      payload: the payload.

    Returns:
      The array: its dtype for raw arrays, int64 for packed ones.

    Raises:
      FormatError: a packed array whose unused last-byte bits are not zero.
    """
    raw = payload[entry["offset"] : entry["offset"] + entry["nbytes"]]
    if entry["dtype"] == "float32":
        return np.frombuffer(raw, "<f4").astype(np.float32).reshape(entry["shape"])
    if entry["dtype"] in RAW_DTYPES:
        dt = np.dtype(jnp.dtype(entry["dtype"])).newbyteorder("<")
        return np.frombuffer(raw, dt).astype(dt.newbyteorder("=")).reshape(entry["shape"])
    bits, count = entry["bits"], entry["count"]
    tail = count * bits
    if tail % 8 and np.frombuffer(raw, np.uint8)[-1] >> (tail % 8):
        fail(f"array {entry['name']}: unused bits of the last byte are not zero")
    return unpack_bits(raw, bits, count).reshape(entry["shape"])
