"""Bad requests on both APIs: each gets the documented status code and a message that says what was wrong,
and the server goes on serving good requests."""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from serving.protos.classify.v1 import classify_pb2 as pb
from serving.protos.classify.v1 import classify_pb2_grpc
from serving.protos.inference import grpc_service_pb2 as kserve
from serving.protos.inference import grpc_service_pb2_grpc
from tests.serving.conftest import SMALL_BATCHING, ServerProcess, write_repository
from training.mnist import MnistSplit

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
SEND = "send PNG, JPEG, BMP, GIF, WebP or TIFF bytes"
DIGIT = bytes(range(256)) * 3 + bytes(16)  # 784 bytes: one 28x28x1 image


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


@pytest.fixture(scope="module")
def classify(channel: grpc.Channel) -> classify_pb2_grpc.ClassifierStub:
    return classify_pb2_grpc.ClassifierStub(channel)


@pytest.fixture(scope="module")
def inference(channel: grpc.Channel) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    """Our own generated KServe stub: unlike tritonclient it sends whatever bytes and shapes it is given."""
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def triton_client(server: ServerProcess) -> Iterator[Any]:
    with triton.InferenceServerClient(server.address) as client:
        yield client


# -- helpers --


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _black_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of any size, built a row at a time: a bomb of a few KB, small in memory too."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed pixels, all black
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale, deflate, no filter/interlace
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _noise_png(size: int, channels: int = 1) -> bytes:
    """Random pixels: they do not compress, so cutting the file loses pixel data, and the size is predictable."""
    shape = (size, size) if channels == 1 else (size, size, channels)
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(size).integers(0, 256, shape, dtype=np.uint8)).save(data, format="PNG")
    return data.getvalue()


def _rpc_error(call: Callable[[], object]) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error: grpc.Call = raised.value  # type: ignore[assignment]
    return error


def _digits_request(*images: pb.Image, **fields: Any) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=fields.pop("model", "digits"), images=list(images), **fields)


def _raw_digit(data: bytes = DIGIT, shape: tuple[int, ...] = (28, 28, 1)) -> pb.Image:
    return pb.Image(raw=pb.RawImage(data=data, shape=shape))


def _infer_request(
    *,
    model: str = "digits",
    version: str = "",
    name: str = "image",
    datatype: str = "UINT8",
    shape: tuple[int, ...] = (1, 28, 28, 1),
    raw: tuple[bytes, ...] = (DIGIT,),
) -> kserve.ModelInferRequest:
    request = kserve.ModelInferRequest(model_name=model, model_version=version, id="bad-1")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raw)
    return request


def _assert_still_serving(stub: classify_pb2_grpc.ClassifierStub, mnist: MnistSplit) -> None:
    """After bad requests, a good one still gets the right answer."""
    response = stub.Classify(_digits_request(_raw_digit(mnist.images[0].tobytes())))
    assert response.results[0].labels[0].label == str(mnist.labels[0])


# -- classify.v1 --

