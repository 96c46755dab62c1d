"""The committed model repository (models/): each model is servable by Triton and by us, and is accurate.

A missing model folder fails (the repository is incomplete without it); only missing data skips.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from training.mnist import MnistSplit
from training.photos import PhotoSet, decode_photo, resize_center_crop
from training.repository import render_config
from training.tasks import TASKS

MODELS = ["digits", "catdog"]
MIN_ACCURACY = 0.99
DIGITS_SAMPLE = 500  # the first test images: enough to tell a trained model from a broken one, quickly


def _model_dir(repo_root: Path, name: str) -> Path:
    """The committed model's folder, or a failure that says what is missing and how to make it."""
    folder = repo_root / "models" / name
    if not folder.is_dir():
        pytest.fail(
            f"missing models/{name} (looked in {folder}): train it with `classify-train {name}` and commit "
            f"models/{name}/config.pbtxt, labels.txt, 1/model.onnx and 1/model_card.json",
            pytrace=False,
        )
    for part in ("config.pbtxt", "labels.txt", "1/model.onnx", "1/model_card.json"):
        if not (folder / part).is_file():
            pytest.fail(f"missing models/{name}/{part}", pytrace=False)
    return folder


def _session(folder: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def _card(folder: Path) -> dict[str, Any]:
    card: dict[str, Any] = json.loads((folder / "1" / "model_card.json").read_text())
    return card


def _accuracy(session: ort.InferenceSession, images: np.ndarray, labels: np.ndarray, batch_size: int = 100) -> float:
    predictions = np.concatenate(
        [
            session.run(None, {session.get_inputs()[0].name: images[start : start + batch_size]})[0].argmax(1)
            for start in range(0, len(images), batch_size)
        ]
    )
    return float((predictions == labels).mean())


@pytest.mark.parametrize("name", MODELS)
def test_config_labels_and_onnx_agree(repo_root: Path, name: str) -> None:
    """Triton reads config.pbtxt, our server reads the ONNX file too; they must describe the same model."""
    folder = _model_dir(repo_root, name)
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    labels = (folder / "labels.txt").read_text().splitlines()
    assert config.name == name
    assert config.platform == "onnxruntime_onnx"
    assert labels == list(TASKS[name].labels)

    session = _session(folder)
    ((config_input,), (config_output,)) = config.input, config.output
    (onnx_input,), (onnx_output,) = session.get_inputs(), session.get_outputs()
    assert onnx_input.name == config_input.name
    assert onnx_input.type == "tensor(uint8)"
    assert config_input.data_type == model_config_pb2.TYPE_UINT8
    batch, *dims = onnx_input.shape
    assert isinstance(batch, str), f"batch dimension must be dynamic, got {onnx_input.shape}"
    assert dims == list(config_input.dims) == list(TASKS[name].input_dims)
    assert onnx_output.name == config_output.name
    assert onnx_output.type == "tensor(float)"
    assert onnx_output.shape[1:] == list(config_output.dims) == [len(labels)]
    assert config_output.label_filename == "labels.txt"
    assert config.max_batch_size > 0
    assert (folder / "config.pbtxt").read_text() == render_config(TASKS[name].serving), "re-export to update it"


@pytest.mark.parametrize("name", MODELS)
def test_model_card_describes_the_committed_file(repo_root: Path, name: str) -> None:
    """The card must describe the committed file, not an earlier export."""
    folder = _model_dir(repo_root, name)
    card = _card(folder)
    assert card["name"] == name
    assert card["onnx"]["sha256"] == hashlib.sha256((folder / "1" / "model.onnx").read_bytes()).hexdigest()
    assert card["training"]["dry_run"] is False, f"models/{name} was exported by a --dry-run"
    assert card["parity"]["max_abs_diff"] <= card["parity"]["tolerance"]


def test_digits_accuracy(repo_root: Path, request: pytest.FixtureRequest) -> None:
    """The committed digit model classifies real MNIST test digits correctly (raw uint8 in, as served)."""
    session = _session(_model_dir(repo_root, "digits"))  # before the data fixtures, so a missing model fails
    split: MnistSplit = request.getfixturevalue("mnist_test_split")
    images, labels = split.images[:DIGITS_SAMPLE, :, :, None], split.labels[:DIGITS_SAMPLE]
    accuracy = _accuracy(session, images, labels)
    assert accuracy > MIN_ACCURACY, f"digits: {accuracy:.3f} on the first {DIGITS_SAMPLE} MNIST test images"


def test_catdog_accuracy(repo_root: Path, request: pytest.FixtureRequest) -> None:
    """The committed cat/dog model classifies all 1000 validation photos, preprocessed as the server does."""
    session = _session(_model_dir(repo_root, "catdog"))  # before the data fixtures, so a missing model fails
    photo_set: PhotoSet = request.getfixturevalue("photo_set")
    photos = photo_set.splits["val"]
    assert len(photos) == 1000
    images = np.stack([np.asarray(resize_center_crop(decode_photo(photo.data), 224)) for photo in photos])
    labels = np.array([photo.label for photo in photos])
    accuracy = _accuracy(session, images, labels)
    assert accuracy > MIN_ACCURACY, f"catdog: {accuracy:.3f} on the {len(photos)} validation photos"
    card_accuracy = _card(_model_dir(repo_root, "catdog"))["accuracy"]["val"]["accuracy"]
    assert accuracy == pytest.approx(card_accuracy, abs=1.5 / len(photos)), "the card's figure must be reproducible"
