"""The cats/dogs photo set: the real zip loads completely; broken photos are reported, not fatal."""

from __future__ import annotations

import io
import logging
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.mnist import DataFileError
from training.photos import PhotoSet, decode_photo, load_photo_set, resize_center_crop

# A few real photos per split and class: (entry in the real zip, its split, its label).
SAMPLE = [
    ("train/cat/cat.0.jpg", "train", 0),
    ("train/cat/cat.1.jpg", "train", 0),
    ("train/dog/dog.0.jpg", "train", 1),
    ("train/dog/dog.1.jpg", "train", 1),
    ("val/cat/cat.2000.jpg", "val", 0),
    ("val/dog/dog.2000.jpg", "val", 1),
]
BROKEN_JPEG, NOT_AN_IMAGE = "train/cat/cat.broken.jpg", "train/dog/notes.txt"


def _count(photo_set: PhotoSet, split: str, label: int) -> int:
    return sum(photo.label == label for photo in photo_set.splits[split])


def test_real_zip_loads_every_photo(photo_set: PhotoSet, photo_zip: Path) -> None:
    """The published split is 999+1000 training and 500+500 validation photos (cat.459.jpg is missing upstream)."""
    assert photo_set.source == photo_zip
    assert len(photo_set.splits["train"]) == 1999
    assert len(photo_set.splits["val"]) == 1000
    assert (_count(photo_set, "train", 0), _count(photo_set, "train", 1)) == (999, 1000)
    assert (_count(photo_set, "val", 0), _count(photo_set, "val", 1)) == (500, 500)
    assert photo_set.skipped == []


def test_real_zip_labels_follow_folders(photo_set: PhotoSet) -> None:
    """Label 0 is cat and 1 is dog, taken from the class folder; order is by name so runs are reproducible."""
    for split, photos in photo_set.splits.items():
        names = [photo.name for photo in photos]
        assert names == sorted(names)
        for photo in photos:
            assert photo.name.startswith(f"{split}/{('cat', 'dog')[photo.label]}/")
    assert "train/cat/cat.459.jpg" not in {photo.name for photo in photo_set.splits["train"]}


@pytest.fixture(scope="module")
def sample_photos(photo_zip: Path) -> dict[str, bytes]:
    """The encoded bytes of a handful of real photos, read straight from the real zip."""
    with zipfile.ZipFile(photo_zip) as archive:
        return {name: archive.read(name) for name, _, _ in SAMPLE}


def _damaged_entries(sample_photos: dict[str, bytes]) -> dict[str, bytes]:
    """The sample plus a truncated JPEG and a stray text file inside class folders, and some junk the loader skips."""
    truncated = sample_photos["train/cat/cat.0.jpg"][:2000]
    return {
        **sample_photos,
        BROKEN_JPEG: truncated,
        NOT_AN_IMAGE: b"photographer: unknown\n",
        "README.txt": b"not inside a split\n",  # not train/<class>/: ignored silently
        "train/cat/.DS_Store": b"\x00\x00\x00\x01Bud1",  # hidden file: ignored silently
        "train/bird/bird.0.jpg": sample_photos["train/cat/cat.0.jpg"],  # unknown class: ignored
    }


