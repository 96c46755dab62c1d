"""The server's life: start-up with broken folders or no GPU, and the SIGTERM drain that loses no request."""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from serving.protos.classify.v1 import classify_pb2 as pb
from serving.protos.classify.v1 import classify_pb2_grpc
from serving.protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from tests.serving.conftest import REPO_ROOT, ServerProcess, write_repository

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
IN_FLIGHT = 50


def _photo_request() -> pb.ClassifyRequest:
    """A cat/dog request that costs real CPU time (a 224x224 EfficientNet run), so requests pile up."""
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    return pb.ClassifyRequest(model="catdog", images=[pb.Image(encoded=data.getvalue())])


async def _drain_scenario(server: ServerProcess) -> tuple[list[grpc.StatusCode], list[int], int]:
    """Start IN_FLIGHT requests and a health watch, send SIGTERM while they are queued, collect everything.

    Returns the status of every request, the health statuses watched, and how many requests were still
    unanswered when SIGTERM was sent.
    """
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        statuses_seen: list[int] = [(await watch.read()).status]
        request = _photo_request()

        async def classify() -> grpc.StatusCode:
            try:
                await stub.Classify(request, timeout=120)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        calls = [asyncio.ensure_future(classify()) for _ in range(IN_FLIGHT)]
        await asyncio.sleep(0.1)  # let them reach the server
        unanswered = sum(not call.done() for call in calls)
        server.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*calls)
        with contextlib.suppress(grpc.aio.AioRpcError):  # the server ends open watches once requests are done
            while (update := await watch.read()) is not grpc.aio.EOF:
                statuses_seen.append(update.status)
    return list(results), statuses_seen, unanswered


def test_sigterm_finishes_in_flight_requests_and_exits_zero(start_server: object, tmp_path: Path) -> None:
    """Kubernetes sends SIGTERM on every rollout: clients must not see errors for requests already sent."""
    repository = write_repository(
        tmp_path / "models", {"catdog": {"max_batch_size": 1, "delay_us": 0, "max_queue_size": 0, "instances": 1}}
    )
    server: ServerProcess = start_server("--model-repository", str(repository), "--device", "cpu")  # type: ignore[operator]
    results, health_statuses, unanswered = asyncio.run(_drain_scenario(server))
    assert results == [grpc.StatusCode.OK] * IN_FLIGHT, (results, server.log)
    assert unanswered >= IN_FLIGHT - 5, f"only {unanswered} requests were still in flight at SIGTERM"
    assert health_statuses[0] == SERVING
    assert NOT_SERVING in health_statuses[1:], f"health never reported NOT_SERVING: {health_statuses}"
    assert server.process.wait(60) == 0, server.log
    assert "SIGTERM: draining" in server.log
    assert "in-flight requests finished" in server.log


def test_new_requests_are_refused_while_draining(start_server: object, tmp_path: Path) -> None:
    """After SIGTERM the server takes no new work (clients retry elsewhere) and exits promptly."""
    repository = write_repository(tmp_path / "models")
    server: ServerProcess = start_server("--model-repository", str(repository), "--device", "cpu")  # type: ignore[operator]
    server.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert server.process.wait(30) == 0, server.log
    assert time.monotonic() - started < 10
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as refused:
        grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            grpc_service_pb2.ServerLiveRequest(), timeout=2
        )
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_second_signal_exits_at_once(start_server: object, tmp_path: Path) -> None:
    """An operator's second Ctrl-C must not wait for the drain."""
    repository = write_repository(
        tmp_path / "models", {"catdog": {"max_batch_size": 1, "delay_us": 0, "max_queue_size": 0, "instances": 1}}
    )
    server: ServerProcess = start_server(  # type: ignore[operator]
        "--model-repository", str(repository), "--device", "cpu", "--grace-period", "600"
    )

    async def scenario() -> float:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = classify_pb2_grpc.ClassifierStub(channel)
            request = _photo_request()
            calls = [asyncio.ensure_future(stub.Classify(request, timeout=600)) for _ in range(400)]  # a long drain
            await asyncio.sleep(0.2)
            server.process.send_signal(signal.SIGINT)
            await asyncio.sleep(0.5)
            server.process.send_signal(signal.SIGINT)
            started = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, server.process.wait, 30)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            return time.monotonic() - started

    exit_seconds = asyncio.run(scenario())
    assert server.process.returncode not in (0, None)
    assert exit_seconds < 5
    assert "second SIGINT: exiting now" in server.log


def test_broken_model_folder_is_reported_and_the_rest_serve(start_server: object, tmp_path: Path) -> None:
    """One bad folder (a typo in a config) must not take the other models down."""
    repository = write_repository(tmp_path / "models")
    broken = repository / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n')
    server: ServerProcess = start_server("--model-repository", str(repository), "--device", "cpu")  # type: ignore[operator]
    assert "model broken not loaded" in server.log
    assert "max_batch_size must be at least 1" in server.log
    with grpc.insecure_channel(server.address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(grpc_service_pb2.RepositoryIndexRequest())
        states = {(m.name, m.state) for m in index.models}
        assert {("digits", "READY"), ("catdog", "READY"), ("broken", "UNAVAILABLE")} <= states
        (entry,) = (m for m in index.models if m.name == "broken")
        assert "max_batch_size must be at least 1" in entry.reason
        assert stub.ServerReady(grpc_service_pb2.ServerReadyRequest()).ready
        assert not stub.ModelReady(grpc_service_pb2.ModelReadyRequest(name="broken")).ready


def test_device_cuda_without_gpu_fails_fast(tmp_path: Path) -> None:
    """Asking for the GPU where there is none is a deployment mistake: exit at once and say so."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "serving", "--device", "cuda", "--port", "0", "--metrics-port", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--device cuda: ONNX Runtime's CUDA execution provider did not load" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_device_auto_serves_on_cpu_with_one_warning(start_server: object, tmp_path: Path) -> None:
    """``auto`` is the container default: without a GPU it must still serve, and say why once."""
    repository = write_repository(tmp_path / "models")
    server: ServerProcess = start_server("--model-repository", str(repository), "--device", "auto")  # type: ignore[operator]
    assert server.log.count("CUDA execution provider unavailable") == 1
    assert "Failed to load library" not in server.log  # ONNX Runtime's own multi-line error stays quiet
