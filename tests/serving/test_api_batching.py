"""Dynamic batching seen from outside: concurrent clients share executions, statistics and Prometheus agree, a full
queue and an expired deadline are refused as documented, and requests over max_batch_size come back whole."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from serving.protos.classify.v1 import classify_pb2 as pb
from serving.protos.classify.v1 import classify_pb2_grpc
from tests.serving.conftest import ServerProcess, free_port, write_repository
from training.mnist import MnistSplit
from training.photos import Photo, PhotoSet, decode_photo, resize_center_crop

WAIT = 60.0  # seconds before a scenario that should finish quickly gives up instead of hanging
DEADLINE_MESSAGE = r"deadline exceeded: the request waited \d+\.\d ms in the queue"
QUEUE_FULL_MESSAGE = "model queue is full (max_queue_size 1); retry later"
# One image per execution and room for one waiting request: a request of BUSY_IMAGES photos keeps the only
# instance busy for that many runs (hundreds of ms on a CPU) while one more request fills the queue.
SERIAL_CATDOG = {"catdog": {"max_batch_size": 1, "delay_us": 0, "max_queue_size": 1, "instances": 1}}
BUSY_IMAGES = 64
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def val_photos(photo_set: PhotoSet) -> list[Photo]:
    """8 cats then 8 dogs from the validation split, as JPEG bytes."""
    val = photo_set.splits["val"]
    return [p for p in val if p.label == 0][:8] + [p for p in val if p.label == 1][:8]


@pytest.fixture(scope="module")
def photo_pixels(val_photos: list[Photo]) -> np.ndarray:
    """The photos preprocessed as the server does for encoded images: uint8 ``[16, 224, 224, 3]``."""
    return np.stack([np.asarray(resize_center_crop(decode_photo(p.data), 224)) for p in val_photos])


@pytest.fixture(scope="module")
def busy_pixels(photo_pixels: np.ndarray) -> np.ndarray:
    """BUSY_IMAGES photos (the 16 repeated): 8 cats, 8 dogs, 8 cats, ..."""
    return np.concatenate([photo_pixels] * (BUSY_IMAGES // len(photo_pixels)))


@pytest.fixture(scope="module")
def serial_catdog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A catdog server that runs one image at a time with a queue of one, shared by the queue and deadline tests."""
    folder = tmp_path_factory.mktemp("serial-catdog")
    repository = write_repository(folder / "models", SERIAL_CATDOG)
    process = ServerProcess(  # two decode threads on any machine, so a request of 8 photos queues on them
        ["--model-repository", str(repository), "--device", "cpu", "--metrics-port", str(free_port()),
         "--decode-threads", "2"],
        folder / "server.log",
    )  # fmt: skip
    try:
        process.wait_serving()
        yield process
    finally:
        process.kill()


def _input(images: np.ndarray) -> Any:
    tensor = triton_aio.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(np.ascontiguousarray(images))
    return tensor


def _scrape(server: ServerProcess) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sample(samples: Samples, name: str, **labels: str) -> float:
    """One series' value, 0 if it does not exist yet; counters by their name with or without prometheus' _total."""
    key = frozenset(labels.items())
    return next((samples[(n, key)] for n in (name, f"{name}_total") if (n, key) in samples), 0.0)


async def _statistics(client: Any, model: str) -> Any:
    (stats,) = (await client.get_inference_statistics(model, "1")).model_stats
    return stats


async def _until_running(client: Any, model: str, executions_before: int) -> None:
    """Wait until the server has finished at least one execution more than before (so a request is running)."""
    async with asyncio.timeout(WAIT):
        while (await _statistics(client, model)).execution_count <= executions_before:
            await asyncio.sleep(0.005)


async def _outcome(call: Any) -> tuple[str, str, Any]:
    """(status name, message, result) of a tritonclient call, without raising."""
    try:
        return "OK", "", await call
    except InferenceServerException as error:
        return (error.status() or "").removeprefix("StatusCode."), error.message() or "", None


