"""BatchMerger: batches that arrive while a run is under way go together, in order, within the max batch size."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import numpy as np
import pytest

from serving.engine_merge import BatchMerger, EngineRun

Result = TypeVar("Result")


class Staged:
    """What each fake instance shares with ``BucketRunner``: the staging buffer the merger joins batches in."""

    def __init__(self, shape: tuple[int, ...] = (16, 2, 2), dtype: type = np.uint8) -> None:
        self.staged: np.ndarray = np.zeros(shape, dtype)

    def staging(self) -> np.ndarray:
        return self.staged


class GatedModel(Staged):
    """A model whose first run waits for ``release``, so the test can queue batches behind it; records runs."""

    def __init__(self, fail_when_rows: int | None = None) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started = threading.Event()
        self.runs: list[int] = []
        self.read_staging: list[bool] = []  # per run: read from the staging buffer
        self.fail_when_rows = fail_when_rows

    def run_rows(self, buffer: np.ndarray, count: int) -> np.ndarray:
        images = buffer[:count]
        self.started.set()
        self.release.wait(10)
        self.runs.append(len(images))
        self.read_staging.append(buffer is self.staged)
        if len(images) == self.fail_when_rows:
            raise ValueError(f"cannot run {len(images)} rows")
        return images.reshape(len(images), -1).astype(np.float32) * 2


class Flatten(Staged):
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


def _submit_timed(merger: BatchMerger, images: np.ndarray, timings: dict[int, EngineRun]) -> threading.Thread:
    """Run ``images`` on a thread of their own; their timing goes into ``timings`` under their first pixel."""

    def send() -> None:
        timings[int(images[0, 0, 0])] = merger.run(images, len(images), np.zeros((len(images), 4), np.float32))

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


def _queue_behind_a_running_batch(
    merger: BatchMerger,
    model: GatedModel,
    rows: list[int],
    submit: Callable[[BatchMerger, np.ndarray, dict[int, Result]], threading.Thread],
    held_s: float = 0.0,
) -> dict[int, Result]:
    """Start a batch of ``rows[0]`` that blocks in the model, queue the others behind it in order (first pixels
    100, 110, ...), hold the model ``held_s`` longer, release; each batch's result by its first pixel."""
    results: dict[int, Result] = {}
    threads = [submit(merger, _images(rows[0], 100), results)]
    assert model.started.wait(10)
    for index, count in enumerate(rows[1:], start=1):
        threads.append(submit(merger, _images(count, 100 + 10 * index), results))
        _wait_for(partial(_waiting_is, merger, index))  # queued in this order, behind the run
    time.sleep(held_s)
    model.release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive(), "a batch never came back"
    return results


def test_a_lone_batch_runs_at_once_on_the_callers_thread() -> None:
    class Model(Staged):
        def run_rows(self, buffer: np.ndarray, count: int) -> np.ndarray:
            callers.append(threading.current_thread().name)
            buffers.append(buffer)
            return buffer[:count].reshape(count, -1).astype(np.float32)

    callers: list[str] = []
    buffers: list[np.ndarray] = []
    images = _images(8, 7)
    outputs = np.zeros((3, 4), np.float32)
    BatchMerger([Model()], 8).run(images, 3, outputs)
    np.testing.assert_array_equal(outputs, images[:3].reshape(3, -1))
    assert callers == [threading.current_thread().name]
    assert buffers[0] is images, "read in place from the caller's buffer, not copied"


def test_batches_that_wait_behind_a_run_go_together_and_each_gets_its_own_rows() -> None:
    model = GatedModel()
    results = _queue_behind_a_running_batch(BatchMerger([model], 16), model, [2, 3, 4], _submit)
    assert model.runs == [2, 7], "the two waiting batches ran as one batch of 3 + 4"
    assert model.read_staging == [False, True], "the lone batch read in place, the joined ones from staging"
    for first, rows in ((100, 2), (110, 3), (120, 4)):
        np.testing.assert_array_equal(results[first], _images(rows, first).reshape(rows, -1).astype(np.float32) * 2)


