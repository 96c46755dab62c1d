"""The engine process and a worker's RemoteRuntime: the same answers as local sessions, errors that say why."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serving.engine import run_engine
from serving.engine_client import EngineError, RemoteRuntime
from serving.engine_merge import EngineRun
from serving.gpu_options import GpuOptions
from serving.runtime import Device, ModelRuntime, ProviderSelector

DIGITS = Path("models/digits/1/model.onnx")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[str, multiprocessing.process.BaseProcess]]:
    """A real engine process on the CPU, listening on a Unix socket in ``tmp_path``."""
    address = tmp_path / "engine.sock"
    process = multiprocessing.get_context("spawn").Process(target=run_engine, args=(str(address), Device.CPU))
    process.start()
    deadline = time.monotonic() + 30
    while not address.exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert address.exists(), "the engine did not start listening"
    yield str(address), process
    process.kill()
    process.join()


def test_remote_runtime_matches_local_sessions(engine: tuple[str, object]) -> None:
    address, _ = engine
    remote = RemoteRuntime(address, DIGITS, 2, 64, cpu_only=False)
    local = ModelRuntime(DIGITS, 1, 64, ProviderSelector(Device.CPU))
    assert remote.providers == ["CPUExecutionProvider"]
    assert (remote.input, remote.output) == (local.input, local.output)
    images = np.random.default_rng(0).integers(0, 256, (37, 28, 28, 1), dtype=np.uint8)
    for runner in remote.runners:  # each instance has its own connection and shared memory
        for rows in (1, 5, 37):
            np.testing.assert_allclose(runner(images[:rows]), local.runners[0](images[:rows]), atol=1e-6)
    remote.close()


def test_each_batch_reports_where_its_time_in_the_engine_went(engine: tuple[str, object]) -> None:
    """The worker's metrics split an execution into the wait for the instance and the run (``EngineRun``)."""
    address, _ = engine
    remote = RemoteRuntime(address, DIGITS, 2, 16, cpu_only=False)
    seen: list[EngineRun] = []
    remote.observe_engine(seen.append)
    for connection, rows in ((0, 1), (1, 5), (0, 3)):
        started = time.perf_counter_ns()
        remote.runners[connection](np.zeros((rows, 28, 28, 1), np.uint8))
        took = time.perf_counter_ns() - started
        run = seen[-1]
        assert run.instance == 0, "one batch at a time: the first free instance runs each, whichever connection"
        assert run.run_rows == rows, "alone, the batch is its own run"
        assert run.wait_ns >= 0
        assert 0 < run.infer_ns <= run.run_ns <= took
    assert len(seen) == 3
    remote.close()


def test_a_failing_timing_observer_does_not_fail_the_batch(
    engine: tuple[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """The batch ran: its answer counts more than a statistic about it."""
    address, _ = engine
    remote = RemoteRuntime(address, DIGITS, 1, 8, cpu_only=False)

    def broken(run: EngineRun) -> None:
        raise RuntimeError("metrics are down")

    remote.observe_engine(broken)
    assert remote.runners[0](np.zeros((2, 28, 28, 1), np.uint8)).shape == (2, 10)
    assert "recording the engine's timing failed" in caplog.text
    remote.close()


def test_instances_of_one_file_share_the_engine_runtime(engine: tuple[str, object]) -> None:
    """Eight workers asking for the same model get one set of sessions, not eight."""
    address, _ = engine
    first = RemoteRuntime(address, DIGITS, 1, 16, cpu_only=False)
    second = RemoteRuntime(address, DIGITS, 1, 16, cpu_only=False)
    images = np.zeros((3, 28, 28, 1), np.uint8)
    np.testing.assert_array_equal(first.runners[0](images), second.runners[0](images))
    first.close()
    assert second.runners[0](images).shape == (3, 10)  # still loaded for the one still using it
    second.close()


def test_workers_sending_at_once_each_get_their_own_probabilities(engine: tuple[str, object]) -> None:
    """Eight workers' batches, joined in the engine where they overlap, come back to the worker that sent them."""
    address, _ = engine
    workers = [RemoteRuntime(address, DIGITS, 1, 32, cpu_only=False) for _ in range(8)]
    local = ModelRuntime(DIGITS, 1, 32, ProviderSelector(Device.CPU))
    rng = np.random.default_rng(1)
    batches = [[rng.integers(0, 256, (int(rng.integers(1, 9)), 28, 28, 1), np.uint8) for _ in range(20)]
               for _ in workers]  # fmt: skip
    with ThreadPoolExecutor(len(workers)) as pool:
        answers = list(pool.map(lambda w, b: [w.runners[0](images) for images in b], workers, batches))
    for sent, answered in zip(batches, answers, strict=True):
        for images, probabilities in zip(sent, answered, strict=True):
            np.testing.assert_allclose(probabilities, local.runners[0](images), atol=1e-5)
    for worker in workers:
        worker.close()


def test_a_model_the_engine_cannot_load_is_an_engine_error(engine: tuple[str, object], tmp_path: Path) -> None:
    address, _ = engine
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(EngineError, match=r"model\.onnx"):
        RemoteRuntime(address, broken, 1, 8, cpu_only=False)


def test_a_vanished_engine_fails_the_batch_with_a_reason(
    engine: tuple[str, multiprocessing.process.BaseProcess],
) -> None:
    address, process = engine
    remote = RemoteRuntime(address, DIGITS, 1, 8, cpu_only=False)
    process.kill()
    process.join()
    with pytest.raises(EngineError, match="the engine process went away"):
        remote.runners[0](np.zeros((2, 28, 28, 1), np.uint8))
    remote.close()


def test_a_model_with_its_own_gpu_settings_loads_through_the_engine(engine: tuple[str, object]) -> None:
    """CUDA options and FP16 travel in the handshake; on the CPU engine they change nothing in the answers."""
    address, _ = engine
    remote = RemoteRuntime(address, DIGITS, 1, 8, cpu_only=False, gpu=GpuOptions((("prefer_nhwc", "1"),), fp16=True))
    local = ModelRuntime(DIGITS, 1, 8, ProviderSelector(Device.CPU))
    images = np.random.default_rng(5).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(remote.runners[0](images), local.runners[0](images), atol=1e-6)
    assert remote.fp16 is False, "the CPU runs the FP32 file"
    remote.close()