def test_concurrent_requests_are_batched_and_statistics_match_metrics(
    tmp_path: Path, start_server: Callable[..., ServerProcess], mnist_test_split: MnistSplit
) -> None:
    """The point of dynamic batching: 64 clients at once cost far fewer than 64 executions, and both monitoring
    channels (ModelStatistics for perf_analyzer, Prometheus for dashboards) count the same thing."""
    repository = write_repository(
        tmp_path / "models",
        {"digits": {"max_batch_size": 16, "delay_us": 50_000, "max_queue_size": 256, "instances": 1}},
    )
    server = start_server("--model-repository", str(repository), "--device", "cpu", "--metrics-port", str(free_port()))
    images = mnist_test_split.images[:64].reshape(64, 1, 28, 28, 1)
    labels = mnist_test_split.labels[:64]
    series = {"model": "digits", "version": "1"}
    idle = _scrape(server)
    assert _sample(idle, "nv_inference_count", **series) == _sample(idle, "nv_inference_exec_count", **series) == 0

    async def scenario() -> tuple[Any, Any, list[Any]]:
        async with triton_aio.InferenceServerClient(server.address) as client:
            before = await _statistics(client, "digits")
            async with asyncio.timeout(WAIT):
                results = await asyncio.gather(
                    *(client.infer("digits", [_input(image)], request_id=f"r{i}") for i, image in enumerate(images))
                )
            return before, await _statistics(client, "digits"), results

    before, after, results = asyncio.run(scenario())
    # Warm-up runs every batch size before the server reports SERVING, but it is not inference: nothing counted.
    assert (before.inference_count, before.execution_count, before.inference_stats.success.count) == (0, 0, 0)
    assert (before.inference_stats.queue.count, len(before.batch_stats)) == (0, 0)
    assert [r.get_response().id for r in results] == [f"r{i}" for i in range(64)]
    predicted = [int(r.as_numpy("probabilities").argmax()) for r in results]
    assert predicted == labels.tolist()

    assert after.inference_count == 64
    assert 4 <= after.execution_count <= 32, f"{after.execution_count} executions for 64 concurrent images"
    assert after.inference_stats.success.count == after.inference_stats.queue.count == 64
    assert after.inference_stats.fail.count == 0
    batches = {entry.batch_size: entry.compute_infer.count for entry in after.batch_stats}
    assert max(batches) <= 16
    assert sum(batches.values()) == after.execution_count
    assert sum(size * count for size, count in batches.items()) == 64

    samples = _scrape(server)
    assert _sample(samples, "nv_inference_count", **series) == after.inference_count
    assert _sample(samples, "nv_inference_exec_count", **series) == after.execution_count
    assert _sample(samples, "classify_batch_size_count", **series) == after.execution_count
    assert _sample(samples, "classify_batch_size_sum", **series) == after.inference_count
    assert _sample(samples, "nv_inference_request_success", **series) == 64
    assert _sample(samples, "classify_request_duration_seconds_count", status="OK", **series) == 64
    assert _sample(samples, "classify_queue_duration_seconds_count", **series) == 64
    assert _sample(samples, "nv_inference_pending_request_count", **series) == 0
    assert not [key for key in samples if key[0] == "nv_inference_request_failure_total"], "a request failed"


def test_full_queue_is_refused_at_once(
    serial_catdog: ServerProcess, photo_pixels: np.ndarray, busy_pixels: np.ndarray
) -> None:
    """A full queue must refuse with RESOURCE_EXHAUSTED immediately (clients back off), not make callers wait."""
    before_metrics = _scrape(serial_catdog)

    async def scenario() -> tuple[Any, Any, tuple[str, str, Any], list[tuple[str, str, Any, bool]]]:
        async with triton_aio.InferenceServerClient(serial_catdog.address) as client:
            before = await _statistics(client, "catdog")
            busy = asyncio.ensure_future(_outcome(client.infer("catdog", [_input(busy_pixels)])))
            await _until_running(client, "catdog", before.execution_count)

            async def one() -> tuple[str, str, Any, bool]:
                status, message, result = await _outcome(client.infer("catdog", [_input(photo_pixels[15:])]))
                return status, message, result, busy.done()

            async with asyncio.timeout(WAIT):
                burst = await asyncio.gather(*(one() for _ in range(40)))
                busy_outcome = await busy
            return before, await _statistics(client, "catdog"), busy_outcome, burst

    before, after, busy_outcome, burst = asyncio.run(scenario())
    assert busy_outcome[0] == "OK", busy_outcome
    assert busy_outcome[2].as_numpy("probabilities").argmax(axis=1).tolist() == ([0] * 8 + [1] * 8) * 4
    statuses = [status for status, _, _, _ in burst]
    assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, statuses
    rejected = [entry for entry in burst if entry[0] == "RESOURCE_EXHAUSTED"]
    accepted = [entry for entry in burst if entry[0] == "OK"]
    assert rejected, "no request was refused with a queue of one"
    assert accepted, "no request got through"
    assert {message for _, message, _, _ in rejected} == {QUEUE_FULL_MESSAGE}
    assert any(not busy_done for _, _, _, busy_done in rejected), "every refusal waited for the running request"
    assert all(result.as_numpy("probabilities").argmax() == 1 for _, _, result, _ in accepted)

    # Refused requests never ran, and both statistics and metrics say how many there were.
    assert after.inference_count - before.inference_count == BUSY_IMAGES + len(accepted)
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1 + len(accepted)
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == len(rejected)
    after_metrics = _scrape(serial_catdog)
    failure = {"model": "catdog", "version": "1", "reason": "RESOURCE_EXHAUSTED"}
    refused = _sample(after_metrics, "nv_inference_request_failure", **failure)
    assert refused - _sample(before_metrics, "nv_inference_request_failure", **failure) == len(rejected)