def test_a_batch_that_does_not_fit_whole_is_split_to_fill_the_run() -> None:
    """Runs are padded to their bucket on CUDA, so every run is filled: 5 + 3 of the 4, then its last 1 + 3."""
    model = GatedModel()
    results = _queue_behind_a_running_batch(BatchMerger([model], 8), model, [2, 5, 4, 3], _submit)
    assert model.runs == [2, 8, 4]
    for first, rows in ((100, 2), (110, 5), (120, 4), (130, 3)):
        np.testing.assert_array_equal(results[first], _images(rows, first).reshape(rows, -1).astype(np.float32) * 2)


@pytest.mark.parametrize(
    ("failing_run", "runs", "failed"),
    [(8, [2, 8, 3], (110, 120)), (4, [2, 8, 4], (120, 130))],
    ids=["first-part", "last-part"],
)
def test_a_split_batch_fails_if_either_of_its_runs_fails(
    failing_run: int, runs: list[int], failed: tuple[int, ...]
) -> None:
    """Queued 5, 4, 3 behind a run of 2 with max 8: the 4 goes 3 + 1. If its first run fails, its last row
    is not run at all (the answer is already an error); if its second fails, its first part's answers go."""
    model = GatedModel(fail_when_rows=failing_run)
    results = _queue_behind_a_running_batch(BatchMerger([model], 8), model, [2, 5, 4, 3], _submit)
    assert model.runs == runs
    for first in (100, 110, 120, 130):
        if first in failed:
            assert str(results[first]) == f"cannot run {failing_run} rows"
        else:
            assert isinstance(results[first], np.ndarray)


@pytest.mark.parametrize("rows", [0, 9])
def test_a_batch_outside_one_to_the_max_is_refused_before_it_joins_a_run(rows: int) -> None:
    with pytest.raises(ValueError, match=f"a batch of {rows} images; this model runs 1 to 8"):
        BatchMerger([Flatten()], 8).run(_images(9, 1), rows, np.zeros((9, 4), np.float32))


def test_a_failed_run_fails_each_of_its_batches_and_the_next_run_works() -> None:
    model = GatedModel(fail_when_rows=7)
    merger = BatchMerger([model], 16)
    results = _queue_behind_a_running_batch(merger, model, [2, 3, 4], _submit)
    assert isinstance(results[100], np.ndarray)
    for first in (110, 120):
        error = results[first]
        assert isinstance(error, ValueError)
        assert str(error) == "cannot run 7 rows"
    outputs = np.zeros((1, 4), np.float32)
    merger.run(_images(1, 9), 1, outputs)
    np.testing.assert_array_equal(outputs, _images(1, 9).reshape(1, -1) * 2)


def test_each_batch_learns_its_wait_for_the_instance_and_the_run_it_went_into() -> None:
    """The first batch runs at once; the two queued behind it wait until it ends, then share one run of 7."""
    model = GatedModel()
    held_ns = 50_000_000
    timings = _queue_behind_a_running_batch(BatchMerger([model], 16), model, [2, 3, 4], _submit_timed, held_ns / 1e9)
    first, second, third = timings[100], timings[110], timings[120]
    assert first.run_rows == 2
    assert first.infer_ns >= held_ns, "the model was held inside its own part of the run"
    assert first.run_ns >= first.infer_ns, "the run holds the model's part and the engine's copying around it"
    assert first.wait_ns < held_ns, "the first batch did not wait for anything"
    assert second.run_rows == third.run_rows == 7
    assert (second.run_ns, second.infer_ns) == (third.run_ns, third.infer_ns), "one joined run, reported to both"
    assert 0 < second.infer_ns <= second.run_ns
    assert second.wait_ns >= held_ns
    assert third.wait_ns >= held_ns


