"""The KServe v2 / Triton API as NVIDIA's own Python client (``tritonclient.grpc``) sees it, on the session server."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tests.serving.conftest import SMALL_BATCHING, ServerProcess
from training.mnist import MnistSplit
from training.photos import PhotoSet, decode_photo, resize_center_crop

DIGIT_LABELS = [str(digit) for digit in range(10)]
CATDOG_LABELS = ["cat", "dog"]
SHAPES = {"digits": [28, 28, 1], "catdog": [224, 224, 3]}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Any]:
    """One real Triton client for the module: what perf_analyzer and Python users talk to the server with."""
    with triton.InferenceServerClient(server.address) as connected:
        yield connected


@pytest.fixture(scope="module")
def digits(mnist_test_split: MnistSplit) -> tuple[np.ndarray, np.ndarray]:
    """The first 64 MNIST test digits as the model's uint8 ``[64, 28, 28, 1]`` input, with their labels."""
    return mnist_test_split.images[:64].reshape(64, 28, 28, 1), mnist_test_split.labels[:64].astype(np.int64)


@pytest.fixture(scope="module")
def photos(photo_set: PhotoSet) -> tuple[np.ndarray, np.ndarray]:
    """8 cat and 8 dog validation photos, preprocessed as the server does: uint8 ``[16, 224, 224, 3]``, labels."""
    val = photo_set.splits["val"]
    chosen = [p for p in val if p.label == 0][:8] + [p for p in val if p.label == 1][:8]
    images = np.stack([np.asarray(resize_center_crop(decode_photo(p.data), 224)) for p in chosen])
    return images, np.array([p.label for p in chosen])


def _input(images: np.ndarray) -> Any:
    tensor = triton.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return tensor


def _classes(result: Any) -> list[list[tuple[float, int, str]]]:
    """The classification extension's BYTES output, ``"score:index:label"`` elements, parsed per image."""
    rows = result.as_numpy("probabilities")
    parsed = []
    for row in rows:
        entries = []
        for element in row:
            score, index, label = element.decode().split(":", 2)
            entries.append((float(score), int(index), label))
        parsed.append(entries)
    return parsed


def test_server_is_live_and_ready(client: Any) -> None:
    """Kubernetes-style probes and tritonclient's wait loops call these before anything else."""
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_server_metadata_names_the_extensions_clients_look_for(client: Any) -> None:
    """perf_analyzer polls statistics only if "statistics" is advertised; "classification" tells clients top-k works."""
    metadata = client.get_server_metadata()
    assert metadata.name == "classify-service"
    assert metadata.version
    assert {"statistics", "classification", "model_repository", "model_configuration"} <= set(metadata.extensions)


@pytest.mark.parametrize(("model", "classes"), [("digits", 10), ("catdog", 2)])
def test_model_metadata_has_batch_dim_and_numeric_versions(client: Any, model: str, classes: int) -> None:
    """Clients size their tensors from the metadata: shape [-1] + dims, UINT8 in, FP32 out, numeric versions."""
    metadata = client.get_model_metadata(model)
    assert metadata.name == model
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "UINT8", [-1, *SHAPES[model]])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("probabilities", "FP32", [-1, classes])]
    assert client.get_model_metadata(model, model_version="1") == metadata


