"""Standalone decoder of qsparse packed model files, written from docs/FORMAT.md with numpy only.

It imports neither qsparse nor JAX: it checks the file, rebuilds every kernel from its packed
codes, block index and scales, and runs the graph in float32 numpy.

Usage:
    python tools/decode_numpy.py model.qsp --npz test.npz        # arrays x (N,H,W,C uint8), y
    python tools/decode_numpy.py model.qsp --idx-dir DIR         # t10k-images/labels IDX files

From Python:
    from decode_numpy import predict, uint8_to_input
    logits = predict("model.qsp", uint8_to_input(images))   # images: uint8 (N, *input shape)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import sys
import zlib

import numpy as np

MAGIC = b"\x89QSPARSE"
VERSION = 1
HEADER = struct.Struct("<8sIIIQI")  # magic, version, M, CRC(manifest), P, CRC(payload)


class DecodeError(ValueError):
    """The file does not follow docs/FORMAT.md."""


def bitlen(v: int) -> int:
    """Binary digits of ``v``, at least 1 (FORMAT.md section 5)."""
    return max(1, int(v).bit_length())


def read_file(path: str) -> tuple[dict, bytes]:
    """Checks the header, sizes and CRCs (section 1); returns the manifest and the payload."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < HEADER.size:
        raise DecodeError(f"truncated: {len(data)} bytes, header needs {HEADER.size}")
    magic, version, m, man_crc, p, pay_crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError(f"bad magic {magic!r}")
    if version != VERSION:
        raise DecodeError(f"unsupported version {version}")
    if len(data) != HEADER.size + m + p:
        raise DecodeError(f"file has {len(data)} bytes, header says {HEADER.size + m + p}")
    man = data[HEADER.size : HEADER.size + m]
    payload = data[HEADER.size + m :]
    if zlib.crc32(man) != man_crc or zlib.crc32(payload) != pay_crc:
        raise DecodeError("CRC32 mismatch")
    manifest = json.loads(man.decode("utf-8"))
    if manifest["version"] != VERSION or manifest["payload_bytes"] != p:
        raise DecodeError("manifest disagrees with the header")
    return manifest, payload


def uint8_to_input(u8, scale: float = 1 / 255) -> np.ndarray:
    """uint8 images -> model inputs (section 2): ``float32(u8) * float32(uint8_scale)``.

    The product is rounded to float32 once; it equals ``qsparse.data.normalize`` bit for bit.
    (An IEEE float32 division ``u8 / 255`` differs from it in the last bit for 126 of the 256
    byte values.)

    Args:
      u8: uint8 array.
      scale: the manifest's ``input.uint8_scale`` (1/255).

    Returns:
      float32 array of the same shape.
    """
    return np.asarray(u8, np.uint8).astype(np.float32) * np.float32(scale)


def unpack(buf: bytes, bits: int, count: int) -> np.ndarray:
    """LSB-first continuous bit stream -> ``count`` unsigned integers (section 3)."""
    stream = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little", count=count * bits)
    return stream.reshape(count, bits).astype(np.int64) @ (np.int64(1) << np.arange(bits))


def read_arrays(manifest: dict, payload: bytes) -> dict[str, np.ndarray]:
    """All arrays by name, after checking that they tile the payload (section 5)."""
    out, pos = {}, 0
    for a in sorted(manifest["arrays"], key=lambda a: a["offset"]):
        count = int(np.prod(a["shape"], dtype=np.int64))
        raw_bytes = {"float32": 4, "int8": 1}
        nbytes = (
            raw_bytes[a["dtype"]] * count
            if a["dtype"] in raw_bytes
            else (count * a["bits"] + 7) // 8
        )
        if a["offset"] != pos or a["nbytes"] != nbytes or a["count"] != count:
            raise DecodeError(f"array {a['name']}: offset or size disagrees with its shape")
        raw = payload[pos : pos + nbytes]
        if zlib.crc32(raw) != a["crc32"]:
            raise DecodeError(f"array {a['name']}: CRC32 mismatch")
        if a["dtype"] == "float32":
            val = np.frombuffer(raw, "<f4").astype(np.float32)
        elif a["dtype"] == "int8":
            val = np.frombuffer(raw, np.int8)
        elif a["dtype"] == "packed":
            val = unpack(raw, a["bits"], count)
        else:
            raise DecodeError(f"array {a['name']}: unknown dtype {a['dtype']!r}")
        out[a["name"]] = val.reshape(a["shape"])
        pos += nbytes
    if pos != len(payload):
        raise DecodeError("arrays do not cover the payload")
    return out