CLASSIFY_ERRORS: dict[str, tuple[Callable[[], pb.ClassifyRequest], grpc.StatusCode, str]] = {
    "garbage": (
        lambda: _digits_request(pb.Image(encoded=b"GARBAGE!" * 10)),
        INVALID,
        f"image 0: unrecognised image data (80 bytes starting b'GARBAGE!'): {SEND}",
    ),
    "empty-image": (
        lambda: _digits_request(pb.Image(encoded=b"")),
        INVALID,
        f"image 0: empty image: 0 bytes; {SEND}",
    ),
    "no-payload": (
        lambda: _digits_request(_raw_digit(), pb.Image()),
        INVALID,
        "image 1: set either `encoded` (image file bytes) or `raw` (uint8 HWC pixels)",
    ),
    "truncated-png": (
        lambda: _digits_request(_raw_digit(), _raw_digit(), pb.Image(encoded=_noise_png(28)[:400])),
        INVALID,
        "image 2: truncated or corrupt PNG: image file is truncated",
    ),
    "damaged-png-header": (
        lambda: _digits_request(pb.Image(encoded=_noise_png(28)[:40])),
        INVALID,
        "image 0: truncated or corrupt PNG: header cannot be read",
    ),
    "png-bomb-20000x20000": (
        lambda: _digits_request(pb.Image(encoded=_black_png(20_000, 20_000))),
        INVALID,
        "image 0: image is over the limit of 50,000,000 pixels (width x height)",
    ),
    "png-over-pixel-limit": (
        lambda: _digits_request(pb.Image(encoded=_black_png(8_000, 8_000))),
        INVALID,
        "image 0: image is 8000x8000 = 64,000,000 pixels, over the limit of 50,000,000 pixels (width x height)",
    ),
    "image-over-byte-limit": (
        lambda: _digits_request(pb.Image(encoded=bytes(16 * 1024 * 1024 + 1))),
        INVALID,
        "image 0: image is 16,777,217 bytes, over the limit of 16,777,216 bytes",
    ),
    "raw-byte-count": (
        lambda: _digits_request(_raw_digit(DIGIT[:700])),
        INVALID,
        "image 0: raw image has 700 bytes, shape [28, 28, 1] needs 784",
    ),
    "raw-two-dims": (
        lambda: _digits_request(_raw_digit(shape=(28, 28))),
        INVALID,
        "image 0: raw image shape [28, 28] must be [28, 28, 1] (height, width, channels)",
    ),
    "raw-wrong-size": (
        lambda: _digits_request(_raw_digit(bytes(32 * 32), shape=(32, 32, 1))),
        INVALID,
        "image 0: raw image shape [32, 32, 1] must be [28, 28, 1] (height, width, channels)",
    ),
    "raw-rgb-for-grayscale": (
        lambda: _digits_request(_raw_digit(DIGIT * 3, shape=(28, 28, 3))),
        INVALID,
        "image 0: raw image shape [28, 28, 3] must be [28, 28, 1] (height, width, channels)",
    ),
    "no-images": (lambda: _digits_request(), INVALID, "the request holds no images; send at least one"),
    "top-k-zero": (
        lambda: _digits_request(_raw_digit(), top_k=0),
        INVALID,
        "top_k must be between 1 and 10 for model 'digits', got 0",
    ),
    "top-k-too-large": (
        lambda: _digits_request(_raw_digit(), top_k=11),
        INVALID,
        "top_k must be between 1 and 10 for model 'digits', got 11",
    ),
    "top-k-negative": (
        lambda: _digits_request(_raw_digit(), top_k=-1),
        INVALID,
        "top_k must be between 1 and 10 for model 'digits', got -1",
    ),
    "unknown-model": (
        lambda: _digits_request(_raw_digit(), model="nope"),
        NOT_FOUND,
        "unknown model 'nope'; served models: catdog, digits",
    ),
    "no-model": (
        lambda: _digits_request(_raw_digit(), model=""),
        NOT_FOUND,
        "unknown model ''; served models: catdog, digits",
    ),
    "unknown-version": (
        lambda: _digits_request(_raw_digit(), version="7"),
        NOT_FOUND,
        "model 'digits' has no version '7'; versions served: 1",
    ),
    "non-numeric-version": (
        lambda: _digits_request(_raw_digit(), version="latest"),
        NOT_FOUND,
        "model 'digits' has no version 'latest'; versions served: 1",
    ),
}


@pytest.mark.parametrize("case", list(CLASSIFY_ERRORS))
def test_classify_rejects_bad_requests(
    classify: classify_pb2_grpc.ClassifierStub, mnist_test_split: MnistSplit, case: str
) -> None:
    """Every way a client can get a request wrong ends in the documented status and a message it can act on."""
    build, code, message = CLASSIFY_ERRORS[case]
    error = _rpc_error(lambda: classify.Classify(build(), timeout=30))
    assert error.code() == code
    assert error.details() == message
    _assert_still_serving(classify, mnist_test_split)


def test_classify_bad_image_fails_the_whole_request(
    classify: classify_pb2_grpc.ClassifierStub, mnist_test_split: MnistSplit
) -> None:
    """One undecodable image among good ones fails the whole request, naming its position: no partial results."""
    good = _raw_digit(mnist_test_split.images[0].tobytes())
    request = _digits_request(good, good, good, pb.Image(encoded=b"\xff\xd8\xff" + bytes(50)), good)
    error = _rpc_error(lambda: classify.Classify(request, timeout=30))
    assert error.code() == INVALID
    assert re.fullmatch(r"image 3: truncated or corrupt JPEG: .+", error.details() or ""), error.details()
    _assert_still_serving(classify, mnist_test_split)