@pytest.mark.parametrize("model", ["digits", "catdog"])
def test_model_config_matches_the_repository_under_triton_schema(client: Any, repository: Path, model: str) -> None:
    """perf_analyzer reads max_batch_size and the tensors from ModelConfig; it must be the config.pbtxt served."""
    expected = text_format.Parse((repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config = client.get_model_config(model).config
    assert isinstance(config, model_config_pb2.ModelConfig)
    assert config.name == model
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == SMALL_BATCHING[model]["max_batch_size"] == expected.max_batch_size
    assert list(config.input) == list(expected.input)
    assert list(config.output) == list(expected.output)
    assert config.dynamic_batching == expected.dynamic_batching
    (tensor,) = config.input
    assert tensor.format == model_config_pb2.ModelInput.FORMAT_NHWC
    assert tensor.data_type == model_config_pb2.TYPE_UINT8
    assert list(tensor.dims) == SHAPES[model]  # without the batch dimension, as Triton writes it
    (output,) = config.output
    assert output.label_filename == "labels.txt"
    assert output.data_type == model_config_pb2.TYPE_FP32


def test_model_ready_is_true_only_for_served_models_and_versions(client: Any) -> None:
    """Clients poll ModelReady before sending; an unknown model or version must read false, not fail the call."""
    assert client.is_model_ready("digits") is True
    assert client.is_model_ready("catdog", "1") is True
    assert client.is_model_ready("no-such-model") is False
    assert client.is_model_ready("digits", "7") is False


def test_infer_real_mnist_digits(client: Any, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """The main path: a raw uint8 batch of 64 real digits (over max_batch_size 16) classified right."""
    images, labels = digits
    result = client.infer("digits", [_input(images)])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (64, 10)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    correct = int((probabilities.argmax(axis=1) == labels).sum())
    assert correct >= 62, f"only {correct}/64 digits right"
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("digits", "1")


def test_infer_real_photos(client: Any, photos: tuple[np.ndarray, np.ndarray]) -> None:
    """Real validation photos, preprocessed like the server does, must come back cat or dog correctly."""
    images, labels = photos
    probabilities = client.infer("catdog", [_input(images)]).as_numpy("probabilities")
    assert probabilities.shape == (16, 2)
    correct = int((probabilities.argmax(axis=1) == labels).sum())
    assert correct >= 15, f"only {correct}/16 photos right"


def test_classification_extension_returns_sorted_labelled_scores(
    client: Any, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """Triton's classification extension: BYTES "score:index:label", best first, agreeing with the raw output."""
    images, labels = digits[0][:8], digits[1][:8]
    outputs = [triton.InferRequestedOutput("probabilities", class_count=3)]
    result = client.infer("digits", [_input(images)], outputs=outputs)
    output = result.get_output("probabilities")
    assert output.datatype == "BYTES"
    assert list(output.shape) == [8, 3]
    probabilities = client.infer("digits", [_input(images)]).as_numpy("probabilities")
    for row, label, scores in zip(_classes(result), labels, probabilities, strict=True):
        assert [score for score, _, _ in row] == sorted((score for score, _, _ in row), reverse=True)
        assert row[0][1] == label
        for score, index, name in row:
            assert name == DIGIT_LABELS[index]
            assert score == pytest.approx(float(scores[index]), abs=1e-6)


def test_classification_of_every_class_on_photos(client: Any, photos: tuple[np.ndarray, np.ndarray]) -> None:
    """With class_count equal to the number of classes, both labels come back with the model's label names."""
    images, labels = photos[0][[0, 15]], photos[1][[0, 15]]
    outputs = [triton.InferRequestedOutput("probabilities", class_count=2)]
    rows = _classes(client.infer("catdog", [_input(images)], outputs=outputs))
    assert [row[0][2] for row in rows] == [CATDOG_LABELS[label] for label in labels]
    for row in rows:
        assert sorted(name for _, _, name in row) == CATDOG_LABELS
        assert sum(score for score, _, _ in row) == pytest.approx(1.0, abs=1e-4)


def test_request_id_is_echoed(client: Any, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """perf_analyzer's async modes match responses to requests by id."""
    result = client.infer("digits", [_input(digits[0][:1])], request_id="request-42")
    assert result.get_response().id == "request-42"


def test_statistics_grow_after_inference(client: Any, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """perf_analyzer diffs ModelStatistics around each window: counts must grow, versions must be numeric."""
    before = client.get_inference_statistics("digits", "1").model_stats[0]
    client.infer("digits", [_input(digits[0][:5])])
    after_stats = client.get_inference_statistics("digits", "1").model_stats
    assert len(after_stats) == 1
    after = after_stats[0]
    assert (after.name, after.version) == ("digits", "1")
    assert after.inference_count == before.inference_count + 5
    assert after.execution_count == before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.queue.count == before.inference_stats.queue.count + 1
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert abs(after.last_inference - time.time() * 1000) < 60_000  # milliseconds since the epoch
    batches = {entry.batch_size: entry.compute_infer.count for entry in after.batch_stats}
    assert sum(batches.values()) == after.execution_count
    assert sum(size * count for size, count in batches.items()) == after.inference_count
    everything = client.get_inference_statistics().model_stats
    assert {(s.name, s.version) for s in everything} == {("digits", "1"), ("catdog", "1")}
    assert all(s.version.isdigit() for s in everything)


def test_stream_infer_answers_every_request_with_its_id(
    client: Any, digits: tuple[np.ndarray, np.ndarray], photos: tuple[np.ndarray, np.ndarray]
) -> None:
    """Streaming clients (perf_analyzer --streaming) send many requests on one call and match answers by id."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def on_response(result: Any, error: Any) -> None:
        answers.put((result, error))

    expected: dict[str, tuple[str, int]] = {}
    client.start_stream(callback=on_response)
    try:
        for i in range(20):
            request_id = f"stream-{i}"
            if i % 5 == 4:
                model, images, label = "catdog", photos[0][i // 5 * 4 : i // 5 * 4 + 1], int(photos[1][i // 5 * 4])
            else:
                model, images, label = "digits", digits[0][i : i + 1], int(digits[1][i])
            expected[request_id] = (model, label)
            client.async_stream_infer(model, [_input(images)], request_id=request_id)
    finally:
        client.stop_stream()  # closes the request stream and waits for every response
    received: dict[str, tuple[str, int]] = {}
    while not answers.empty():
        result, error = answers.get_nowait()
        assert error is None, error
        response = result.get_response()
        assert response.id not in received, f"two responses for {response.id}"
        received[response.id] = (response.model_name, int(result.as_numpy("probabilities").argmax()))
    assert received == expected


def test_repository_index_lists_both_models_ready(client: Any) -> None:
    """Triton's model_repository extension: tools list what is loaded and whether it is ready."""
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [("catdog", "1", "READY"), ("digits", "1", "READY")]