def test_the_engines_joining_counts_in_the_run_but_not_in_the_models_part() -> None:
    """The two batches queued behind a held run are joined before their run; a join held 20 ms shows in
    ``run_ns`` and not in ``infer_ns``, so the two tell the model's time from the engine's copying."""
    join_ns = 20_000_000

    class SlowJoin(BatchMerger):
        def _join(self, instance: int, parts: list, rows: int) -> np.ndarray:
            time.sleep(join_ns / 1e9)
            return super()._join(instance, parts, rows)

    model = GatedModel()
    joined = _queue_behind_a_running_batch(SlowJoin([model], 16), model, [2, 3, 4], _submit_timed)[110]
    assert joined.run_rows == 7
    assert joined.run_ns - joined.infer_ns >= join_ns, "the join is the engine's time, not the model's"
    assert joined.infer_ns > 0


def test_a_split_batch_is_timed_by_the_run_of_its_last_rows() -> None:
    """Queued 5 and 4 behind a held run, max 8: the 4 goes 3 into the run of 8 and 1 into the next, of 1;
    that last run answers it, so its wait covers the run of 8 and its run is the run of 1."""
    model = GatedModel()
    timings = _queue_behind_a_running_batch(BatchMerger([model], 8), model, [2, 5, 4], _submit_timed)
    assert model.runs == [2, 8, 1]
    whole, split = timings[110], timings[120]
    assert (whole.run_rows, split.run_rows) == (8, 1)
    assert split.wait_ns >= whole.run_ns, "queued before the run of 8 began, the split batch waited through it"
    assert 0 < split.infer_ns <= split.run_ns, "the model's part of the run of 1"


class CheckedModel(Staged):
    """Outputs its input; fails some runs at random; records every row it ran and any overlapping runs."""

    def __init__(self, max_rows: int, fail_share: float, seed: int, pause: float = 0.0) -> None:
        super().__init__((max_rows, 3), np.uint16)
        self.max_rows = max_rows
        self.pause = pause  # up to this many seconds per run, at random, so that runs on several instances overlap
        self.fail_share = fail_share
        self.rng = np.random.default_rng(seed)
        self.running = threading.Lock()
        self.ran: list[tuple[int, int, int]] = []  # (thread, batch, row) of every row run
        self.failed: set[tuple[int, int]] = set()  # (thread, batch) with a row in a failed run
        self.problems: list[str] = []

    def run_rows(self, buffer: np.ndarray, count: int) -> np.ndarray:
        if not self.running.acquire(blocking=False):
            self.problems.append("two runs at once on one instance")
            self.running.acquire()
        try:
            if count > self.max_rows or len(buffer) < count:
                self.problems.append(f"a run of {count} rows from a buffer of {len(buffer)}")
            rows = buffer[:count]
            self.ran += [(int(row[0]), int(row[1]), int(row[2])) for row in rows]
            time.sleep(self.pause * self.rng.random())
            if self.rng.random() < self.fail_share:
                self.failed.update((int(row[0]), int(row[1])) for row in rows)
                raise ValueError("failed run")
            return rows.astype(np.float32)
        finally:
            self.running.release()


