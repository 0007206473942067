"""TFDS builders that prepare MNIST-like data sets from local IDX files."""

from qsparse.idx_builder.idx_builder import (
    BUILDERS,
    IDX_FILES,
    IdxBuilder,
    IdxFashionMnist,
    IdxKmnist,
    IdxMnist,
    find_idx_file,
    idx_fingerprint,
)

__all__ = [
    "BUILDERS",
    "IDX_FILES",
    "IdxBuilder",
    "IdxFashionMnist",
    "IdxKmnist",
    "IdxMnist",
    "find_idx_file",
    "idx_fingerprint",
]