def level(u: np.ndarray, k: int, zero_level: bool) -> np.ndarray:
    """Code -> level multiplier (section 6)."""
    if k == 1:
        return (2 * u - 1).astype(np.float32)
    v = (u - (1 << (k - 1))).astype(np.float32)
    return v if zero_level else v + np.float32(0.5)


def kept_mask(lay: dict, arrays: dict) -> np.ndarray:
    """Bool mask over the R*C blocks in row-major block order (section 7)."""
    r, c = lay["block_grid"]
    if lay["index"] == "none":
        return np.ones(r * c, bool)
    if lay["index"] == "bitmap":
        return arrays[lay["arrays"]["index_bitmap"]].reshape(-1).astype(bool)
    rowptr = arrays[lay["arrays"]["index_rowptr"]]
    cols = arrays[lay["arrays"]["index_colidx"]]
    keep = np.zeros((r, c), bool)
    for i in range(r):
        keep[i, cols[rowptr[i] : rowptr[i + 1]]] = True
    return keep.reshape(-1)


def decode_kernel(lay: dict, arrays: dict) -> np.ndarray:
    """Rebuilds one layer's float32 kernel (sections 4 and 6)."""
    m, n = lay["matrix_shape"]
    bm, bn = lay["block_shape"]
    r, c = lay["block_grid"]
    keep = kept_mask(lay, arrays)
    if int(keep.sum()) != lay["kept_blocks"]:
        raise DecodeError(f"layer {lay['name']}: index and kept_blocks disagree")
    blocks = np.zeros((r * c, bm, bn), np.float32)
    if lay["w_bits"] == 32:
        blocks[keep] = arrays[lay["arrays"]["weights"]]
    else:
        blocks[keep] = level(arrays[lay["arrays"]["codes"]], lay["w_bits"], lay["zero_level"])
    # Blocks (row-major block order) back to the (m, n) matrix.
    mat = blocks.reshape(r, c, bm, bn).transpose(0, 2, 1, 3).reshape(m, n)
    if lay["w_bits"] != 32:
        mat = (mat * arrays[lay["arrays"]["w_scale"]].astype(np.float32)).astype(np.float32)
    return mat.reshape(lay["kernel_shape"])


def act_quant(y: np.ndarray, bits: int, clip) -> np.ndarray:
    """Section 9: round(clip(y, 0, c) / d) * d, d = c / (2**bits - 1), float32."""
    c = np.float32(clip)
    d = np.float32(c / np.float32(2**bits - 1))
    return (np.round(np.clip(y, np.float32(0), c) / d) * d).astype(np.float32)


def conv2d(x: np.ndarray, w: np.ndarray, strides, pads) -> np.ndarray:
    """NHWC x HWIO cross-correlation with explicit zero padding (section 8)."""
    (top, bottom), (left, right) = pads
    kh, kw, cin, cout = w.shape
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))
    win = win[:, :: strides[0], :: strides[1]]  # (N, H', W', C, kh, kw)
    nb, ho, wo = win.shape[:3]
    cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(nb * ho * wo, kh * kw * cin)
    return (cols @ w.reshape(kh * kw * cin, cout)).reshape(nb, ho, wo, cout)


def max_pool(x: np.ndarray, window, strides) -> np.ndarray:
    """VALID max pooling over H, W (section 8)."""
    win = np.lib.stride_tricks.sliding_window_view(x, tuple(window), axis=(1, 2))
    return win[:, :: strides[0], :: strides[1]].max(axis=(-2, -1))