# -- KServe v2 --


def _typed_request(values: list[int], raw: tuple[bytes, ...] = ()) -> kserve.ModelInferRequest:
    request = _infer_request(raw=raw)
    request.inputs[0].contents.uint_contents.extend(values)
    return request


def _with_output(name: str, classification: int | None = None) -> kserve.ModelInferRequest:
    request = _infer_request()
    output = request.outputs.add(name=name)
    if classification is not None:
        output.parameters["classification"].int64_param = classification
    return request


def _with_timeout(parameter: kserve.InferParameter) -> kserve.ModelInferRequest:
    request = _infer_request()
    request.parameters["timeout"].CopyFrom(parameter)
    return request


def _two_inputs() -> kserve.ModelInferRequest:
    request = _infer_request(raw=(DIGIT, DIGIT))
    request.inputs.add(name="image2", datatype="UINT8", shape=[1, 28, 28, 1])
    return request


KSERVE_ERRORS: dict[str, tuple[Callable[[], kserve.ModelInferRequest], grpc.StatusCode, str]] = {
    "fp32": (
        lambda: _infer_request(datatype="FP32", raw=(DIGIT * 4,)),
        INVALID,
        "input 'image' has datatype 'FP32'; the model takes UINT8",
    ),
    "shape-without-channels": (
        lambda: _infer_request(shape=(1, 28, 28)),
        INVALID,
        "input 'image' has shape [1, 28, 28]; expected [batch >= 1, 28, 28, 1]",
    ),
    "shape-wrong-size": (
        lambda: _infer_request(shape=(1, 32, 32, 1), raw=(bytes(1024),)),
        INVALID,
        "input 'image' has shape [1, 32, 32, 1]; expected [batch >= 1, 28, 28, 1]",
    ),
    "batch-zero": (
        lambda: _infer_request(shape=(0, 28, 28, 1), raw=(b"",)),
        INVALID,
        "input 'image' has shape [0, 28, 28, 1]; expected [batch >= 1, 28, 28, 1]",
    ),
    "input-name": (
        lambda: _infer_request(name="pixels"),
        INVALID,
        "unknown input 'pixels'; model 'digits' takes 'image'",
    ),
    "two-inputs": (_two_inputs, INVALID, "model 'digits' takes exactly one input, 'image'; got 2"),
    "no-inputs": (
        lambda: kserve.ModelInferRequest(model_name="digits"),
        INVALID,
        "model 'digits' takes exactly one input, 'image'; got 0",
    ),
    "byte-count": (
        lambda: _infer_request(raw=(DIGIT[:783],)),
        INVALID,
        "input 'image': 783 bytes of raw data, shape [1, 28, 28, 1] of UINT8 needs 784",
    ),
    "byte-count-for-batch": (
        lambda: _infer_request(shape=(2, 28, 28, 1)),
        INVALID,
        "input 'image': 784 bytes of raw data, shape [2, 28, 28, 1] of UINT8 needs 1568",
    ),
    "two-raw-entries": (
        lambda: _infer_request(raw=(DIGIT, DIGIT)),
        INVALID,
        "raw_input_contents holds 2 entries for 1 input",
    ),
    "raw-and-typed": (
        lambda: _typed_request([0] * 784, raw=(DIGIT,)),
        INVALID,
        "send the input either in raw_input_contents or in contents, not both",
    ),
    "typed-count": (
        lambda: _typed_request([1, 2, 3, 4, 5]),
        INVALID,
        "input 'image': 5 values in contents.uint_contents, shape [1, 28, 28, 1] needs 784",
    ),
    "typed-over-255": (
        lambda: _typed_request([300] + [0] * 783),
        INVALID,
        "input 'image': UINT8 values must be 0..255, found 300",
    ),
    "unknown-output": (
        lambda: _with_output("logits"),
        INVALID,
        "unknown output 'logits'; model 'digits' has 'probabilities'",
    ),
    "classification-too-large": (
        lambda: _with_output("probabilities", 11),
        INVALID,
        "classification count must be 1..10, got 11",
    ),
    "classification-zero": (
        lambda: _with_output("probabilities", 0),
        INVALID,
        "classification count must be 1..10, got 0",
    ),
    "negative-timeout": (
        lambda: _with_timeout(kserve.InferParameter(int64_param=-5)),
        INVALID,
        "parameter `timeout` must be a non-negative integer number of microseconds",
    ),
    "text-timeout": (
        lambda: _with_timeout(kserve.InferParameter(string_param="5s")),
        INVALID,
        "parameter `timeout` must be a non-negative integer number of microseconds",
    ),
    "unknown-model": (
        lambda: _infer_request(model="nope"),
        NOT_FOUND,
        "unknown model 'nope'; served models: catdog, digits",
    ),
    "unknown-version": (
        lambda: _infer_request(version="7"),
        NOT_FOUND,
        "model 'digits' has no version '7'; versions served: 1",
    ),
}


