"""The cat/dog validation photos as the JPEG bytes clients send, for the decode probes."""

from __future__ import annotations

import zipfile
from pathlib import Path


def validation_photos(zip_path: Path) -> list[bytes]:
    """Every ``val/`` JPEG of the photo zip, as stored (not re-encoded)."""
    with zipfile.ZipFile(zip_path) as archive:
        names = [name for name in archive.namelist() if name.startswith("val/") and name.lower().endswith(".jpg")]
        return [archive.read(name) for name in names]
