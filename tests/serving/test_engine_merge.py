"""BatchMerger: batches that arrive while a run is under way go together, in order, within the max batch size."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest

from serving.engine_merge import BatchMerger, EngineRun


class GatedModel:
    """A model whose first run waits for ``release``, so the test can queue batches behind it; records runs."""

    def __init__(self, fail_when_rows: int | None = None) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.runs: list[int] = []
        self.fail_when_rows = fail_when_rows

    def run_rows(self, buffer: np.ndarray, count: int) -> np.ndarray:
        images = buffer[:count]
        self.started.set()
        self.release.wait(10)
        self.runs.append(len(images))
        if len(images) == self.fail_when_rows:
            raise ValueError(f"cannot run {len(images)} rows")
        return images.reshape(len(images), -1).astype(np.float32) * 2


class Flatten:
    """A model whose outputs are its input pixels, so each batch's answer shows whose rows it got."""

    def run_rows(self, buffer: np.ndarray, count: int) -> np.ndarray:
        return buffer[:count].reshape(count, -1).astype(np.float32)


def _images(rows: int, value: int) -> np.ndarray:
    return np.full((rows, 2, 2), value, np.uint8) + np.arange(rows, dtype=np.uint8)[:, None, None]


def _submit(merger: BatchMerger, images: np.ndarray, results: dict[int, object]) -> threading.Thread:
    def send() -> None:
        outputs = np.zeros((len(images), 4), np.float32)
        try:
            merger.run(images, len(images), outputs)
        except ValueError as exc:
            results[int(images[0, 0, 0])] = exc
        else:
            results[int(images[0, 0, 0])] = outputs

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _waiting_is(merger: BatchMerger, count: int) -> bool:
    return len(merger._waiting) == count


def _queue_behind_a_running_batch(merger: BatchMerger, model: GatedModel, rows: list[int]) -> dict[int, object]:
    """Start a batch of ``rows[0]`` that blocks in the model, queue the others behind it in order, release."""
    results: dict[int, object] = {}
    threads = [_submit(merger, _images(rows[0], 100), results)]
    assert model.started.wait(10)
    for index, count in enumerate(rows[1:], start=1):
        threads.append(_submit(merger, _images(count, 100 + 10 * index), results))
        _wait_for(partial(_waiting_is, merger, index))  # queued in this order, behind the run
    model.release.set()
    for thread in threads:
        thread.join(10)
    return results


def test_a_lone_batch_runs_at_once_on_the_callers_thread() -> None:
    class Model:
        def run_rows(self, buffer: np.ndarray, count: int) -> np.ndarray:
            callers.append(threading.current_thread().name)
            buffers.append(buffer)
            return buffer[:count].reshape(count, -1).astype(np.float32)

    callers: list[str] = []
    buffers: list[np.ndarray] = []
    images = _images(8, 7)
    outputs = np.zeros((3, 4), np.float32)
    BatchMerger(Model(), 8).run(images, 3, outputs)
    np.testing.assert_array_equal(outputs, images[:3].reshape(3, -1))
    assert callers == [threading.current_thread().name]
    assert buffers[0] is images, "read in place from the caller's buffer, not copied"


def test_batches_that_wait_behind_a_run_go_together_and_each_gets_its_own_rows() -> None:
    model = GatedModel()
    results = _queue_behind_a_running_batch(BatchMerger(model, 16), model, [2, 3, 4])
    assert model.runs == [2, 7], "the two waiting batches ran as one batch of 3 + 4"
    for first, rows in ((100, 2), (110, 3), (120, 4)):
        np.testing.assert_array_equal(results[first], _images(rows, first).reshape(rows, -1).astype(np.float32) * 2)


def test_a_batch_that_does_not_fit_whole_is_split_to_fill_the_run() -> None:
    """Runs are padded to their bucket on CUDA, so every run is filled: 5 + 3 of the 4, then its last 1 + 3."""
    model = GatedModel()
    results = _queue_behind_a_running_batch(BatchMerger(model, 8), model, [2, 5, 4, 3])
    assert model.runs == [2, 8, 4]
    for first, rows in ((100, 2), (110, 5), (120, 4), (130, 3)):
        np.testing.assert_array_equal(results[first], _images(rows, first).reshape(rows, -1).astype(np.float32) * 2)


