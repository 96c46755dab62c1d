"""MNIST IDX reading: the real files load exactly, and every kind of damage fails loudly, naming the file."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from training.mnist import DataFileError, MnistSplit, load_mnist_split

TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # from the data README
TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_train_split_loads_exactly(mnist_dir: Path) -> None:
    """The training split must be complete: 60,000 28x28 uint8 images with digit labels in the known mix."""
    split = load_mnist_split(mnist_dir, "train")
    assert split.images.shape == (60000, 28, 28)
    assert split.labels.shape == (60000,)
    assert split.images.dtype == np.uint8
    assert split.labels.dtype == np.uint8
    assert np.bincount(split.labels, minlength=10).tolist() == TRAIN_CLASS_COUNTS
    # The digits task normalises with MNIST's well-known pixel mean; a mis-parsed header would shift it.
    assert split.images.mean() / 255 == pytest.approx(0.1307, abs=1e-4)
    assert split.files == (mnist_dir / "train-images-idx3-ubyte.gz", mnist_dir / "train-labels-idx1-ubyte.gz")


def test_test_split_loads_exactly(mnist_test_split: MnistSplit, mnist_dir: Path) -> None:
    """The test split is what accuracy is reported on, so its size and class counts must be the published ones."""
    split = mnist_test_split
    assert split.images.shape == (10000, 28, 28)
    assert split.labels.shape == (10000,)
    assert split.images.dtype == np.uint8
    assert split.labels.dtype == np.uint8
    assert int(split.labels.min()) == 0
    assert int(split.labels.max()) == 9
    assert np.bincount(split.labels, minlength=10).tolist() == TEST_CLASS_COUNTS
    assert split.files == (mnist_dir / TEST_IMAGES, mnist_dir / TEST_LABELS)


# --- damaged files -------------------------------------------------------------------------------------------


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An uncompressed IDX file: big-endian magic, then each dimension, then the bytes."""
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=1)  # fast: the images file is 7.8 MB uncompressed


