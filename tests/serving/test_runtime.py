"""BucketRunner: padded runs give each image the answer it gets alone, without copying where it need not; and
the CPU fallback's sessions."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serving.cores import usable_cores
from serving.page_locked import lock_where_possible
from serving.runtime import BucketRunner, Device, ModelRuntime, ProviderSelector, batch_buckets

DIGITS = Path("models/digits/1/model.onnx")


def _padding_runner(max_batch_size: int) -> tuple[BucketRunner, ModelRuntime]:
    """A runner that pads to buckets as it does on CUDA, over real CPU sessions, and the CPU runtime itself."""
    runtime = ModelRuntime(DIGITS, 1, max_batch_size, ProviderSelector(Device.CPU))
    session = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    sessions = dict.fromkeys(runtime.buckets, session)
    return BucketRunner(sessions, runtime.input, runtime.output, max_batch_size, pad=True), runtime


def _digits(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, 28, 28, 1), dtype=np.uint8)


def test_on_the_cpu_a_batch_runs_at_its_own_size() -> None:
    runner = ModelRuntime(DIGITS, 1, 16, ProviderSelector(Device.CPU)).runners[0]
    assert [runner.rows_read(count) for count in (1, 3, 5, 16)] == [1, 3, 5, 16]


def test_a_padding_runner_reads_the_next_bucket_and_answers_each_image_as_alone() -> None:
    runner, unpadded = _padding_runner(16)
    assert [runner.rows_read(count) for count in (1, 3, 5, 9, 16)] == [1, 4, 8, 16, 16]
    for rows, seed in ((3, 1), (5, 2), (2, 3)):  # the reused padding buffer still holds the previous batch
        images = _digits(rows, seed)
        outputs = runner(images)
        assert outputs.shape == (rows, 10)
        np.testing.assert_allclose(outputs, unpadded.runners[0](images), atol=1e-6)


def test_run_rows_reads_a_full_buffer_in_place_whatever_its_padding_rows_hold() -> None:
    runner, unpadded = _padding_runner(16)
    buffer = _digits(16, 4)  # rows 5..7 are someone else's images: padding for a batch of 5
    np.testing.assert_allclose(runner.run_rows(buffer, 5), unpadded.runners[0](buffer[:5]), atol=1e-6)


def test_a_cpu_fallback_shares_the_cores_from_the_first_model_on() -> None:
    """Under ``auto`` the first session finds CUDA missing; every session then splits the cores by instance."""
    loaded = ModelRuntime(DIGITS, 2, 4, ProviderSelector(Device.AUTO))
    if loaded.providers != ["CPUExecutionProvider"]:
        pytest.skip("CUDA runs here: there is no fallback to see")
    threads = {sessions[1].get_session_options().intra_op_num_threads for sessions in loaded.instances}
    assert threads == {max(1, usable_cores() // 2)}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_cpu_sessions_use_the_cores_the_process_may_run_on_not_the_machines() -> None:
    """Pinned to one core (as by taskset or a container's cpuset), a model gets one intra-op thread, not one per
    core of the machine. (Linux pins the calling thread here, the one that loads the model and asks.)"""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        loaded = ModelRuntime(DIGITS, 1, 4, ProviderSelector(Device.CPU))
    finally:
        os.sched_setaffinity(0, allowed)
    assert loaded.instances[0][1].get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize(
    ("max_batch_size", "buckets"),
    [(4, (1, 2, 4)), (16, (1, 2, 4, 8, 16)), (100, (1, 2, 4, 8, 16, 32, 64, 96, 100)),
     (128, (1, 2, 4, 8, 16, 32, 64, 96, 128)),
     (1024, (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024))],
)  # fmt: skip
def test_buckets_are_powers_of_two_and_from_96_halfway_sizes(max_batch_size: int, buckets: tuple[int, ...]) -> None:
    """A run of 70 images goes in a session for 96, not 128: padding stays under a third of a large session."""
    assert batch_buckets(max_batch_size) == buckets


def test_memory_cuda_cannot_page_lock_is_used_as_it_is_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Page-locking only speeds copies to a GPU: where CUDA cannot do it (no CUDA runtime, no GPU) the buffer
    is used as it is, and the log says why; where it can, it is locked and released with the stack."""
    buffer = np.zeros((4, 8), np.uint8)
    with ExitStack() as stack:
        locked = lock_where_possible(stack, buffer, "a test buffer")
    if locked:
        assert "stays pageable" not in caplog.text
    else:
        assert "a test buffer stays pageable, so copies from it to the GPU are staged" in caplog.text
    buffer[:] = 1  # still ordinary memory, whichever happened
