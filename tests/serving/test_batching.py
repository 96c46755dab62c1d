"""The dynamic batcher, with real blocking callables on a real thread pool."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from serving.batching import BatchPolicy, DynamicBatcher, RunBatch
from serving.errors import DeadlineExceeded, InvalidArgument, QueueFull, Unavailable

WAIT = 5.0  # seconds before a test that should pass at once gives up instead of hanging
DEADLINE_MESSAGE = r"^deadline exceeded: the request waited \d+\.\d ms in the queue$"
GRACE_MESSAGE = "shutting down: the request did not finish within the shutdown grace period"


def _images(*values: int) -> np.ndarray:
    """One 2x2x1 image per value, every pixel equal to it, so each row identifies itself."""
    return np.repeat(np.array(values, dtype=np.uint8), 4).reshape(len(values), 2, 2, 1)


def _flat(images: np.ndarray) -> np.ndarray:
    """What the fake model computes: each image's pixels as float32, one output row per image."""
    return images.reshape(len(images), -1).astype(np.float32)


def _values(start: int) -> Iterator[int]:
    """Distinct pixel values for the requests of one test."""
    yield from range(start, 256)


class FakeModel:
    """A blocking RunBatch that records what it ran; it can wait on a gate, sleep, meet a barrier or be poisoned."""

    def __init__(
        self,
        gate: threading.Event | None = None,
        sleep: float = 0.0,
        barrier: threading.Barrier | None = None,
        poison: int | None = None,
    ) -> None:
        self.gate = gate
        self.sleep = sleep
        self.barrier = barrier
        self.poison = poison
        self.batches: list[list[int]] = []  # the first pixel of each row, per execution
        self.entered = threading.Event()
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.batches.append(images[:, 0, 0, 0].tolist())
        try:
            self.entered.set()
            if self.gate is not None and not self.gate.wait(WAIT):
                raise TimeoutError("the test never opened the gate")
            if self.barrier is not None:
                self.barrier.wait()
            if self.sleep:
                time.sleep(self.sleep)
            if self.poison is not None and bool((images == self.poison).any()):
                raise ValueError(f"poisoned row {self.poison}")
            return _flat(images)
        finally:
            with self._lock:
                self.active -= 1

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    def seen(self) -> set[int]:
        return {value for batch in self.batches for value in batch}


