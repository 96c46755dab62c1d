"""The training CLI end to end: a --dry-run on real data writes a complete, servable model repository.

Each task's dry run takes a few seconds (digits) to half a minute (catdog, which decodes all photos) on a CPU,
so it runs once per module and the tests below inspect its output.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from training.mnist import MnistSplit
from training.photos import PhotoSet, decode_photo, resize_center_crop
from training.tasks import TASKS

CLI_TIMEOUT_SECONDS = 300
FLAGS = ["--data-dir", "--output", "--epochs", "--batch-size", "--device", "--seed", "--checkpoint-dir", "--dry-run"]
DRY_RUN_IMAGES = 32  # per evaluation split, as training.tasks limits a dry run


def run_cli(args: list[str], repo_root: Path, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m training`` from the checkout, with temporary files (and the dry-run repository) in tmpdir."""
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=repo_root,
        env={**os.environ, "TMPDIR": str(tmpdir)},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class DryRun:
    """What one ``--dry-run`` produced."""

    task: str
    tmpdir: Path
    model_dir: Path  # printed as ``wrote <model_dir>``
    checkpoint_dir: Path

    @property
    def card(self) -> dict[str, Any]:
        card: dict[str, Any] = json.loads((self.model_dir / "1" / "model_card.json").read_text())
        return card