def decode_bias(lay: dict, arrays: dict) -> np.ndarray:
    """A layer's float32 biases: as stored, or int8 codes times their scale (bias_bits 8)."""
    bias = arrays[lay["arrays"]["bias"]]
    if lay.get("bias_bits", 32) == 32:
        return bias
    return bias.astype(np.float32) * arrays[lay["arrays"]["bias_scale"]]


class Model:
    """A decoded model: kernels, biases and activation settings by layer name."""

    def __init__(self, path: str):
        self.manifest, payload = read_file(path)
        if self.manifest.get("graph") is None:
            raise DecodeError(
                f"{path} is in the model layout (no graph, section 13): run it through the"
                " model's own code with qsparse.export.restore"
            )
        arrays = read_arrays(self.manifest, payload)
        self.layers = {}
        for lay in self.manifest["layers"]:
            a = lay["arrays"]
            self.layers[lay["name"]] = {
                "entry": lay,
                "kernel": decode_kernel(lay, arrays),
                "bias": decode_bias(lay, arrays) if lay["use_bias"] else None,
                "clip": arrays[a["a_clip"]] if lay["act_quantized"] else None,
            }

    def predict(self, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Logits of float inputs in [0, 1], shape (N, *input shape)."""
        shape = tuple(self.manifest["input"]["shape"])
        x = np.asarray(x, np.float32).reshape((-1, *shape))
        outs = [self._run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, self.manifest["num_classes"]))

    def _run(self, x: np.ndarray) -> np.ndarray:
        for op in self.manifest["graph"]:
            kind = op["op"]
            if kind == "flatten":
                x = x.reshape(x.shape[0], -1)
            elif kind == "relu":
                x = np.maximum(x, np.float32(0))
            elif kind == "max_pool":
                x = max_pool(x, op["window"], op["strides"])
            elif kind == "mean":  # the reduced axes are dropped
                x = x.mean(axis=tuple(op["axes"]), dtype=np.float32)
            elif kind in ("dense", "conv"):
                lay = self.layers[op["layer"]]
                e = lay["entry"]
                if kind == "dense":
                    x = x @ lay["kernel"]
                else:
                    x = conv2d(x, lay["kernel"], e["strides"], e["pads"])
                if lay["bias"] is not None:
                    x = x + lay["bias"]
                if e["act_quantized"]:
                    x = act_quant(x, e["a_bits"], lay["clip"])
            else:
                raise DecodeError(f"unknown graph op {kind!r}")
            x = x.astype(np.float32)
        return x


def predict(path: str, x: np.ndarray) -> np.ndarray:
    """Decodes ``path`` and returns the logits of ``x`` (float in [0, 1]).

    Args:
      path: packed model file.
      x: ``(N, *input shape)`` float inputs (from uint8 images: :func:`uint8_to_input`).

    Returns:
      ``(N, num_classes)`` float32 logits.
    """
    return Model(path).predict(x)


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array (uint8 data only)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_test_data(npz: str | None, idx_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Test images (uint8 N,H,W,C) and labels from an .npz (x, y) or an IDX directory."""
    if npz:
        with np.load(npz) as d:
            return d["x"], d["y"]

    def find(stem):
        for name in (stem, stem + ".gz"):
            p = os.path.join(idx_dir, name)
            if os.path.exists(p):
                return p
        raise FileNotFoundError(f"{stem}(.gz) not found in {idx_dir}")

    x = read_idx(find("t10k-images-idx3-ubyte"))
    y = read_idx(find("t10k-labels-idx1-ubyte"))
    return x[..., None] if x.ndim == 3 else x, y


def main(argv=None) -> int:
    """CLI: decode a file and print its test accuracy."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="packed model file (.qsp)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", help=".npz with x (uint8 N,H,W,C) and y (labels)")
    src.add_argument("--idx-dir", help="directory with t10k-images/labels IDX files")
    args = ap.parse_args(argv)
    x, y = load_test_data(args.npz, args.idx_dir)
    model = Model(args.file)
    logits = model.predict(uint8_to_input(x, model.manifest["input"]["uint8_scale"]))
    acc = float(np.mean(np.argmax(logits, -1) == np.asarray(y)))
    print(json.dumps({"file": args.file, "examples": int(len(y)), "accuracy": acc}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
