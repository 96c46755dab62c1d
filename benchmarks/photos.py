"""The cat/dog validation photos as the JPEG bytes clients send, and the input the server decodes them to."""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from serving.images import InputSpec, ResizeMode

CATDOG_INPUT = InputSpec(224, 224, 3, ResizeMode.CENTER_CROP)  # the committed cat/dog model's input


def validation_photos(zip_path: Path) -> dict[str, bytes]:
    """The ``val/{cat,dog}`` JPEGs of the photo zip as stored (not re-encoded), by file name (``cat.cat.2000.jpg``).

    Raises:
        ValueError: the zip holds no such photo.
    """
    photos: dict[str, bytes] = {}
    with zipfile.ZipFile(zip_path) as archive:
        for name in archive.namelist():
            parts = PurePosixPath(name).parts
            if len(parts) >= 3 and parts[-3] == "val" and name.lower().endswith((".jpg", ".jpeg")):
                photos[f"{parts[-2]}.{parts[-1]}"] = archive.read(name)
    if not photos:
        raise ValueError(f"{zip_path}: no JPEG under a val/ folder")
    return photos