async def _deadline_scenario(server: ServerProcess, busy_pixels: np.ndarray) -> tuple[Any, Any, tuple[str, str, Any]]:
    """Keep the only instance busy with BUSY_IMAGES photos, send one more photo with a 50 ms gRPC deadline."""
    async with triton_aio.InferenceServerClient(server.address) as client:
        before = await _statistics(client, "catdog")
        busy = asyncio.ensure_future(client.infer("catdog", [_input(busy_pixels)]))
        await _until_running(client, "catdog", before.execution_count)
        async with asyncio.timeout(WAIT):
            late = await _outcome(client.infer("catdog", [_input(busy_pixels[:1])], client_timeout=0.05))
            assert not busy.done(), "the busy request finished before the deadline: the scenario proves nothing"
            await busy
        return before, await _statistics(client, "catdog"), late


def test_expired_grpc_deadline_is_dropped_not_run(serial_catdog: ServerProcess, busy_pixels: np.ndarray) -> None:
    """A request whose caller gave up while it waited must not spend model time afterwards."""
    before, after, late = asyncio.run(_deadline_scenario(serial_catdog, busy_pixels))
    assert late[:2] == ("DEADLINE_EXCEEDED", "Deadline Exceeded")  # the client's own deadline, from gRPC
    assert after.inference_count - before.inference_count == BUSY_IMAGES, "the expired request was run anyway"
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1


def test_expired_grpc_deadline_is_not_counted_as_internal_error(
    serial_catdog: ServerProcess, busy_pixels: np.ndarray
) -> None:
    """Dashboards alert on INTERNAL failures; a client's deadline passing is not a server fault."""
    before = _scrape(serial_catdog)
    asyncio.run(_deadline_scenario(serial_catdog, busy_pixels))
    after = _scrape(serial_catdog)
    failures = {
        dict(labels)["reason"]: value - before.get((name, labels), 0.0)
        for (name, labels), value in after.items()
        if name.startswith("nv_inference_request_failure") and not name.endswith("_created")
    }
    failures = {reason: count for reason, count in failures.items() if count}
    assert failures in ({"DEADLINE_EXCEEDED": 1}, {"CANCELLED": 1}), failures


def test_timeout_parameter_is_enforced_by_the_server(server: ServerProcess, mnist_test_split: MnistSplit) -> None:
    """KServe's `timeout` request parameter (microseconds) is the server's to enforce: an expired request is
    answered DEADLINE_EXCEEDED with the server's message and never runs; a generous timeout changes nothing."""
    tensor = triton.InferInput("image", [1, 28, 28, 1], "UINT8")
    tensor.set_data_from_numpy(mnist_test_split.images[:1].reshape(1, 28, 28, 1))
    with triton.InferenceServerClient(server.address) as client:
        (before,) = client.get_inference_statistics("digits", "1").model_stats
        with pytest.raises(InferenceServerException) as raised:
            client.infer("digits", [tensor], timeout=1)
        assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert re.fullmatch(DEADLINE_MESSAGE, raised.value.message() or ""), raised.value.message()
        (after,) = client.get_inference_statistics("digits", "1").model_stats
        assert after.inference_count == before.inference_count
        assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
        result = client.infer("digits", [tensor], timeout=30_000_000)
        assert result.as_numpy("probabilities").argmax() == mnist_test_split.labels[0]


def test_request_over_max_batch_size_comes_back_whole_and_in_order(
    server: ServerProcess, mnist_test_split: MnistSplit
) -> None:
    """37 digits with max_batch_size 16 run as several executions and are stitched back in request order."""
    images = mnist_test_split.images[:37].reshape(37, 28, 28, 1)
    with triton.InferenceServerClient(server.address) as client:
        (before,) = client.get_inference_statistics("digits", "1").model_stats
        whole = client.infer("digits", [_input(images)]).as_numpy("probabilities")
        (after,) = client.get_inference_statistics("digits", "1").model_stats
        singles = np.concatenate(
            [client.infer("digits", [_input(images[i : i + 1])]).as_numpy("probabilities") for i in range(37)]
        )
    assert whole.shape == (37, 10)
    np.testing.assert_allclose(whole, singles, rtol=0, atol=1e-5)
    assert whole.argmax(axis=1).tolist() == mnist_test_split.labels[:37].tolist()
    assert after.inference_count - before.inference_count == 37
    assert after.execution_count - before.execution_count >= 3  # ceil(37 / 16)


