"""Read MNIST's IDX ``.gz`` files strictly, so a damaged download fails loudly instead of training on junk."""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_MAGIC", "LABEL_MAGIC", "DataFileError", "MnistSplit", "load_mnist_split", "read_idx"]

IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DataFileError(ValueError):
    """A data file is missing, truncated or not in the expected format; the message names the file."""


@dataclass(frozen=True)
class MnistSplit:
    """One MNIST split: images ``[N, 28, 28]`` uint8 and labels ``[N]`` uint8, plus the files read."""

    images: np.ndarray
    labels: np.ndarray
    files: tuple[Path, ...]


def read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Read one gzipped IDX file and check its magic number, item dimensions and payload size.

    Args:
        path: the ``.gz`` file.
        magic: the expected magic number (``IMAGE_MAGIC`` or ``LABEL_MAGIC``).
        item_shape: the expected shape of one item (``(28, 28)`` for images, ``()`` for labels).

    Returns:
        A uint8 array of shape ``[count, *item_shape]``.
    """
    try:
        compressed = path.read_bytes()
    except FileNotFoundError:
        raise DataFileError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        raw = gzip.decompress(compressed)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataFileError(f"{path}: not a complete gzip file ({exc})") from None
    header_size = 4 * (2 + len(item_shape))
    if len(raw) < header_size:
        raise DataFileError(f"{path}: {len(raw)} bytes is too short for an IDX header of {header_size} bytes")
    found_magic, count, *dims = struct.unpack(f">{2 + len(item_shape)}I", raw[:header_size])
    if found_magic != magic:
        raise DataFileError(f"{path}: magic number {found_magic:#010x}, expected {magic:#010x}")
    if tuple(dims) != item_shape:
        raise DataFileError(f"{path}: items of shape {tuple(dims)}, expected {item_shape}")
    expected = header_size + count * int(np.prod(item_shape, dtype=np.int64))
    if len(raw) != expected:
        raise DataFileError(f"{path}: {len(raw)} bytes after decompression, expected {expected} for {count} items")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(count, *item_shape)


def load_mnist_split(folder: Path, split: str) -> MnistSplit:
    """Load the ``train`` or ``test`` split from a folder holding the four original MNIST files."""
    image_name, label_name = _FILES[split]
    image_path, label_path = folder / image_name, folder / label_name
    images = read_idx(image_path, IMAGE_MAGIC, (28, 28))
    labels = read_idx(label_path, LABEL_MAGIC, ())
    if len(images) != len(labels):
        raise DataFileError(f"{image_path}: {len(images)} images but {label_path} has {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise DataFileError(f"{label_path}: label {int(labels.max())} is outside 0..9")
    return MnistSplit(images=images, labels=labels, files=(image_path, label_path))