def _truncated_gz(original: bytes, raw: bytes) -> bytes:
    return original[: len(original) // 2]


def _gz_without_trailer(original: bytes, raw: bytes) -> bytes:
    return original[:-8]  # CRC and size gone: the deflate stream never reaches its end marker


def _truncated_payload(original: bytes, raw: bytes) -> bytes:
    return _gz(raw[: len(raw) - 100])


def _extra_payload(original: bytes, raw: bytes) -> bytes:
    return _gz(raw + b"\x00" * 100)


def _header_only_half(original: bytes, raw: bytes) -> bytes:
    return _gz(raw[:6])


def _empty_gzip(original: bytes, raw: bytes) -> bytes:
    return _gz(b"")


def _not_gzip(original: bytes, raw: bytes) -> bytes:
    return raw  # the uncompressed IDX bytes under a .gz name


def _text_file(original: bytes, raw: bytes) -> bytes:
    return b"<html>404 Not Found</html>\n"


def _patched_magic(original: bytes, raw: bytes) -> bytes:
    return _gz(struct.pack(">I", 0x00000802) + raw[4:])


def _patched_item_dims(original: bytes, raw: bytes) -> bytes:
    return _gz(raw[:8] + struct.pack(">2I", 32, 32) + raw[16:])


def _label_out_of_range(original: bytes, raw: bytes) -> bytes:
    return _gz(raw[:-1] + bytes([10]))


Corruption = Callable[[bytes, bytes], bytes]

DAMAGE: list[tuple[str, str, Corruption, str]] = [
    # (case, file to damage, how, what the message must say)
    ("truncated-gzip-labels", TEST_LABELS, _truncated_gz, "not a complete gzip file"),
    ("truncated-gzip-images", TEST_IMAGES, _truncated_gz, "not a complete gzip file"),
    ("gzip-without-trailer", TEST_LABELS, _gz_without_trailer, "not a complete gzip file"),
    ("truncated-payload-labels", TEST_LABELS, _truncated_payload, "9908 bytes after decompression, expected 10008"),
    ("truncated-payload-images", TEST_IMAGES, _truncated_payload, "bytes after decompression, expected 7840016"),
    ("payload-too-long", TEST_LABELS, _extra_payload, "10108 bytes after decompression, expected 10008"),
    ("header-cut-short", TEST_IMAGES, _header_only_half, "too short for an IDX header of 16 bytes"),
    ("empty-payload", TEST_LABELS, _empty_gzip, "0 bytes is too short for an IDX header"),
    ("not-gzip-raw-idx", TEST_IMAGES, _not_gzip, "not a complete gzip file"),
    ("not-gzip-text", TEST_LABELS, _text_file, "not a complete gzip file"),
    ("patched-magic", TEST_LABELS, _patched_magic, "magic number 0x00000802, expected 0x00000801"),
    ("wrong-item-dims", TEST_IMAGES, _patched_item_dims, r"items of shape (32, 32), expected (28, 28)"),
    ("label-out-of-range", TEST_LABELS, _label_out_of_range, "label 10 is outside 0..9"),
]


def _split_with(folder: Path, mnist_dir: Path, replacements: dict[str, bytes]) -> Path:
    """A test-split folder under tmp_path: damaged files written there, the untouched ones linked, not copied."""
    for name in (TEST_IMAGES, TEST_LABELS):
        if name in replacements:
            (folder / name).write_bytes(replacements[name])
        else:
            (folder / name).symlink_to(mnist_dir / name)
    return folder


@pytest.mark.parametrize(("target", "damage", "expected"), [case[1:] for case in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_damaged_file_is_rejected_naming_file_and_fault(
    tmp_path: Path, mnist_dir: Path, target: str, damage: Corruption, expected: str
) -> None:
    """A damaged download must stop training with a message that says which file and what is wrong with it."""
    original = (mnist_dir / target).read_bytes()
    folder = _split_with(tmp_path, mnist_dir, {target: damage(original, gzip.decompress(original))})
    with pytest.raises(DataFileError) as raised:
        load_mnist_split(folder, "test")
    message = str(raised.value)
    assert str(folder / target) in message
    assert expected in message


def test_images_file_where_labels_expected(tmp_path: Path, mnist_dir: Path) -> None:
    """Swapped files are a classic mistake; the magic number check must catch it before any shape check."""
    folder = _split_with(tmp_path, mnist_dir, {TEST_LABELS: (mnist_dir / TEST_IMAGES).read_bytes()})
    with pytest.raises(DataFileError) as raised:
        load_mnist_split(folder, "test")
    message = str(raised.value)
    assert str(folder / TEST_LABELS) in message
    assert "magic number 0x00000803, expected 0x00000801" in message


def test_labels_file_where_images_expected(tmp_path: Path, mnist_dir: Path) -> None:
    """The other way round: a labels file in the images slot has the labels magic number."""
    folder = _split_with(tmp_path, mnist_dir, {TEST_IMAGES: (mnist_dir / TEST_LABELS).read_bytes()})
    with pytest.raises(DataFileError) as raised:
        load_mnist_split(folder, "test")
    assert str(folder / TEST_IMAGES) in str(raised.value)
    assert "magic number 0x00000801, expected 0x00000803" in str(raised.value)


@pytest.mark.parametrize("missing", [TEST_IMAGES, TEST_LABELS])
def test_missing_file(tmp_path: Path, mnist_dir: Path, missing: str) -> None:
    """An incomplete download names the absent file instead of raising a bare FileNotFoundError."""
    present = TEST_LABELS if missing == TEST_IMAGES else TEST_IMAGES
    (tmp_path / present).symlink_to(mnist_dir / present)
    with pytest.raises(DataFileError) as raised:
        load_mnist_split(tmp_path, "test")
    assert str(raised.value) == f"{tmp_path / missing}: file not found"


def test_image_label_count_mismatch(tmp_path: Path, mnist_dir: Path) -> None:
    """Each file may be well-formed on its own and still not belong together; the pairing is checked too."""
    labels = gzip.decompress((mnist_dir / TEST_LABELS).read_bytes())
    fewer = _idx(0x00000801, (9999,), labels[8 : 8 + 9999])
    folder = _split_with(tmp_path, mnist_dir, {TEST_LABELS: _gz(fewer)})
    with pytest.raises(DataFileError) as raised:
        load_mnist_split(folder, "test")
    message = str(raised.value)
    assert str(folder / TEST_IMAGES) in message
    assert str(folder / TEST_LABELS) in message
    assert "10000 images but" in message
    assert "has 9999 labels" in message