def _write_zip(path: Path, entries: dict[str, bytes], prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(prefix + name, data)
    return path


def _write_folder(root: Path, entries: dict[str, bytes]) -> Path:
    for name, data in entries.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _check_damaged_set(photo_set: PhotoSet, prefix: str = "") -> None:
    """The good photos load with their labels; the two broken ones are listed with a reason."""
    loaded = {split: [(photo.name, photo.label) for photo in photos] for split, photos in photo_set.splits.items()}
    expected = {
        split: sorted((prefix + name, label) for name, entry_split, label in SAMPLE if entry_split == split)
        for split in ("train", "val")
    }
    assert loaded == expected
    reasons = dict(photo_set.skipped)
    assert sorted(reasons) == sorted([prefix + BROKEN_JPEG, prefix + NOT_AN_IMAGE])
    assert "truncated" in reasons[prefix + BROKEN_JPEG]
    assert "cannot identify image file" in reasons[prefix + NOT_AN_IMAGE]


def test_broken_entries_in_zip_are_skipped_with_reason(
    tmp_path: Path, sample_photos: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """One corrupt photo in thousands must not cost a training run; it is logged and listed instead."""
    source = _write_zip(tmp_path / "photos.zip", _damaged_entries(sample_photos))
    with caplog.at_level(logging.WARNING, logger="training.photos"):
        photo_set = load_photo_set(source)
    _check_damaged_set(photo_set)
    assert BROKEN_JPEG in caplog.text
    assert NOT_AN_IMAGE in caplog.text


def _png_with_bad_chunk_length() -> bytes:
    """A PNG whose IDAT length field is wrong: Pillow opens it, then raises SyntaxError("broken PNG file")."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    idat = data.find(b"IDAT")
    data[idat - 4 : idat] = struct.pack(">I", 2)
    return bytes(data)


def _jpeg_claiming_huge_size(jpeg: bytes) -> bytes:
    """A real JPEG whose frame header claims 60000x60000 pixels: Pillow raises DecompressionBombError."""
    data = bytearray(jpeg)
    frame = data.find(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    assert frame > 0
    data[frame + 5 : frame + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


@pytest.mark.parametrize("kind", ["png-bad-chunk-length", "jpeg-claims-60000x60000"])
def test_every_undecodable_photo_is_skipped(tmp_path: Path, sample_photos: dict[str, bytes], kind: str) -> None:
    """Whatever Pillow raises for a damaged file, the loader must skip it, not stop."""
    damaged = {
        "png-bad-chunk-length": _png_with_bad_chunk_length(),
        "jpeg-claims-60000x60000": _jpeg_claiming_huge_size(sample_photos["train/cat/cat.0.jpg"]),
    }[kind]
    source = _write_zip(tmp_path / "photos.zip", {**sample_photos, "train/dog/damaged.img": damaged})
    photo_set = load_photo_set(source)
    assert [name for name, _ in photo_set.skipped] == ["train/dog/damaged.img"]
    assert len(photo_set.splits["train"]) + len(photo_set.splits["val"]) == len(SAMPLE)


def test_folder_layout_loads_like_zip(tmp_path: Path, sample_photos: dict[str, bytes]) -> None:
    """An unpacked copy (train/ and val/ folders) is accepted and treated exactly like the zip."""
    photo_set = load_photo_set(_write_folder(tmp_path / "photos", _damaged_entries(sample_photos)))
    _check_damaged_set(photo_set)


def test_zip_with_extra_top_level_folder(tmp_path: Path, sample_photos: dict[str, bytes]) -> None:
    """Zips made by zipping a folder put everything below that folder's name; that must still work."""
    prefix = "cats_and_dogs_filtered/"
    source = _write_zip(tmp_path / "photos.zip", _damaged_entries(sample_photos), prefix=prefix)
    _check_damaged_set(load_photo_set(source), prefix=prefix)


def test_split_without_readable_photos_is_an_error(tmp_path: Path, sample_photos: dict[str, bytes]) -> None:
    """Training on an empty validation split would report nonsense; the loader refuses instead."""
    train_only = {name: data for name, data in sample_photos.items() if name.startswith("train/")}
    source = _write_zip(tmp_path / "photos.zip", train_only)
    with pytest.raises(DataFileError, match=r"photos\.zip: no readable photos in val/\{cat,dog\}"):
        load_photo_set(source)


def test_missing_source(tmp_path: Path) -> None:
    """A wrong --data-dir names the path it looked at."""
    with pytest.raises(DataFileError) as raised:
        load_photo_set(tmp_path / "nowhere.zip")
    assert str(raised.value).startswith(f"{tmp_path / 'nowhere.zip'}: photo set not found")


def test_not_a_zip(tmp_path: Path) -> None:
    """A file that is not a zip (say, an HTML error page saved as .zip) is a clear data error, not BadZipFile."""
    source = tmp_path / "photos.zip"
    source.write_bytes(b"<html>404 Not Found</html>\n" * 10)
    with pytest.raises(DataFileError) as raised:
        load_photo_set(source)
    assert str(raised.value).startswith(f"{source}: not a readable zip file")


def _jpeg(image: Image.Image, **save_options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **save_options)
    return buffer.getvalue()


def test_decode_photo_honours_exif_orientation() -> None:
    """Phone photos are stored sideways with an Orientation tag; the model must see them upright."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    upright = decode_photo(_jpeg(stored, exif=exif))
    assert upright.mode == "RGB"
    assert upright.size == (20, 40)
    pixels = np.asarray(upright).astype(int)
    assert pixels[5, 10].tolist() == pytest.approx([255, 0, 0], abs=8)  # the left half is now on top
    assert pixels[34, 10].tolist() == pytest.approx([0, 0, 255], abs=8)


def test_decode_photo_converts_to_rgb() -> None:
    """Grayscale photos exist in the wild; the 3-channel model needs RGB."""
    gray = decode_photo(_jpeg(Image.new("L", (30, 20), 128)))
    assert gray.mode == "RGB"
    assert gray.size == (30, 20)


@pytest.mark.parametrize(
    "size",
    [(320, 240), (240, 320), (224, 224), (100, 50), (50, 100), (225, 224), (1000, 3)],
    ids=["landscape", "portrait", "exact", "small-landscape", "small-portrait", "off-by-one", "extreme"],
)
def test_resize_center_crop_is_square(size: tuple[int, int]) -> None:
    """Whatever the input shape, the model input is exactly size x size (never one pixel short from rounding)."""
    result = resize_center_crop(Image.new("RGB", size, (10, 20, 30)), 224)
    assert result.size == (224, 224)
    assert np.asarray(result)[112, 112].tolist() == [10, 20, 30]


def test_resize_center_crop_keeps_the_centre() -> None:
    """The crop is centred: of a wide image with coloured side bands, only the middle survives."""
    wide = Image.new("RGB", (448, 224), (0, 255, 0))
    wide.paste((255, 0, 0), (0, 0, 100, 224))
    wide.paste((255, 0, 0), (348, 0, 448, 224))
    pixels = np.asarray(resize_center_crop(wide, 224))
    assert (pixels[:, 2:-2] == [0, 255, 0]).all()
