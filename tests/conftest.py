"""Shared fixtures: where the repository and the real training data are, and the data loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.mnist import MnistSplit, load_mnist_split
from training.photos import PhotoSet, load_photo_set

DATA_DIR_ENV = "CLASSIFY_DATA_DIR"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root (the folder holding pyproject.toml), independent of the working directory."""
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir(repo_root: Path) -> Path:
    """The shared data folder; tests that need it are skipped, not failed, on machines without the data."""
    configured = os.environ.get(DATA_DIR_ENV)
    folder = Path(configured) if configured else repo_root.parent / "shared" / "data"
    if not folder.is_dir():
        pytest.skip(
            f"MNIST/cat-dog data not found at {folder}: set {DATA_DIR_ENV} to a folder holding mnist/ and catdog/"
        )
    return folder.resolve()


@pytest.fixture(scope="session")
def mnist_dir(data_dir: Path) -> Path:
    """The four original MNIST ``.gz`` files; a data folder without them is a broken setup, so fail loudly."""
    folder = data_dir / "mnist"
    if not folder.is_dir():
        pytest.fail(f"{data_dir} has no mnist/ folder with the four MNIST .gz files", pytrace=False)
    return folder


@pytest.fixture(scope="session")
def photo_zip(data_dir: Path) -> Path:
    """The cats/dogs photo zip: exactly one ``.zip`` in ``catdog/``, as the training CLI expects."""
    zips = sorted((data_dir / "catdog").glob("*.zip"))
    if len(zips) != 1:
        pytest.fail(f"expected exactly one .zip in {data_dir / 'catdog'}, found {len(zips)}", pytrace=False)
    return zips[0]


@pytest.fixture(scope="session")
def mnist_test_split(mnist_dir: Path) -> MnistSplit:
    """MNIST's 10,000 test images, read once: several modules check models against them."""
    return load_mnist_split(mnist_dir, "test")


@pytest.fixture(scope="session")
def photo_set(photo_zip: Path) -> PhotoSet:
    """All 2,999 photos, decoded once to validate them (about 2 s), shared by every test that needs photos."""
    return load_photo_set(photo_zip)
