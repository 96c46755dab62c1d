"""The classify.v1 API through its generated stub: encoded and raw images, top_k, versions, listing and streaming."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.protos.classify.v1 import classify_pb2 as pb
from serving.protos.classify.v1 import classify_pb2_grpc
from tests.serving.conftest import SMALL_BATCHING, ServerProcess, write_repository
from training.mnist import MnistSplit
from training.photos import Photo, PhotoSet

DIGIT_LABELS = [str(digit) for digit in range(10)]


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[classify_pb2_grpc.ClassifierStub]:
    """A generated classify.v1 stub on one channel to the session server."""
    with grpc.insecure_channel(server.address) as channel:
        yield classify_pb2_grpc.ClassifierStub(channel)


@pytest.fixture(scope="module")
def val_photos(photo_set: PhotoSet) -> list[Photo]:
    """4 cats and 4 dogs from the validation split, interleaved, kept as the JPEG bytes of the zip."""
    val = photo_set.splits["val"]
    cats, dogs = [p for p in val if p.label == 0][:4], [p for p in val if p.label == 1][:4]
    return [photo for pair in zip(cats, dogs, strict=True) for photo in pair]


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return data.getvalue()


def _png(mnist: MnistSplit, index: int) -> pb.Image:
    return pb.Image(encoded=_encode(mnist.images[index], "PNG"))


def _raw(mnist: MnistSplit, index: int) -> pb.Image:
    return pb.Image(raw=pb.RawImage(data=mnist.images[index].tobytes(), shape=[28, 28, 1]))


def _top(response: pb.ClassifyResponse) -> list[str]:
    """The best label of each image, in response order."""
    return [result.labels[0].label for result in response.results]


def test_single_png_digit(stub: classify_pb2_grpc.ClassifierStub, mnist_test_split: MnistSplit) -> None:
    """The simplest client: one PNG file, one label back, with the model and version that answered."""
    response = stub.Classify(pb.ClassifyRequest(model="digits", images=[_png(mnist_test_split, 0)]))
    assert (response.model, response.version) == ("digits", "1")
    assert not response.HasField("error")
    (result,) = response.results
    (label,) = result.labels
    assert label.label == str(mnist_test_split.labels[0])
    assert label.index == int(mnist_test_split.labels[0])
    assert 0.5 < label.score <= 1.0


def test_mixed_digit_encodings_come_back_in_order(
    stub: classify_pb2_grpc.ClassifierStub, mnist_test_split: MnistSplit
) -> None:
    """One request may mix PNG, JPEG and raw pixels; result i must belong to image i."""
    images = []
    for i in range(12):
        kind = i % 3
        if kind == 0:
            images.append(_png(mnist_test_split, i))
        elif kind == 1:
            images.append(pb.Image(encoded=_encode(mnist_test_split.images[i], "JPEG")))
        else:
            images.append(_raw(mnist_test_split, i))
    response = stub.Classify(pb.ClassifyRequest(model="digits", images=images))
    assert _top(response) == [str(label) for label in mnist_test_split.labels[:12]]


def test_jpeg_photos_from_the_zip(stub: classify_pb2_grpc.ClassifierStub, val_photos: list[Photo]) -> None:
    """Real camera JPEGs of any size are decoded, cropped and classified by the server, in request order."""
    assert all(photo.data.startswith(b"\xff\xd8\xff") for photo in val_photos)
    response = stub.Classify(pb.ClassifyRequest(model="catdog", images=[pb.Image(encoded=p.data) for p in val_photos]))
    assert _top(response) == [("cat", "dog")[photo.label] for photo in val_photos]


def test_one_decode_thread_decodes_a_request_of_many_photos(
    start_server: Callable[..., ServerProcess], repository: Path, val_photos: list[Photo]
) -> None:
    """--decode-threads sizes each process's decode pool; a request's images then queue for it, still in order."""
    server = start_server("--model-repository", str(repository), "--device", "cpu", "--decode-threads", "1")
    assert "decode threads: 1" in server.log
    with grpc.insecure_channel(server.address) as channel:
        response = classify_pb2_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(model="catdog", images=[pb.Image(encoded=p.data) for p in val_photos * 3])
        )
    assert _top(response) == [("cat", "dog")[photo.label] for photo in val_photos * 3]


def test_top_k(stub: classify_pb2_grpc.ClassifierStub, mnist_test_split: MnistSplit) -> None:
    """top_k unset gives one label; top_k k gives k labels, best first, each the label of its index."""
    images = [_png(mnist_test_split, 1), _raw(mnist_test_split, 2)]
    default = stub.Classify(pb.ClassifyRequest(model="digits", images=images))
    assert [len(result.labels) for result in default.results] == [1, 1]
    three = stub.Classify(pb.ClassifyRequest(model="digits", images=images, top_k=3))
    for result, first, truth in zip(three.results, default.results, mnist_test_split.labels[1:3], strict=True):
        scores = [label.score for label in result.labels]
        assert len(scores) == 3
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) <= 1.0 + 1e-6
        assert result.labels[0] == first.labels[0]
        assert result.labels[0].label == str(truth)
        assert [label.label for label in result.labels] == [DIGIT_LABELS[label.index] for label in result.labels]
        assert len({label.index for label in result.labels}) == 3


def test_top_k_of_all_labels_sums_to_one(
    stub: classify_pb2_grpc.ClassifierStub, val_photos: list[Photo], mnist_test_split: MnistSplit
) -> None:
    """Asking for every label returns each class once, with probabilities that add up to 1."""
    response = stub.Classify(pb.ClassifyRequest(model="catdog", images=[pb.Image(encoded=val_photos[0].data)], top_k=2))
    (result,) = response.results
    assert sorted(label.label for label in result.labels) == ["cat", "dog"]
    assert sum(label.score for label in result.labels) == pytest.approx(1.0, abs=1e-4)
    digits = stub.Classify(pb.ClassifyRequest(model="digits", images=[_png(mnist_test_split, 4)], top_k=10))
    assert sorted(label.index for label in digits.results[0].labels) == list(range(10))
    assert sum(label.score for label in digits.results[0].labels) == pytest.approx(1.0, abs=1e-4)


def test_explicit_version_and_request_id(stub: classify_pb2_grpc.ClassifierStub, mnist_test_split: MnistSplit) -> None:
    """A client pinning version "1" gets it and is told so; request_id comes back unchanged for log matching."""
    request = pb.ClassifyRequest(
        model="digits", version="1", images=[_png(mnist_test_split, 3)], request_id="trace-7f3a ü"
    )
    response = stub.Classify(request)
    assert (response.model, response.version, response.request_id) == ("digits", "1", "trace-7f3a ü")
    assert _top(response) == [str(mnist_test_split.labels[3])]


def test_list_models(stub: classify_pb2_grpc.ClassifierStub) -> None:
    """ListModels tells a client everything it needs to build a request: name, input, labels, batch size."""
    response = stub.ListModels(pb.ListModelsRequest())
    assert [model.name for model in response.models] == ["catdog", "digits"]
    catdog, digits = response.models
    assert list(catdog.versions) == list(digits.versions) == ["1"]
    assert catdog.ready
    assert digits.ready
    assert catdog.input == pb.InputInfo(height=224, width=224, channels=3, dtype="UINT8", layout="NHWC")
    assert digits.input == pb.InputInfo(height=28, width=28, channels=1, dtype="UINT8", layout="NHWC")
    assert list(catdog.labels) == ["cat", "dog"]
    assert list(digits.labels) == DIGIT_LABELS
    assert catdog.max_batch_size == SMALL_BATCHING["catdog"]["max_batch_size"]
    assert digits.max_batch_size == SMALL_BATCHING["digits"]["max_batch_size"]


def test_stream_answers_every_request_in_order_and_survives_bad_ones(
    stub: classify_pb2_grpc.ClassifierStub, mnist_test_split: MnistSplit
) -> None:
    """ClassifyStream: one response per request, in order; a bad request gets its error and the stream goes on."""
    bad: dict[int, tuple[str, str]] = {}  # request index -> expected error code and message start
    requests = []
    for i in range(30):
        request = pb.ClassifyRequest(model="digits", images=[_png(mnist_test_split, i)], request_id=f"s{i}")
        if i % 7 == 3:
            request.images[0].encoded = b"definitely not an image"
            bad[i] = ("INVALID_ARGUMENT", "image 0: unrecognised image data (23 bytes starting b'definite'): send")
        elif i % 7 == 5:
            request.model = "no-such-model"
            bad[i] = ("NOT_FOUND", "unknown model 'no-such-model'; served models: catdog, digits")
        elif i == 20:
            request.top_k = 0
            bad[i] = ("INVALID_ARGUMENT", "top_k must be between 1 and 10 for model 'digits', got 0")
        requests.append(request)
    responses = list(stub.ClassifyStream(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == [f"s{i}" for i in range(30)]
    for i, (request, response) in enumerate(zip(requests, responses, strict=True)):
        if i in bad:
            code, message = bad[i]
            assert response.error.code == code, (i, response)
            assert response.error.message.startswith(message), (i, response)
            assert not response.results
            assert response.model == request.model
        else:
            assert not response.HasField("error"), (i, response)
            assert (response.model, response.version) == ("digits", "1")
            assert _top(response) == [str(mnist_test_split.labels[i])]


@pytest.fixture
def two_versions(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server whose digits model has versions 1 and 2 (the same weights), both served."""
    root = write_repository(tmp_path / "models", {"digits": SMALL_BATCHING["digits"]})
    shutil.copytree(root / "digits" / "1", root / "digits" / "2")
    return start_server("--model-repository", str(root), "--device", "cpu", "--metrics-port", "0")


def test_versions(two_versions: ServerProcess, mnist_test_split: MnistSplit) -> None:
    """No version means the newest; a pinned version is honoured; an unknown one is NOT_FOUND naming what exists."""
    with grpc.insecure_channel(two_versions.address) as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        (info,) = stub.ListModels(pb.ListModelsRequest()).models
        assert list(info.versions) == ["1", "2"]
        images = [_raw(mnist_test_split, 0)]
        newest = stub.Classify(pb.ClassifyRequest(model="digits", images=images))
        assert newest.version == "2"
        pinned = stub.Classify(pb.ClassifyRequest(model="digits", version="1", images=images))
        assert pinned.version == "1"
        assert _top(newest) == _top(pinned) == [str(mnist_test_split.labels[0])]
        with pytest.raises(grpc.RpcError) as raised:
            stub.Classify(pb.ClassifyRequest(model="digits", version="7", images=images))
        error: grpc.Call = raised.value  # type: ignore[assignment]
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "model 'digits' has no version '7'; versions served: 1, 2"
