"""Read the cats/dogs photo set from a zip or a folder, reporting unreadable photos instead of stopping."""

from __future__ import annotations

import functools
import io
import logging
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps, UnidentifiedImageError

from training.mnist import DataFileError

__all__ = [
    "CLASS_NAMES",
    "SPLITS",
    "Photo",
    "PhotoSet",
    "decode_photo",
    "load_photo_set",
    "resize_center_crop",
]

CLASS_NAMES = ("cat", "dog")
SPLITS = ("train", "val")
_log = logging.getLogger(__name__)
# What Pillow and zipfile raise for a damaged photo: broken PNG chunks surface as SyntaxError, and an absurd
# declared size as DecompressionBombError, which is no OSError.
_UNREADABLE = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    ValueError,
    SyntaxError,
    zipfile.BadZipFile,
)


@dataclass(frozen=True)
class Photo:
    """One labelled photo, kept encoded: decoding happens per use so the set stays small in memory."""

    name: str
    label: int
    data: bytes


@dataclass
class PhotoSet:
    """Photos by split, and the files that could not be read with the reason for each."""

    source: Path
    splits: dict[str, list[Photo]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    skipped: list[tuple[str, str]] = field(default_factory=list)


def decode_photo(data: bytes) -> Image.Image:
    """Decode fully, turn upright by the EXIF orientation tag and convert to RGB."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return ImageOps.exif_transpose(image).convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (keeping the aspect ratio), then cut the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BILINEAR
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def load_photo_set(source: Path) -> PhotoSet:
    """Load ``train/{cat,dog}`` and ``val/{cat,dog}`` from a zip file or a folder.

    Every photo is decoded once here so that a broken file is reported up front (logged and listed in
    ``skipped``) rather than failing an epoch later. Entries may sit below one extra top-level folder.
    """
    if not source.exists():
        raise DataFileError(f"{source}: photo set not found (expected a zip or a folder with train/ and val/)")
    photo_set = PhotoSet(source=source)
    for name, read in _entries(source):
        parts = PurePosixPath(name).parts
        if len(parts) < 3 or parts[-1].startswith(".") or "__MACOSX" in parts:
            continue
        split, class_name = parts[-3], parts[-2]
        if split not in SPLITS or class_name not in CLASS_NAMES:
            continue
        try:
            data = read()
            decode_photo(data)
        except _UNREADABLE as exc:
            _log.warning("skipping unreadable photo %s: %s", name, exc)
            photo_set.skipped.append((name, str(exc)))
            continue
        photo_set.splits[split].append(Photo(name=name, label=CLASS_NAMES.index(class_name), data=data))
    for split, photos in photo_set.splits.items():
        if not photos:
            raise DataFileError(f"{source}: no readable photos in {split}/{{{','.join(CLASS_NAMES)}}}")
        photos.sort(key=lambda photo: photo.name)
    return photo_set


def _entries(source: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yield (relative posix name, reader) for every file in the zip or below the folder, in sorted order."""
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            yield path.relative_to(source).as_posix(), path.read_bytes
        return
    try:
        with zipfile.ZipFile(source) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if not info.is_dir():
                    yield info.filename, functools.partial(archive.read, info)
    except zipfile.BadZipFile as exc:
        raise DataFileError(f"{source}: not a readable zip file ({exc})") from None