@pytest.mark.parametrize("case", list(KSERVE_ERRORS))
def test_model_infer_rejects_bad_requests(
    inference: grpc_service_pb2_grpc.GRPCInferenceServiceStub,
    classify: classify_pb2_grpc.ClassifierStub,
    mnist_test_split: MnistSplit,
    case: str,
) -> None:
    """Hand-built requests that tritonclient would refuse client side must still be refused by the server."""
    build, code, message = KSERVE_ERRORS[case]
    error = _rpc_error(lambda: inference.ModelInfer(build(), timeout=30))
    assert error.code() == code
    assert error.details() == message
    good = _infer_request(raw=(mnist_test_split.images[0].tobytes(),))
    response = inference.ModelInfer(good, timeout=30)
    assert np.frombuffer(response.raw_output_contents[0], "<f4").argmax() == mnist_test_split.labels[0]
    _assert_still_serving(classify, mnist_test_split)


def test_typed_contents_give_the_same_answer_as_raw(
    inference: grpc_service_pb2_grpc.GRPCInferenceServiceStub, mnist_test_split: MnistSplit
) -> None:
    """The counterpart of the typed-contents errors: well-formed uint_contents are accepted and mean the same bytes."""
    pixels = mnist_test_split.images[:2]
    typed = _typed_request([int(v) for v in pixels.reshape(-1)])
    typed.inputs[0].shape[:] = [2, 28, 28, 1]
    raw = _infer_request(shape=(2, 28, 28, 1), raw=(pixels.tobytes(),))
    from_typed = inference.ModelInfer(typed, timeout=30)
    from_raw = inference.ModelInfer(raw, timeout=30)
    assert from_typed.id == "bad-1"
    assert from_typed.raw_output_contents == from_raw.raw_output_contents


@pytest.mark.parametrize("output", [("logits", None), ("probabilities", 11)], ids=["unknown-output", "class-count"])
def test_request_with_bad_outputs_is_not_run_or_counted_as_success(
    inference: grpc_service_pb2_grpc.GRPCInferenceServiceStub, output: tuple[str, int | None]
) -> None:
    """A request the client sees fail must not cost a model run nor count as a success in statistics and metrics."""
    stats = kserve.ModelStatisticsRequest(name="digits", version="1")
    before = inference.ModelStatistics(stats, timeout=30).model_stats[0]
    error = _rpc_error(lambda: inference.ModelInfer(_with_output(*output), timeout=30))
    assert error.code() == INVALID
    after = inference.ModelStatistics(stats, timeout=30).model_stats[0]
    ran = after.inference_count - before.inference_count
    succeeded = after.inference_stats.success.count - before.inference_stats.success.count
    assert (ran, succeeded) == (0, 0), f"the rejected request ran {ran} image(s) and counted {succeeded} success(es)"