def test_classify_over_max_batch_size_comes_back_whole_and_in_order(
    server: ServerProcess, val_photos: list[Photo]
) -> None:
    """9 photos with max_batch_size 4 through classify.v1: labels and scores as when sent one at a time."""
    chosen = val_photos[::2] + val_photos[1:2]  # 4 cats, 4 dogs, one cat more: 9
    with grpc.insecure_channel(server.address) as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        whole = stub.Classify(
            pb.ClassifyRequest(model="catdog", images=[pb.Image(encoded=p.data) for p in chosen], top_k=2), timeout=60
        )
        singles = [
            stub.Classify(pb.ClassifyRequest(model="catdog", images=[pb.Image(encoded=p.data)], top_k=2), timeout=60)
            for p in chosen
        ]
    assert len(whole.results) == 9
    for result, single, photo in zip(whole.results, singles, chosen, strict=True):
        (alone,) = single.results
        assert [label.label for label in result.labels] == [label.label for label in alone.labels]
        assert [label.score for label in result.labels] == pytest.approx(
            [label.score for label in alone.labels], abs=1e-5
        )
        assert result.labels[0].label == ("cat", "dog")[photo.label]


def test_concurrent_requests_over_max_batch_size_do_not_mix(
    server: ServerProcess, mnist_test_split: MnistSplit
) -> None:
    """Several large requests at once share executions; each must still get exactly its own rows back."""
    images = mnist_test_split.images[:100].reshape(100, 28, 28, 1)
    labels = mnist_test_split.labels[:100].tolist()
    sizes = [37, 1, 20, 5, 17, 20]
    starts = np.cumsum([0, *sizes[:-1]]).tolist()

    async def scenario() -> list[Any]:
        async with triton_aio.InferenceServerClient(server.address) as client, asyncio.timeout(WAIT):
            return await asyncio.gather(
                *(
                    client.infer("digits", [_input(images[start : start + size])])
                    for start, size in zip(starts, sizes, strict=True)
                )
            )

    results = asyncio.run(scenario())
    for result, start, size in zip(results, starts, sizes, strict=True):
        assert result.as_numpy("probabilities").argmax(axis=1).tolist() == labels[start : start + size]


def test_each_encoded_image_records_its_decode_wait_wall_and_cpu_time(
    serial_catdog: ServerProcess, val_photos: list[Photo], photo_pixels: np.ndarray
) -> None:
    """The decode stage's metrics say whether requests wait for a decode thread, and whether a decode's wall time
    runs ahead of its CPU time (its thread waiting for the GIL or a core): one sample per encoded image, an
    unreadable one included, none for raw pixels; a request of more images than threads waits for them."""
    series = {"model": "catdog", "version": "1"}
    before = _scrape(serial_catdog)
    encoded = [pb.Image(encoded=photo.data) for photo in val_photos[:8]]
    raw = pb.Image(raw=pb.RawImage(data=photo_pixels[0].tobytes(), shape=[224, 224, 3]))
    with grpc.insecure_channel(serial_catdog.address) as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        answer = stub.Classify(pb.ClassifyRequest(model="catdog", images=[*encoded, raw]), timeout=WAIT)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(pb.ClassifyRequest(model="catdog", images=[pb.Image(encoded=b"not an image")]), timeout=WAIT)
    assert len(answer.results) == 9
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = _scrape(serial_catdog)

    def added(name: str) -> float:
        return _sample(after, name, **series) - _sample(before, name, **series)

    assert added("classify_decode_duration_seconds_count") == added("classify_decode_wait_duration_seconds_count") == 9
    wall, cpu = added("classify_decode_duration_seconds_sum"), added("classify_decode_cpu_seconds")
    assert 0 < cpu <= wall + 0.001, f"a thread cannot use more CPU than wall time: {cpu} s CPU in {wall} s"
    # The 8 photos queue on the 2 decode threads: each of the last 6 waits for a decode ahead of it (about a ninth
    # of the wall total each; a quarter of that is the bound, for photos that decode faster than others).
    assert added("classify_decode_wait_duration_seconds_sum") >= 6 * wall / 9 / 4