class RecordingObserver:
    """Collects what the batcher reports."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.requests: list[tuple[int, int, int, bool]] = []

    def batch_done(self, batch_size: int, compute_ns: int) -> None:
        self.batches.append((batch_size, compute_ns))

    def request_done(self, images: int, queue_ns: int, total_ns: int, ok: bool) -> None:
        self.requests.append((images, queue_ns, total_ns, ok))


@contextlib.asynccontextmanager
async def _batcher(
    *instances: RunBatch, policy: BatchPolicy, observer: RecordingObserver | None = None
) -> AsyncIterator[DynamicBatcher]:
    """A started batcher on its own thread pool; closed afterwards, leaving no task and no waiting request."""
    executor = ThreadPoolExecutor(max_workers=len(instances))
    batcher = DynamicBatcher(instances, policy, executor, observer)
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.close(grace=WAIT)
        executor.shutdown(wait=True)
    assert batcher.queue_depth == 0
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop and the threads run until ``condition`` holds."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.001)


async def _check(batcher: DynamicBatcher, images: np.ndarray, deadline: float | None = None) -> None:
    """One request whose result must be exactly its own rows, in order."""
    result = await batcher.infer(images, deadline)
    np.testing.assert_array_equal(result, _flat(images))


@pytest.mark.asyncio
async def test_concurrent_single_images_share_executions() -> None:
    model = FakeModel(sleep=0.005)
    requests = [_images(value) for value in range(64)]

    async with _batcher(model, policy=BatchPolicy(max_batch_size=16, max_queue_delay=0.005)) as batcher:
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(_check(batcher, images) for images in requests))

    assert len(model.batches) < 64
    assert sorted(value for batch in model.batches for value in batch) == list(range(64))


@pytest.mark.asyncio
async def test_batches_never_exceed_max_batch_size() -> None:
    model = FakeModel(sleep=0.002)
    rng = np.random.default_rng(1)
    values = _values(0)
    requests = [_images(*(next(values) for _ in range(rng.integers(1, 5)))) for _ in range(40)]

    async with _batcher(model, policy=BatchPolicy(max_batch_size=5, max_queue_delay=0.002)) as batcher:
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(_check(batcher, images) for images in requests))

    assert max(model.sizes) <= 5
    assert sum(model.sizes) == sum(len(images) for images in requests)
    assert len(model.batches) < len(requests)


@pytest.mark.asyncio
async def test_a_preferred_size_closes_the_batch_without_waiting_for_the_delay() -> None:
    model = FakeModel()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay=60.0, preferred_batch_sizes=(4,))

    async with _batcher(model, policy=policy) as batcher:
        async with asyncio.timeout(WAIT):
            first = [asyncio.create_task(_check(batcher, _images(value))) for value in (1, 2)]
            await asyncio.sleep(0.01)  # the two wait in an open batch; the next two complete it
            await asyncio.gather(*first, _check(batcher, _images(3)), _check(batcher, _images(4)))

    assert model.batches == [[1, 2, 3, 4]]


@pytest.mark.asyncio
async def test_a_batch_short_of_every_preferred_size_waits_for_the_delay() -> None:
    model = FakeModel()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay=0.02, preferred_batch_sizes=(4, 8))

    async with _batcher(model, policy=policy) as batcher:
        await asyncio.gather(*(_check(batcher, _images(value)) for value in (1, 2, 3)))

    assert model.batches == [[1, 2, 3]]


@pytest.mark.asyncio
async def test_delay_zero_runs_each_lone_request_at_once() -> None:
    model = FakeModel()

    async with _batcher(model, policy=BatchPolicy(max_batch_size=8, max_queue_delay=0.0)) as batcher:
        for value in range(3):
            await _check(batcher, _images(value))

    assert model.batches == [[0], [1], [2]]


@pytest.mark.asyncio
async def test_delay_zero_batches_requests_arriving_together() -> None:
    model = FakeModel()

    async with _batcher(model, policy=BatchPolicy(max_batch_size=2, max_queue_delay=0.0)) as batcher:
        await asyncio.gather(*(_check(batcher, _images(value)) for value in (1, 2, 3)))

    assert model.batches == [[1, 2], [3]]


@pytest.mark.asyncio
async def test_delay_zero_batches_whatever_waited_for_a_busy_instance() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async with _batcher(model, policy=BatchPolicy(max_batch_size=8, max_queue_delay=0.0)) as batcher:
        running = asyncio.create_task(_check(batcher, _images(0)))
        await _until(model.entered.is_set)
        waiting = [asyncio.create_task(_check(batcher, _images(value))) for value in range(1, 6)]
        await _until(lambda: batcher.queue_depth == 5)
        gate.set()
        await asyncio.gather(running, *waiting)

    assert model.batches == [[0], [1, 2, 3, 4, 5]]


@pytest.mark.asyncio
@pytest.mark.parametrize("instances", [1, 2])
async def test_a_request_larger_than_max_batch_size_comes_back_whole_and_in_order(instances: int) -> None:
    models = [FakeModel(sleep=0.002) for _ in range(instances)]
    images = _images(*range(10))

    async with _batcher(*models, policy=BatchPolicy(max_batch_size=4, max_queue_delay=0.0)) as batcher:
        await _check(batcher, images)

    assert sorted(size for model in models for size in model.sizes) == [2, 4, 4]


@pytest.mark.asyncio
async def test_mixed_request_sizes_keep_each_callers_rows_in_order() -> None:
    models = [FakeModel(sleep=0.001), FakeModel(sleep=0.001)]
    rng = np.random.default_rng(7)
    values = _values(0)
    requests = [_images(*(next(values) for _ in range(rng.integers(1, 10)))) for _ in range(40)]
    assert sum(len(images) for images in requests) <= 256

    async with _batcher(*models, policy=BatchPolicy(max_batch_size=5, max_queue_delay=0.001)) as batcher:
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(_check(batcher, images) for images in requests))

    assert max(size for model in models for size in model.sizes) <= 5


@pytest.mark.asyncio
async def test_a_full_queue_rejects_at_once_and_the_rest_are_served() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    policy = BatchPolicy(max_batch_size=8, max_queue_delay=0.0, max_queue_size=2)

    async with _batcher(model, policy=policy) as batcher:
        running = asyncio.create_task(_check(batcher, _images(0)))
        await _until(model.entered.is_set)
        waiting = [asyncio.create_task(_check(batcher, _images(value))) for value in (1, 2)]
        await _until(lambda: batcher.queue_depth == 2)

        with pytest.raises(QueueFull, match=r"^model queue is full \(max_queue_size 2\); retry later$") as raised:
            await batcher.infer(_images(3))

        assert raised.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.set()
        await asyncio.gather(running, *waiting)

    assert 3 not in model.seen()


@pytest.mark.asyncio
async def test_a_request_past_its_deadline_is_dropped_before_it_runs() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async with _batcher(model, policy=BatchPolicy(max_batch_size=8, max_queue_delay=0.0)) as batcher:
        loop = asyncio.get_running_loop()
        with pytest.raises(DeadlineExceeded, match=DEADLINE_MESSAGE) as raised:
            await batcher.infer(_images(1), deadline=loop.time() - 1.0)
        assert raised.value.status == grpc.StatusCode.DEADLINE_EXCEEDED

        running = asyncio.create_task(_check(batcher, _images(2)))
        await _until(model.entered.is_set)
        soon = loop.time() + 0.02
        expiring = asyncio.create_task(batcher.infer(_images(3), deadline=soon))
        patient = asyncio.create_task(_check(batcher, _images(4), deadline=loop.time() + 60.0))
        await _until(lambda: loop.time() > soon)
        gate.set()
        await asyncio.gather(running, patient)
        with pytest.raises(DeadlineExceeded, match=DEADLINE_MESSAGE):
            await expiring

    assert model.batches == [[2], [4]]


@pytest.mark.asyncio
async def test_a_cancelled_caller_is_dropped_and_not_kept() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    observer = RecordingObserver()

    async with _batcher(model, policy=BatchPolicy(max_batch_size=8, max_queue_delay=0.0), observer=observer) as batcher:
        running = asyncio.create_task(_check(batcher, _images(1)))
        await _until(model.entered.is_set)
        abandoned_images = _images(2)
        abandoned_ref = weakref.ref(abandoned_images)
        abandoned = asyncio.create_task(batcher.infer(abandoned_images))
        del abandoned_images
        kept = asyncio.create_task(_check(batcher, _images(3)))
        await _until(lambda: batcher.queue_depth == 2)

        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        assert batcher.queue_depth == 1
        gate.set()
        await asyncio.gather(running, kept)
        del abandoned
        gc.collect()
        assert abandoned_ref() is None  # the batcher, still running, holds nothing of the abandoned call

    assert model.batches == [[1], [3]]
    assert sorted(ok for _, _, _, ok in observer.requests) == [False, True, True]


@pytest.mark.asyncio
async def test_a_caller_cancelled_before_its_batch_starts_frees_the_instance() -> None:
    model = FakeModel()

    async with _batcher(model, policy=BatchPolicy(max_batch_size=4, max_queue_delay=0.0)) as batcher:
        abandoned = asyncio.create_task(batcher.infer(_images(1)))
        await asyncio.sleep(0)  # its request is taken for a batch that starts at the end of this loop iteration
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        await _check(batcher, _images(2))

    assert model.batches == [[2]]


@pytest.mark.asyncio
async def test_a_shut_down_executor_makes_requests_unavailable() -> None:
    executor = ThreadPoolExecutor(max_workers=1)
    batcher = DynamicBatcher([FakeModel()], BatchPolicy(max_batch_size=4, max_queue_delay=0.0), executor)
    batcher.start()
    executor.shutdown()

    with pytest.raises(Unavailable, match=r"^the model cannot run: cannot schedule new futures after shutdown$"):
        await batcher.infer(_images(1))
    await batcher.close(grace=WAIT)


@pytest.mark.asyncio
async def test_a_poisoned_request_fails_alone_and_its_batch_mates_succeed() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate, poison=99)
    observer = RecordingObserver()

    async with _batcher(model, policy=BatchPolicy(max_batch_size=8, max_queue_delay=0.0), observer=observer) as batcher:
        running = asyncio.create_task(_check(batcher, _images(0)))
        await _until(model.entered.is_set)
        mates = [asyncio.create_task(_check(batcher, images)) for images in (_images(1), _images(2, 3))]
        poisoned = asyncio.create_task(batcher.infer(_images(4, 99)))
        last = asyncio.create_task(_check(batcher, _images(5)))
        await _until(lambda: batcher.queue_depth == 4)
        gate.set()
        await asyncio.gather(running, *mates, last)
        with pytest.raises(ValueError, match=r"^poisoned row 99$"):
            await poisoned

    assert model.batches == [[0], [1, 2, 3, 4, 99, 5], [1], [2, 3], [4, 99], [5]]
    assert sorted(size for size, _ in observer.batches) == [1, 1, 1, 2]
    assert sum(size for size, _ in observer.batches) == sum(images for images, _, _, ok in observer.requests if ok)


@pytest.mark.asyncio
async def test_a_failing_lone_request_is_not_run_twice() -> None:
    model = FakeModel(poison=7)

    async with _batcher(model, policy=BatchPolicy(max_batch_size=8, max_queue_delay=0.0)) as batcher:
        with pytest.raises(ValueError, match="poisoned"):
            await batcher.infer(_images(6, 7))
        await _check(batcher, _images(8))

    assert model.batches == [[6, 7], [8]]


@pytest.mark.asyncio
async def test_two_instances_run_two_batches_at_the_same_time() -> None:
    barrier = threading.Barrier(2, timeout=WAIT)  # broken unless both calls are inside at once
    models = [FakeModel(barrier=barrier), FakeModel(barrier=barrier)]

    async with _batcher(*models, policy=BatchPolicy(max_batch_size=1, max_queue_delay=0.0)) as batcher:
        await asyncio.gather(_check(batcher, _images(1)), _check(batcher, _images(2)))

    assert sorted(models[0].batches + models[1].batches) == [[1], [2]]


@pytest.mark.asyncio
async def test_an_instance_never_runs_two_batches_at_once() -> None:
    models = [FakeModel(sleep=0.002), FakeModel(sleep=0.002)]
    requests = [_images(value) for value in range(60)]

    async with _batcher(*models, policy=BatchPolicy(max_batch_size=3, max_queue_delay=0.0)) as batcher:
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(_check(batcher, images) for images in requests))

    assert [model.most_active for model in models] == [1, 1]
    assert all(model.batches for model in models)


@pytest.mark.asyncio
async def test_the_observer_sees_every_execution_and_every_call() -> None:
    models = [FakeModel(sleep=0.001), FakeModel(sleep=0.001)]
    observer = RecordingObserver()
    rng = np.random.default_rng(3)
    values = _values(0)
    requests = [_images(*(next(values) for _ in range(rng.integers(1, 8)))) for _ in range(30)]
    policy = BatchPolicy(max_batch_size=6, max_queue_delay=0.001)

    async with _batcher(*models, policy=policy, observer=observer) as batcher:
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(_check(batcher, images) for images in requests))
        with pytest.raises(DeadlineExceeded):
            await batcher.infer(_images(250), deadline=0.0)

    executed = [size for model in models for size in model.sizes]
    assert sorted(size for size, _ in observer.batches) == sorted(executed)
    assert sum(executed) == sum(len(images) for images in requests)
    assert all(compute_ns > 0 for _, compute_ns in observer.batches)
    assert len(observer.requests) == len(requests) + 1
    assert [ok for _, _, _, ok in observer.requests].count(False) == 1
    assert sorted(images for images, _, _, ok in observer.requests if ok) == sorted(map(len, requests))
    assert all(0 <= queue_ns <= total_ns for _, queue_ns, total_ns, _ in observer.requests)


@pytest.mark.asyncio
async def test_close_drains_queued_work_then_rejects_new_work() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async with _batcher(model, policy=BatchPolicy(max_batch_size=2, max_queue_delay=0.0)) as batcher:
        calls = [asyncio.create_task(_check(batcher, _images(0)))]
        await _until(model.entered.is_set)
        calls += [asyncio.create_task(_check(batcher, _images(value))) for value in range(1, 5)]
        await _until(lambda: batcher.queue_depth == 4)
        closing = [asyncio.create_task(batcher.close(grace=WAIT)) for _ in range(2)]
        await asyncio.sleep(0)

        with pytest.raises(Unavailable, match=r"^shutting down; not accepting new requests$") as raised:
            await batcher.infer(_images(9))
        assert raised.value.status == grpc.StatusCode.UNAVAILABLE
        assert not any(close.done() for close in closing)  # the second close waits for the first
        gate.set()
        await asyncio.gather(*closing, *calls)
        assert batcher.queue_depth == 0
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.infer(_images(9))

    assert model.batches == [[0], [1, 2], [3, 4]]


@pytest.mark.asyncio
async def test_close_runs_a_batch_still_waiting_for_its_delay_at_once() -> None:
    model = FakeModel()

    async with _batcher(model, policy=BatchPolicy(max_batch_size=8, max_queue_delay=60.0)) as batcher:
        calls = [asyncio.create_task(_check(batcher, _images(value))) for value in (1, 2)]
        await _until(lambda: batcher.queue_depth == 2)
        async with asyncio.timeout(WAIT):
            await batcher.close(grace=WAIT)
            await asyncio.gather(*calls)

    assert model.batches == [[1, 2]]


@pytest.mark.asyncio
async def test_close_cancels_a_stuck_batch_after_the_grace_period() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async with _batcher(model, policy=BatchPolicy(max_batch_size=1, max_queue_delay=0.0)) as batcher:
        stuck = asyncio.create_task(batcher.infer(_images(1)))
        await _until(model.entered.is_set)
        queued = asyncio.create_task(batcher.infer(_images(2)))
        await _until(lambda: batcher.queue_depth == 1)

        await batcher.close(grace=0.05)

        for call in (stuck, queued):
            with pytest.raises(Unavailable, match=f"^{re.escape(GRACE_MESSAGE)}$"):
                await call
        assert batcher.queue_depth == 0
        gate.set()  # let the abandoned thread finish so the pool can shut down

    assert model.batches == [[1]]


@pytest.mark.asyncio
async def test_requests_before_start_and_empty_requests_are_refused() -> None:
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = DynamicBatcher([FakeModel()], BatchPolicy(max_batch_size=4, max_queue_delay=0.0), executor)
        with pytest.raises(Unavailable, match=r"^the model is not ready$"):
            await batcher.infer(_images(1))
        batcher.start()
        with pytest.raises(InvalidArgument, match=r"^a request needs at least one image$"):
            await batcher.infer(_images())
        await batcher.close(grace=WAIT)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0, "max_queue_delay": 0.0}, "max_batch_size must be at least 1"),
        ({"max_batch_size": 4, "max_queue_delay": -1.0}, "max_queue_delay must not be negative"),
        ({"max_batch_size": 4, "max_queue_delay": 0.0, "preferred_batch_sizes": (8,)}, "preferred batch size 8"),
        ({"max_batch_size": 4, "max_queue_delay": 0.0, "max_queue_size": -1}, "max_queue_size must not be negative"),
    ],
)
def test_policy_rejects_impossible_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchPolicy(**kwargs)  # type: ignore[arg-type]