def test_stream_reports_errors_per_request_with_their_ids(
    inference: grpc_service_pb2_grpc.GRPCInferenceServiceStub, mnist_test_split: MnistSplit
) -> None:
    """ModelStreamInfer answers a bad request with error_message (and its id) and goes on with the next ones."""
    requests = []
    for i in range(6):
        request = _infer_request(raw=(mnist_test_split.images[i].tobytes(),))
        request.id = f"stream-{i}"
        if i == 2:
            request.raw_input_contents[0] = b"short"
        elif i == 4:
            request.model_name = "nope"
        requests.append(request)
    responses = list(inference.ModelStreamInfer(iter(requests), timeout=30))
    assert [r.infer_response.id for r in responses] == [f"stream-{i}" for i in range(6)]
    assert responses[2].error_message == "input 'image': 5 bytes of raw data, shape [1, 28, 28, 1] of UINT8 needs 784"
    assert responses[4].error_message == "unknown model 'nope'; served models: catdog, digits"
    for i in (0, 1, 3, 5):
        assert responses[i].error_message == ""
        probabilities = np.frombuffer(responses[i].infer_response.raw_output_contents[0], "<f4")
        assert probabilities.argmax() == mnist_test_split.labels[i]


def _triton_error(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value


def test_tritonclient_sees_status_and_message(triton_client: Any, mnist_test_split: MnistSplit) -> None:
    """tritonclient shows users the status and the server's message for metadata, config, statistics and infer."""
    for call, message in [
        (lambda: triton_client.get_model_metadata("nope"), "unknown model 'nope'; served models: catdog, digits"),
        (
            lambda: triton_client.get_model_metadata("digits", "3"),
            "model 'digits' has no version '3'; versions served: 1",
        ),
        (lambda: triton_client.get_model_config("nope"), "unknown model 'nope'; served models: catdog, digits"),
        (lambda: triton_client.get_inference_statistics("nope"), "unknown model 'nope'; served models: catdog, digits"),
    ]:
        error = _triton_error(call)
        assert error.status() == "StatusCode.NOT_FOUND"
        assert error.message() == message
    tensor = triton.InferInput("image", [1, 28, 28, 1], "UINT8")
    tensor.set_data_from_numpy(mnist_test_split.images[:1].reshape(1, 28, 28, 1))
    outputs = [triton.InferRequestedOutput("probabilities", class_count=11)]
    error = _triton_error(lambda: triton_client.infer("digits", [tensor], outputs=outputs))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message() == "classification count must be 1..10, got 11"
    error = _triton_error(lambda: triton_client.infer("nope", [tensor]))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert error.message() == "unknown model 'nope'; served models: catdog, digits"
    result = triton_client.infer("digits", [tensor])
    assert result.as_numpy("probabilities").argmax() == mnist_test_split.labels[0]


# -- message size --


def test_message_over_the_size_limit_is_resource_exhausted(
    tmp_path: Path, start_server: Callable[..., ServerProcess], mnist_test_split: MnistSplit
) -> None:
    """--max-message-bytes bounds what one client can make the server buffer; the server keeps serving after."""
    root = write_repository(tmp_path / "models", {"digits": SMALL_BATCHING["digits"]})
    small = start_server(
        "--model-repository", str(root), "--device", "cpu", "--metrics-port", "0", "--max-message-bytes", "100000"
    )
    big_image = _noise_png(200, channels=3)  # about 120 KB of incompressible pixels
    assert len(big_image) > 100_000
    with grpc.insecure_channel(small.address) as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        request = _digits_request(pb.Image(encoded=big_image))
        error = _rpc_error(lambda: stub.Classify(request, timeout=30))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # gRPC's own message, which its core prefixes with "SERVER: " when the server refused the message.
        expected = f"Received message larger than max ({request.ByteSize()} vs. 100000)"
        assert error.details() in (expected, f"SERVER: {expected}")
        _assert_still_serving(stub, mnist_test_split)
    with triton.InferenceServerClient(small.address) as client:
        tensor = triton.InferInput("image", [200, 28, 28, 1], "UINT8")
        tensor.set_data_from_numpy(np.zeros((200, 28, 28, 1), dtype=np.uint8))  # 156,800 bytes
        error_from_triton = _triton_error(lambda: client.infer("digits", [tensor]))
        assert error_from_triton.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "larger than max" in (error_from_triton.message() or "")
        assert client.is_server_ready()