def test_a_split_batch_fails_if_either_of_its_runs_fails() -> None:
    model = GatedModel(fail_when_rows=8)
    results = _queue_behind_a_running_batch(BatchMerger(model, 8), model, [2, 5, 4, 3])
    assert model.runs == [2, 8, 4]
    assert isinstance(results[100], np.ndarray)
    assert isinstance(results[130], np.ndarray), "the run after the failed one works"
    for first in (110, 120):
        assert str(results[first]) == "cannot run 8 rows"


def test_a_failed_run_fails_each_of_its_batches_and_the_next_run_works() -> None:
    model = GatedModel(fail_when_rows=7)
    merger = BatchMerger(model, 16)
    results = _queue_behind_a_running_batch(merger, model, [2, 3, 4])
    assert isinstance(results[100], np.ndarray)
    for first in (110, 120):
        error = results[first]
        assert isinstance(error, ValueError)
        assert str(error) == "cannot run 7 rows"
    outputs = np.zeros((1, 4), np.float32)
    merger.run(_images(1, 9), 1, outputs)
    np.testing.assert_array_equal(outputs, _images(1, 9).reshape(1, -1) * 2)


@pytest.mark.parametrize("max_batch_size", [64, 9])
def test_many_threads_at_once_each_get_their_own_answer(max_batch_size: int) -> None:
    """No batch is lost, answered twice or given another's rows when every thread sends at once, many times
    (with a max of 9, most runs split a batch)."""
    merger = BatchMerger(Flatten(), max_batch_size)
    failures: list[str] = []

    def send(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(300):
            images = rng.integers(0, 256, (int(rng.integers(1, 9)), 2, 2), dtype=np.uint8)
            outputs = np.zeros((len(images), 4), np.float32)
            merger.run(images, len(images), outputs)
            if not np.array_equal(outputs, images.reshape(len(images), -1)):
                failures.append(f"thread {seed}")

    workers = [threading.Thread(target=send, args=(seed,)) for seed in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not any(worker.is_alive() for worker in workers), "a batch was never answered"
    assert failures == []


def test_each_batch_learns_its_wait_for_the_instance_and_the_run_it_went_into() -> None:
    """The first batch runs at once; the two queued behind it wait until it ends, then share one run of 7."""
    model = GatedModel()
    merger = BatchMerger(model, 16)
    timings: dict[int, EngineRun] = {}

    def send(images: np.ndarray) -> threading.Thread:
        def run() -> None:
            timings[int(images[0, 0, 0])] = merger.run(images, len(images), np.zeros((len(images), 4), np.float32))

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    threads = [send(_images(2, 100))]
    assert model.started.wait(10)
    threads += [send(_images(3, 110)), send(_images(4, 120))]
    _wait_for(partial(_waiting_is, merger, 2))
    held_ns = 50_000_000
    time.sleep(held_ns / 1e9)
    model.release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive(), "a batch never came back"
    first, second, third = timings[100], timings[110], timings[120]
    assert first.run_rows == 2
    assert first.run_ns >= held_ns, "the first run lasted while the model was held"
    assert first.wait_ns < held_ns, "the first batch did not wait for anything"
    assert second.run_rows == third.run_rows == 7
    assert second.run_ns == third.run_ns, "one joined run, reported to both"
    assert second.wait_ns >= held_ns
    assert third.wait_ns >= held_ns


def test_a_split_batch_waits_for_its_first_run_and_is_timed_to_the_end_of_its_last() -> None:
    """Queued 5 and 4 behind a held run, max 8: the 4 goes 3 into the run of 8 and 1 into the next, of 1."""
    model = GatedModel()
    merger = BatchMerger(model, 8)
    timings: dict[int, EngineRun] = {}

    def send(images: np.ndarray) -> threading.Thread:
        def run() -> None:
            timings[int(images[0, 0, 0])] = merger.run(images, len(images), np.zeros((len(images), 4), np.float32))

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    threads = [send(_images(2, 100))]
    assert model.started.wait(10)
    threads += [send(_images(5, 110))]
    _wait_for(partial(_waiting_is, merger, 1))
    threads += [send(_images(4, 120))]
    _wait_for(partial(_waiting_is, merger, 2))
    model.release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive(), "a batch never came back"
    assert model.runs == [2, 8, 1]
    whole, split = timings[110], timings[120]
    assert whole.run_rows == split.run_rows == 8, "both are reported with the run that took their first rows"
    assert split.wait_ns <= whole.wait_ns, "arrived later, started in the same run"
    assert split.run_ns > whole.run_ns, "the split batch also waited for the run of its last row"