@pytest.mark.parametrize("fail_share", [0.0, 0.2])
@pytest.mark.parametrize("max_batch_size", [1, 3, 8])
@pytest.mark.parametrize("instances", [1, 2, 4])
def test_many_threads_with_failures_each_get_their_own_rows_or_their_runs_error(
    instances: int, max_batch_size: int, fail_share: float
) -> None:
    """Sizes up to the max, one buffer per thread reused batch after batch as the engine's shared memory is,
    runs that fail at random, several instances: every batch gets exactly its own rows, or the error of a run
    that held one of them; no row runs twice, and no run reads or writes a batch after it was answered."""
    pause = 0.0004 if instances > 1 else 0.0
    models = [CheckedModel(max_batch_size, fail_share, seed=100 * instances + 10 * max_batch_size + index, pause=pause)
              for index in range(instances)]  # fmt: skip
    merger = BatchMerger(models, max_batch_size)
    outcomes: dict[tuple[int, int], tuple[bool, int]] = {}
    problems: list[str] = []

    def send(thread: int) -> None:
        rng = np.random.default_rng(thread)
        buffer = np.zeros((max_batch_size, 3), np.uint16)
        outputs = np.zeros((max_batch_size, 3), np.float32)
        for number in range(200):
            rows = int(rng.integers(1, max_batch_size + 1))
            buffer[:] = 0
            buffer[:rows] = [(thread, number, row) for row in range(rows)]
            outputs[:] = -1
            try:
                merger.run(buffer, rows, outputs[:rows])
            except ValueError:
                outcomes[thread, number] = (False, rows)
                continue
            outcomes[thread, number] = (True, rows)
            if not np.array_equal(outputs[:rows], buffer[:rows]) or np.any(outputs[rows:] != -1):
                problems.append(f"batch {thread}/{number} got other rows")

    senders = [threading.Thread(target=send, args=(index,)) for index in range(1, 13)]  # thread 0: zeroed rows
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    assert not any(sender.is_alive() for sender in senders), "a batch was never answered"
    assert problems + [problem for model in models for problem in model.problems] == []
    ran_rows = [row for model in models for row in model.ran]
    assert len(ran_rows) == len(set(ran_rows)), "no row ran twice"
    assert (0, 0, 0) not in ran_rows, "no run read a buffer its batch had left (rows zeroed for the next)"
    ran = set(ran_rows)
    failed = set().union(*(model.failed for model in models))
    for (thread, number), (answered, rows) in outcomes.items():
        assert answered == ((thread, number) not in failed)
        if answered:
            assert all((thread, number, row) in ran for row in range(rows))
    if instances > 1:
        assert all(model.ran for model in models), "every instance ran batches"
    # Idle again: every instance free and no thread left called, or a free instance would be kept for no one.
    assert (len(merger._free), merger._called, len(merger._waiting)) == (instances, 0, 0)


def test_a_batch_runs_at_once_on_a_free_instance_while_another_is_busy() -> None:
    """One queue for every instance: a batch never waits for a busy instance while another is idle."""
    busy, free = GatedModel(), GatedModel()
    free.release.set()
    merger = BatchMerger([busy, free], 16)
    results: dict[int, object] = {}
    blocked = _submit(merger, _images(3, 100), results)
    assert busy.started.wait(10)
    quick = _submit(merger, _images(2, 110), results)
    quick.join(10)
    assert not quick.is_alive(), "the second batch waited for the busy instance"
    assert free.runs == [2]
    assert busy.runs == []
    busy.release.set()
    blocked.join(10)
    assert busy.runs == [3]
    assert sorted(results) == [100, 110]


def test_batches_that_wait_while_every_instance_runs_go_together_to_the_first_one_free() -> None:
    first, second = GatedModel(), GatedModel()
    merger = BatchMerger([first, second], 16)
    results: dict[int, object] = {}
    threads = [_submit(merger, _images(3, 100), results)]
    assert first.started.wait(10)
    threads.append(_submit(merger, _images(2, 110), results))
    assert second.started.wait(10)
    for index, rows in enumerate([4, 5], start=2):
        threads.append(_submit(merger, _images(rows, 100 + 10 * index), results))
        _wait_for(partial(_waiting_is, merger, index - 1))
    second.release.set()  # the second instance frees first: the two waiting batches run there, together
    _wait_for(lambda: second.runs == [2, 9])
    assert first.runs == []
    first.release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert first.runs == [3]
    for value, rows in ((100, 3), (110, 2), (120, 4), (130, 5)):
        np.testing.assert_array_equal(results[value], _images(rows, value).reshape(rows, -1).astype(np.float32) * 2)
