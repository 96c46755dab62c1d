"""Joins the batches that several workers send to the engine at the same time into runs on the model's instances.

Each worker batches its own requests, so with eight workers each batch holds about an eighth of the load: on
an H100 the cat/dog model runs 5,500 images/s in batches of 8 and 8,300 in batches of 128. Here a batch that
finds an instance free runs at once; the batches that arrive while every instance is busy wait for the first
to come free and then go together, filling the run up to the model's max batch size: the engine's own dynamic
batching, with no added delay. The batch that does not fit whole is split: its first rows fill this run and
the rest lead the next. On CUDA a run is padded up to its bucket (``serving.runtime``), so 65 images cost what
128 do; with whole batches only, runs under load averaged 88 images of 128.

One queue for all the instances, whichever connection a batch came on: no batch waits for one instance while
another is idle. No thread of its own: the connection thread whose batch finds an instance free runs it; when
a run ends, its thread calls the oldest waiting batch's thread to the freed instance, which runs everything
that waited. A batch that arrives with an instance free pays no hand-over at all."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["BatchMerger", "EngineRun", "RowRunner"]


class RowRunner(Protocol):
    """What the merger runs batches on: ``serving.runtime.BucketRunner``."""

    def run_rows(self, buffer: np.ndarray, count: int) -> np.ndarray:
        """The first ``count`` rows of ``buffer`` through the model; may read past them, up to the padded size."""

    def staging(self) -> np.ndarray:
        """A reused buffer of the max batch size to join batches in."""


@dataclass(frozen=True)
class EngineRun:
    """Where one batch's time in the engine went: the wait for its instance, then the run that answered it. A worker
    sees only the sum (its execution time); this tells a busy instance from a slow run, and the model's own time
    from the engine's copying around it."""

    wait_ns: int  # from arrival to the start of the run that answers it: for a split batch, the later to end
    run_ns: int  # that run, joined with whatever else waited: joining the inputs, the model, splitting outputs
    infer_ns: int  # of that run, the model's call: the session with its device copies (and any wait for the GIL)
    run_rows: int  # images in that run
    instance: int  # the model instance that ran it


class _Batch:
    """One worker's batch: the buffer holding its images, how many, where its probabilities go, how it ended."""

    def __init__(self, buffer: np.ndarray, rows: int, outputs: np.ndarray) -> None:
        self.buffer = buffer
        self.rows = rows
        self.outputs = outputs
        self.arrived_ns = time.perf_counter_ns()
        self.woken = threading.Event()  # set when the batch is done, or when its thread is to run the next turn
        self.taken = 0  # rows given to runs so far (under the merger's lock)
        self.answered = 0  # rows whose run has ended, or that will not run (under the merger's lock)
        self.done = False
        self.called = False  # its thread is called to take a turn (under the merger's lock)
        self.turning = False  # its thread is running a turn, its own rows or others' (under the merger's lock)
        self.error: BaseException | None = None
        self.timing: EngineRun | None = None


@dataclass(frozen=True)
class _Part:
    """Rows ``start`` to ``start + rows`` of a batch, as one run takes them."""

    batch: _Batch
    start: int
    rows: int


