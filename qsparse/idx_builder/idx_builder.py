"""TFDS builders over local IDX files (MNIST, Fashion-MNIST, KMNIST).

TFDS's own builders for these data sets check the SHA-256 of the files they download, so they
refuse copies that were recompressed on the way (Debian's `dataset-fashion-mnist` package is
one). These builders read whatever IDX files a directory holds instead, gzip-compressed or raw,
and write them once as ArrayRecord files with `tfds.features.Tensor` features, which needs no
TensorFlow. `qsparse.data.load` drives them; use them directly like any TFDS builder:

    builder = IdxFashionMnist(data_dir="/tmp/tfds", idx_dir="/usr/share/datasets/fashion-mnist")
    builder.download_and_prepare()
    source = builder.as_data_source(split="train")
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from qsparse.data import read_idx

# Each split is stored under its TFDS name; the IDX files use "t10k" for the test split.
IDX_FILES: Mapping[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_file(idx_dir: os.PathLike | str, stem: str) -> epath.Path | None:
    """Finds one IDX file in a directory, gzip-compressed or raw.

    Args:
      idx_dir: directory to look in.
      stem: file name without the `.gz` suffix, e.g. `train-images-idx3-ubyte`.

    Returns:
      The path of `stem.gz` if it exists, else of `stem` if it exists, else None.
    """
    for name in (stem + ".gz", stem):
        path = epath.Path(idx_dir) / name
        if path.is_file():
            return path
    return None


def idx_fingerprint(idx_dir: os.PathLike | str) -> str:
    """Returns a SHA-256 over the four IDX files of a directory (names and bytes).

    Args:
      idx_dir: directory holding the four IDX files.

    Returns:
      A hex digest that changes when any of the files changes.

    Raises:
      FileNotFoundError: if one of the four files is missing.
    """
    digest = hashlib.sha256()
    for stems in IDX_FILES.values():
        for stem in stems:
            path = find_idx_file(idx_dir, stem)
            if path is None:
                raise FileNotFoundError(f"{stem}(.gz) is missing from {idx_dir}")
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: a directory of IDX files -> `train` and `test` splits.

    Subclasses set `IMAGE_SHAPE`, `CLASS_NAMES`, `HOMEPAGE` and `DESCRIPTION`; their class
    name (snake-cased, e.g. `idx_fashion_mnist`) is the TFDS data set name.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    IMAGE_SHAPE: tuple[int, int, int] = (28, 28, 1)
    CLASS_NAMES: tuple[str, ...] = tuple(str(i) for i in range(10))
    HOMEPAGE = ""
    DESCRIPTION = ""

    def __init__(self, *, idx_dir: os.PathLike | str | None = None, **kwargs: Any):
        """Constructs the builder.

        Args:
          idx_dir: directory holding `train-images-idx3-ubyte(.gz)`,
            `train-labels-idx1-ubyte(.gz)`, `t10k-images-idx3-ubyte(.gz)` and
            `t10k-labels-idx1-ubyte(.gz)`. Needed only to prepare, not to read prepared data.
          **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (`data_dir`, `file_format`, ...).
        """
        self._idx_dir = None if idx_dir is None else epath.Path(idx_dir)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        # TFDS pickles a builder as its constructor arguments; keep ours among them.
        self._original_state.update(idx_dir=idx_dir, file_format=kwargs["file_format"])

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    # One bytes blob per image: 784 int64 varints would be slower to parse.
                    "image": tfds.features.Tensor(
                        shape=self.IMAGE_SHAPE,
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.BYTES,
                    ),
                    "label": tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE or None,
            metadata=tfds.core.MetadataDict(),
            # Keep the IDX order, so that the prepared splits are the files, example for example.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the files are local.
        if self._idx_dir is None:
            raise ValueError(f"{self.name}: idx_dir=None, give the directory of IDX files")
        paths = {}
        for split, stems in IDX_FILES.items():
            for stem in stems:
                path = find_idx_file(self._idx_dir, stem)
                if path is None:
                    raise FileNotFoundError(f"{stem}(.gz) is missing from {self._idx_dir}")
                paths.setdefault(split, []).append(path)
        # Recorded so that a later load from a different directory can tell the data changed.
        self.info.metadata["idx_dir"] = os.fspath(self._idx_dir)
        self.info.metadata["idx_sha256"] = idx_fingerprint(self._idx_dir)
        return {split: self._generate_examples(*p) for split, p in paths.items()}

    def _generate_examples(
        self, images_path: epath.Path, labels_path: epath.Path
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.dtype != np.uint8 or images.shape[1:] != self.IMAGE_SHAPE[:2]:
            raise ValueError(
                f"{images_path}: images of dtype {images.dtype} and shape {images.shape[1:]};"
                f" {self.name} needs uint8 images of shape {self.IMAGE_SHAPE[:2]}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"{labels_path}: labels of shape {labels.shape} do not match"
                f" {len(images)} images in {images_path}"
            )
        if labels.size and not 0 <= labels.min() <= labels.max() < len(self.CLASS_NAMES):
            raise ValueError(
                f"{labels_path}: labels in [{labels.min()}, {labels.max()}], outside"
                f" [0, {len(self.CLASS_NAMES) - 1}]"
            )
        images = images.reshape((-1, *self.IMAGE_SHAPE))
        for i, (image, label) in enumerate(zip(images, labels.astype(np.int64), strict=True)):
            yield i, {"image": image, "label": label}


class IdxMnist(IdxBuilder):
    """MNIST handwritten digits from local IDX files."""

    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
    DESCRIPTION = "MNIST handwritten digits (60,000 train, 10,000 test), read from IDX files."


class IdxFashionMnist(IdxBuilder):
    """Fashion-MNIST from local IDX files (e.g. Debian's `dataset-fashion-mnist`)."""

    CLASS_NAMES = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    DESCRIPTION = "Zalando's Fashion-MNIST (60,000 train, 10,000 test), read from IDX files."


class IdxKmnist(IdxBuilder):
    """Kuzushiji-MNIST from local IDX files."""

    CLASS_NAMES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    HOMEPAGE = "https://github.com/rois-codh/kmnist"
    DESCRIPTION = "Kuzushiji-MNIST (60,000 train, 10,000 test), read from IDX files."


BUILDERS: Mapping[str, type[IdxBuilder]] = {
    "mnist": IdxMnist,
    "fashion_mnist": IdxFashionMnist,
    "kmnist": IdxKmnist,
}
