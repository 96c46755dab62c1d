"""On a CUDA machine: the server runs both models on ONNX Runtime's CUDA provider and answers correctly.

Skipped, with the reason, where ONNX Runtime's CUDA provider cannot run (CI has no GPU).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from serving.protos.classify.v1 import classify_pb2 as pb
from serving.protos.classify.v1 import classify_pb2_grpc
from serving.runtime import Device, DeviceUnavailable, ProviderSelector
from tests.serving.conftest import REPO_ROOT, ServerProcess, free_port
from training.mnist import MnistSplit
from training.photos import PhotoSet

MIN_ACCURACY = 0.99


def _cuda_runs() -> bool:
    try:
        ProviderSelector(Device.CUDA).session(REPO_ROOT / "models/digits/1/model.onnx", ort.SessionOptions())
    except DeviceUnavailable:
        return False
    return True


pytestmark = pytest.mark.skipif(not _cuda_runs(), reason="ONNX Runtime's CUDA execution provider cannot run here")


def _classify(stub: classify_pb2_grpc.ClassifierStub, model: str, images: list[pb.Image]) -> list[str]:
    labels: list[str] = []
    for start in range(0, len(images), 64):
        response = stub.Classify(pb.ClassifyRequest(model=model, images=images[start : start + 64]), timeout=120)
        labels += [result.labels[0].label for result in response.results]
    return labels


@pytest.mark.parametrize("workers", [1, 2])
def test_both_models_serve_correctly_on_cuda(
    start_server: object, mnist_test_split: MnistSplit, photo_set: PhotoSet, tmp_path: Path, workers: int
) -> None:
    """The production path: the committed models, their committed configs (cat/dog in FP16), the CUDA provider;
    with two workers, through the engine, whose joined and in-place inputs are page-locked."""
    server: ServerProcess = start_server(  # type: ignore[operator]
        "--model-repository", str(REPO_ROOT / "models"), "--device", "cuda",
        "--workers", str(workers), "--port", str(free_port()),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while server.log.count("serving.server: ready:") < workers and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "stays pageable" not in server.log, "CUDA page-locks the engine's and the instances' input buffers"
    on_cuda = "versions [1] on CUDAExecutionProvider, CPUExecutionProvider"
    assert f"model digits ready: {on_cuda}" in server.log
    assert f"model digits ready: {on_cuda} in float16" not in server.log
    assert f"model catdog ready: {on_cuda} in float16" in server.log
    digits = mnist_test_split.images[:1000, :, :, None]
    photos = photo_set.splits["val"]
    with grpc.insecure_channel(server.address) as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        digit_labels = _classify(
            stub, "digits", [pb.Image(raw=pb.RawImage(data=d.tobytes(), shape=[28, 28, 1])) for d in digits]
        )
        photo_labels = _classify(stub, "catdog", [pb.Image(encoded=photo.data) for photo in photos])
    digit_accuracy = float(np.mean(np.array(digit_labels, dtype=int) == mnist_test_split.labels[:1000]))
    photo_accuracy = float(
        np.mean([label == ("cat", "dog")[p.label] for label, p in zip(photo_labels, photos, strict=True)])
    )
    print(f"on CUDA: digits {digit_accuracy:.4f} on 1000 test images, catdog {photo_accuracy:.4f} on 1000 photos")
    assert digit_accuracy > MIN_ACCURACY
    assert photo_accuracy > MIN_ACCURACY