@pytest.fixture(scope="module", params=sorted(TASKS))
def dry_run(
    request: pytest.FixtureRequest, data_dir: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> DryRun:
    """Run the real CLI once per task on the real data, on the CPU, with everything written under tmp_path."""
    task: str = request.param
    tmpdir = tmp_path_factory.mktemp(f"tmpdir-{task}")
    checkpoint_dir = tmp_path_factory.mktemp(f"checkpoints-{task}")
    args = [task, "--data-dir", str(data_dir), "--dry-run", "--device", "cpu", "--checkpoint-dir", str(checkpoint_dir)]
    result = run_cli(args, repo_root, tmpdir)
    assert result.returncode == 0, f"classify-train {task} --dry-run failed:\n{result.stderr[-4000:]}"
    wrote = [line.removeprefix("wrote ") for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1, f"expected one 'wrote <path>' line on stdout:\n{result.stdout}"
    return DryRun(task=task, tmpdir=tmpdir, model_dir=Path(wrote[0]), checkpoint_dir=checkpoint_dir)


@pytest.fixture(scope="module")
def real_batches(mnist_test_split: MnistSplit, photo_set: PhotoSet) -> dict[str, np.ndarray]:
    """Three real images per task, as the server would feed them: uint8 NHWC at the model's input size."""
    photos = photo_set.splits["val"][:2] + photo_set.splits["val"][-1:]  # two cats and a dog
    return {
        "digits": mnist_test_split.images[:3, :, :, None],
        "catdog": np.stack([np.asarray(resize_center_crop(decode_photo(photo.data), 224)) for photo in photos]),
    }


def test_dry_run_writes_only_to_temporary_places(dry_run: DryRun) -> None:
    """A dry run must never touch the real model repository: its output lives in TMPDIR, its checkpoint aside."""
    assert dry_run.model_dir.name == dry_run.task
    assert dry_run.model_dir.is_relative_to(dry_run.tmpdir)
    assert (dry_run.checkpoint_dir / f"{dry_run.task}-dry-run.pt").is_file()
    files = sorted(path.relative_to(dry_run.model_dir).as_posix() for path in dry_run.model_dir.rglob("*"))
    assert files == ["1", "1/model.onnx", "1/model_card.json", "config.pbtxt", "labels.txt"]


def test_dry_run_config_and_labels(dry_run: DryRun) -> None:
    """config.pbtxt is valid Triton text naming the model, and labels.txt has one line per class."""
    config = text_format.Parse((dry_run.model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == dry_run.task
    labels = (dry_run.model_dir / "labels.txt").read_text().splitlines()
    assert labels == list(TASKS[dry_run.task].labels)
    assert len(labels) == {"digits": 10, "catdog": 2}[dry_run.task]
    assert list(config.output[0].dims) == [len(labels)]


def test_dry_run_onnx_signature(dry_run: DryRun) -> None:
    """The served graph takes uint8 NHWC pixels with a dynamic batch and returns ``probabilities``."""
    session = ort.InferenceSession(str(dry_run.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.name == "image"
    assert model_input.type == "tensor(uint8)"
    batch, *dims = model_input.shape
    assert isinstance(batch, str), f"batch dimension should be symbolic, got {model_input.shape}"
    assert tuple(dims) == TASKS[dry_run.task].input_dims
    (model_output,) = session.get_outputs()
    assert model_output.name == "probabilities"
    assert model_output.type == "tensor(float)"
    assert model_output.shape[1:] == [len(TASKS[dry_run.task].labels)]


def test_dry_run_onnx_gives_probabilities(dry_run: DryRun, real_batches: dict[str, np.ndarray]) -> None:
    """Softmax is inside the graph: real images come out as one probability distribution each."""
    session = ort.InferenceSession(str(dry_run.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"image": real_batches[dry_run.task]})
    assert probabilities.shape == (3, len(TASKS[dry_run.task].labels))
    assert probabilities.dtype == np.float32
    assert (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-5)


def test_dry_run_model_card(dry_run: DryRun, data_dir: Path) -> None:
    """The card says what data (by hash), how, how well and how faithfully the ONNX file was made."""
    card, task = dry_run.card, TASKS[dry_run.task]
    assert card["name"] == dry_run.task
    assert card["version"] == 1
    assert card["labels"] == list(task.labels)
    assert card["input"]["name"] == "image"
    assert card["input"]["dims"] == list(task.input_dims)

    files = card["data"]["files"]
    assert files, "the card must list the data files it was trained on"
    for entry in files:
        path = data_dir / entry["path"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == sha256_of(path)
    assert card["data"]["skipped"] == []

    training = card["training"]
    assert training["dry_run"] is True
    assert training["seed"] == 0
    assert training["recipe"]["epochs"] == 1
    probe = [1] if task.recipe.linear_probe_l2 is not None else []  # the linear probe is logged as epoch 0
    assert [entry["epoch"] for entry in training["history"]] == [0] * len(probe) + [1]
    assert training["wall_time_seconds"] > 0
    assert training["device"] == "cpu"

    assert set(card["accuracy"]) == {"train", task.test_split}
    for split in card["accuracy"].values():
        assert 0.0 <= split["accuracy"] <= 1.0
        assert split["images"] == DRY_RUN_IMAGES

    assert card["parity"]["max_abs_diff"] <= 1e-4
    assert card["parity"]["images"] == DRY_RUN_IMAGES
    assert card["onnx"]["opset"] >= 17
    onnx_file = dry_run.model_dir / "1" / "model.onnx"
    assert card["onnx"]["sha256"] == sha256_of(onnx_file)
    assert card["onnx"]["bytes"] == onnx_file.stat().st_size


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a CUDA GPU")
def test_device_cuda_without_gpu_fails_clearly(data_dir: Path, repo_root: Path, tmp_path: Path) -> None:
    """Asking for the GPU where there is none must stop at once with a message, not fall back silently."""
    args = ["digits", "--data-dir", str(data_dir), "--dry-run", "--device", "cuda", "--checkpoint-dir", str(tmp_path)]
    result = run_cli(args, repo_root, tmp_path)
    assert result.returncode != 0
    assert "--device cuda" in result.stderr
    assert "no CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr
    assert "wrote" not in result.stdout


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("digits", "train-images-idx3-ubyte.gz: file not found"),
        ("catdog", "expected train/ and val/ folders or exactly one .zip, found 0 zips"),
    ],
    ids=["digits", "catdog"],
)
def test_missing_data_exits_2_naming_it(repo_root: Path, tmp_path: Path, task: str, expected: str) -> None:
    """A data folder without the task's files exits with status 2 and says what it looked for, and where."""
    empty = tmp_path / "empty-data"
    empty.mkdir()
    args = [task, "--data-dir", str(empty), "--dry-run", "--device", "cpu", "--checkpoint-dir", str(tmp_path)]
    result = run_cli(args, repo_root, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"classify-train: {empty}")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_flag(repo_root: Path, tmp_path: Path) -> None:
    """--help is the CLI's documentation: every option and both tasks must appear in it."""
    result = run_cli(["--help"], repo_root, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: classify-train")
    for text in [*FLAGS, "digits", "catdog"]:
        assert text in result.stdout, f"{text} missing from --help"