class BatchMerger:
    """A model's runs for every connection, on whichever of its instances is free: concurrent batches go through
    ``run`` together."""

    def __init__(self, runners: Sequence[RowRunner], max_batch_size: int) -> None:
        if not runners:
            raise ValueError("a merger needs at least one model instance")
        self._runners = tuple(runners)
        self._max_batch_size = max_batch_size
        self._lock = threading.Lock()
        self._waiting: deque[_Batch] = deque()  # batches with rows no run has taken yet, oldest first
        self._free = list(reversed(range(len(runners))))  # idle instances; pop() gives instance 0 first
        self._called = 0  # threads called to take a turn that have not yet answered the call

    def run(self, buffer: np.ndarray, rows: int, outputs: np.ndarray) -> EngineRun:
        """Blocking: the first ``rows`` images of ``buffer`` (at most the max batch size) through the model,
        their probabilities into ``outputs``; returns where the time went, raises what a run raised. A batch
        that runs alone is read in place, so ``buffer`` must hold the padded size (the engine's shared memory
        holds a full batch).

        Raises:
            ValueError: ``rows`` is not between 1 and the max batch size (before anything runs).
        """
        if not 0 < rows <= self._max_batch_size:
            raise ValueError(f"a batch of {rows} images; this model runs 1 to {self._max_batch_size}")
        batch = _Batch(buffer, rows, outputs)
        with self._lock:
            self._waiting.append(batch)
            # An instance the called threads are not about to take: this thread runs what waits on it now.
            turn = self._claim(batch) if len(self._free) > self._called else None
        while True:
            if turn is not None:
                self._take_turn(batch, *turn)
            with self._lock:
                # A call answered even when the batch is done: the count of calls must come back to 0.
                turn = self._answer_call(batch)
                done = batch.done
            if turn is not None:
                continue
            if done:
                break
            batch.woken.wait()
            batch.woken.clear()
        if batch.error is not None:
            raise batch.error
        assert batch.timing is not None  # set with done, before the batch's thread is woken
        return batch.timing

    def _answer_call(self, batch: _Batch) -> tuple[int, list[_Part], int] | None:
        """Under the lock: if ``batch``'s thread was called, the turn it was called for (None if another thread
        has run the waiting rows meanwhile)."""
        if not batch.called:
            return None
        batch.called = False
        self._called -= 1
        return self._claim(batch)

    def _claim(self, batch: _Batch) -> tuple[int, list[_Part], int] | None:
        """Under the lock, for ``batch``'s thread: a free instance and the waiting rows, oldest first, up to the
        max batch size (the rest of a batch that does not fit whole leads the next run); None if either is
        missing."""
        if not (self._free and self._waiting):
            return None
        batch.turning = True
        instance = self._free.pop()
        parts: list[_Part] = []
        rows = 0
        while self._waiting and rows < self._max_batch_size:
            oldest = self._waiting[0]
            part = _Part(oldest, oldest.taken, min(oldest.rows - oldest.taken, self._max_batch_size - rows))
            parts.append(part)
            oldest.taken += part.rows
            rows += part.rows
            if oldest.taken == oldest.rows:
                self._waiting.popleft()
        return instance, parts, rows

    def _take_turn(self, batch: _Batch, instance: int, parts: list[_Part], rows: int) -> None:
        """On ``batch``'s thread: run ``parts`` on ``instance``, then free it and call waiting batches' threads to
        the free instances, oldest first; a thread busy with a turn of its own calls when that turn ends."""
        self._run(instance, parts, rows)  # never raises: a failure is each batch's error
        with self._lock:
            batch.turning = False
            self._free.append(instance)
            for waiting in self._waiting:
                if len(self._free) <= self._called:
                    break
                if not (waiting.called or waiting.turning):
                    waiting.called = True
                    self._called += 1
                    waiting.woken.set()

    def _run(self, instance: int, parts: list[_Part], rows: int) -> None:
        """The parts through ``instance`` (a lone whole batch read in place), each batch answered once every run
        that took its rows has ended."""
        started = time.perf_counter_ns()
        infer_ns = 0
        error: BaseException | None = None
        runner = self._runners[instance]
        try:
            first = parts[0]
            lone = len(parts) == 1 and first.start == 0  # one whole batch: read in place
            inputs = first.batch.buffer if lone else self._join(instance, parts, rows)
            infer_started = time.perf_counter_ns()
            probabilities = runner.run_rows(inputs, rows)
            infer_ns = time.perf_counter_ns() - infer_started
            offset = 0
            for part in parts:
                part.batch.outputs[part.start : part.start + part.rows] = probabilities[offset : offset + part.rows]
                offset += part.rows
        except BaseException as exc:  # every batch of the run fails with it, and none is left waiting
            error = exc
        ended = time.perf_counter_ns()
        with self._lock:  # a split batch's two runs may end at once, on two instances
            last = parts[-1].batch
            if error is not None and last.taken < last.rows:
                # Split by this run and its rest not yet taken: those rows would only be thrown away.
                self._waiting.remove(last)
                last.answered += last.rows - last.taken
                last.taken = last.rows
            for part in parts:
                batch = part.batch
                batch.answered += part.rows
                batch.error = batch.error or error
                # Done only when every run that took its rows has ended: until then one may still read its
                # buffer or write its outputs, which the worker reuses for its next batch.
                if batch.answered == batch.rows:
                    batch.timing = EngineRun(started - batch.arrived_ns, ended - started, infer_ns, rows, instance)
                    batch.done = True
                    batch.woken.set()

    def _join(self, instance: int, parts: list[_Part], rows: int) -> np.ndarray:
        """The parts' images, one after another, in the instance's staging buffer (page-locked on CUDA, and it
        holds the padded size): one copy each."""
        joined = self._runners[instance].staging()
        np.concatenate([part.batch.buffer[part.start : part.start + part.rows] for part in parts], out=joined[:rows])
        return joined
