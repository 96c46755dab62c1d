"""Per-model dynamic batching: many concurrent ``infer()`` calls become few model executions.

The shape follows MLServer's adaptive batcher (a queue made on the running loop, a future per request, a batch
closed at ``max_batch_size`` or ``max_queue_delay``), improved: monotonic ``loop.time()``, a reference to every
task, a bounded queue, deadlines checked before running, several model instances in flight at once, one bad
request never failing its batch-mates, and a ``close`` that drains and then cancels.

One task (the former) takes requests off the queue into the batch being formed and hands closed batches to idle
instances; the blocking runs happen in the executor, and their results come back through done-callbacks, so the
next batch keeps forming while others run. The former sleeps on one future per wait, woken by a request that
could close the batch, by an instance coming free, or by one timer per batch (no per-request timers).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serving.batch_split import Assembly, BatchPlan, Part
from serving.errors import DeadlineExceeded, InvalidArgument, QueueFull, Unavailable

__all__ = ["BatchObserver", "BatchPolicy", "DynamicBatcher", "RunBatch"]

_log = logging.getLogger(__name__)
_now_ns = time.monotonic_ns

RunBatch = Callable[[np.ndarray], np.ndarray]
"""Blocking: uint8 images ``[B, H, W, C]`` -> outputs ``[B, ...]``; one per model instance, thread-safe per instance."""

_SHUTTING_DOWN = "shutting down; not accepting new requests"
_GRACE_PASSED = "shutting down: the request did not finish within the shutdown grace period"


@dataclass(frozen=True)
class BatchPolicy:
    """How one model's requests are batched (the model's ``dynamic_batching`` settings)."""

    max_batch_size: int
    """Images per execution (>= 1)."""
    max_queue_delay: float
    """Seconds to wait for more images once a batch holds its first; 0: a batch is whatever is waiting now."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Close a batch at once when it reaches one of these and nothing more is queued."""
    max_queue_size: int = 0
    """Requests waiting (not yet running); 0 = unbounded; when full, ``infer()`` raises QueueFull at once."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay < 0:
            raise ValueError(f"max_queue_delay must not be negative, got {self.max_queue_delay}")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(f"preferred batch size {size} is outside 1..max_batch_size ({self.max_batch_size})")
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must not be negative (0 = unbounded), got {self.max_queue_size}")


class BatchObserver(Protocol):
    """Statistics and metrics hook; called on the event loop thread."""

    def batch_done(self, batch_size: int, compute_ns: int) -> None:
        """One successful model execution of ``batch_size`` images."""

    def request_done(self, images: int, queue_ns: int, total_ns: int, ok: bool) -> None:
        """One ``infer()`` call finished, ok or failed (rejected, expired, cancelled and failed calls included)."""


class _Request:
    """One ``infer()`` call on its way through the batcher."""

    __slots__ = ("assembly", "deadline", "enqueued_ns", "future", "images", "rows", "started_ns", "taken", "waiting")

    def __init__(self, images: np.ndarray, deadline: float | None, future: asyncio.Future[np.ndarray]) -> None:
        self.images = images
        self.rows = len(images)
        self.deadline = deadline
        self.future = future
        self.enqueued_ns = _now_ns()
        self.started_ns = 0  # when its first part started running; 0 until then
        self.taken = 0  # rows already placed in batches
        self.waiting = True  # counted in queue_depth
        self.assembly: Assembly | None = None  # only for requests split over several batches


_Plan = BatchPlan[_Request]
_Outcome = np.ndarray | Exception  # one part's output rows, or why it failed


def _execute(run: RunBatch, plan: _Plan) -> tuple[Sequence[_Outcome], list[tuple[int, int]]]:
    """In the executor: merge the batch, run it, and split the outputs per part; if that fails, run each part alone.

    Returns:
        Each part's outcome, in part order, and each successful execution's ``(batch_size, compute_ns)``.
    """
    try:
        inputs = plan.inputs()
        started = time.perf_counter_ns()
        outputs = run(inputs)
        compute_ns = time.perf_counter_ns() - started
        return plan.split(outputs), [(plan.rows, compute_ns)]
    except Exception as exc:
        if len(plan.parts) == 1:
            return [exc], []
    # Requests are validated before they get here, so this is a safety net: only the culprits fail.
    outcomes: list[_Outcome] = []
    executions = []
    for inputs in plan.part_inputs():
        try:
            started = time.perf_counter_ns()
            outputs = run(inputs)
            compute_ns = time.perf_counter_ns() - started
            if len(outputs) != len(inputs):
                raise ValueError(f"the model returned {len(outputs)} rows for a batch of {len(inputs)}")
        except Exception as exc:
            outcomes.append(exc)
        else:
            outcomes.append(outputs)
            executions.append((len(inputs), compute_ns))
    return outcomes, executions


def _call_back(
    loop: asyncio.AbstractEventLoop,
    callback: Callable[[concurrent.futures.Future[Any]], None],
    future: concurrent.futures.Future[Any],
) -> None:
    """In the executor's thread: hand a finished run to the loop."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: a run abandoned at shutdown finished late
        loop.call_soon_threadsafe(callback, future)


class DynamicBatcher:
    """Batches one model's requests over its instances (one ONNX Runtime session each).

    Args:
        instances: one blocking callable per model instance; each runs at most one batch at a time.
        policy: when batches close and how many requests may wait.
        executor: where the blocking calls run (a thread pool; ideally a thread per instance).
        observer: receives execution and request statistics, or None.
    """

    def __init__(
        self,
        instances: Sequence[RunBatch],
        policy: BatchPolicy,
        executor: concurrent.futures.Executor,
        observer: BatchObserver | None = None,
    ) -> None:
        if not instances:
            raise ValueError("a batcher needs at least one model instance")
        self._instances = tuple(instances)
        self._policy = policy
        self._max_batch = policy.max_batch_size
        self._delay = policy.max_queue_delay
        self._no_delay = policy.max_queue_delay <= 0
        self._preferred = frozenset(policy.preferred_batch_sizes)
        self._max_queue = policy.max_queue_size
        self._executor = executor
        self._observer = observer
        self._loop: asyncio.AbstractEventLoop
        self._queue: asyncio.Queue[_Request]
        self._former: asyncio.Task[None] | None = None
        self._former_idle = False  # waiting for a request with nothing in hand
        self._soon: _Plan | None = None  # requests that go straight to an instance at the end of this loop iteration
        self._soon_instance = 0
        self._accepting = False
        self._closing = False
        self._drained: asyncio.Future[None] | None = None  # resolved when nothing is queued or running
        self._closed: asyncio.Future[None] | None = None  # resolved when the first close() is over
        self._idle = list(reversed(range(len(self._instances))))  # pop() hands out instance 0 first
        self._running: dict[concurrent.futures.Future[Any], tuple[int, _Plan]] = {}
        self._plan: _Plan = BatchPlan(self._max_batch)  # the batch being formed
        self._carry: _Request | None = None  # a request whose rest did not fit in the last batch: next in line
        self._waiting = 0
        self._queued_rows = 0  # rows of the requests in the queue (not yet taken by the former)
        self._wake: asyncio.Future[None] | None = None  # the former's sleep, while it has a batch
        self._open_rows = -1  # rows of the batch while it waits for more; -1: new requests need not wake the former
        self._delay_passed = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Create the queue and the batching task on the running loop."""
        if self._former is not None:
            raise RuntimeError("the batcher was already started")
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._former = self._loop.create_task(self._form_batches(), name="dynamic-batcher")
        self._former.add_done_callback(self._former_done)
        self._accepting = True

    @property
    def queue_depth(self) -> int:
        """Requests waiting, not yet running."""
        return self._waiting

    async def infer(self, images: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Run ``images`` ``[N, H, W, C]`` as part of one or more batches; returns exactly their N output rows.

        Args:
            images: the request's images (validated by the caller).
            deadline: in ``loop.time()`` seconds; a request still waiting then is dropped, not run.

        Raises:
            QueueFull: ``max_queue_size`` requests are already waiting.
            DeadlineExceeded: the deadline passed before the request could run.
            Unavailable: the batcher is not started or is shutting down.
        """
        if not self._accepting:
            self._reject(len(images))
            raise Unavailable(_SHUTTING_DOWN if self._former is not None else "the model is not ready")
        if self._max_queue and self._waiting >= self._max_queue:
            self._reject(len(images))
            raise QueueFull(f"model queue is full (max_queue_size {self._max_queue}); retry later")
        rows = len(images)
        if rows == 0:
            self._reject(0)
            raise InvalidArgument("a request needs at least one image")
        request = _Request(images, deadline, self._loop.create_future())
        self._waiting += 1
        soon = self._soon
        if (
            self._queue.empty()
            and (deadline is None or deadline > self._loop.time())
            and (
                rows <= soon.room
                if soon is not None
                else self._former_idle and self._no_delay and self._idle and rows <= self._max_batch
            )
        ):
            # Nothing waits and an instance is free (delay 0): this request, and those arriving in the same loop
            # iteration, run at the end of the iteration without a trip through the former (latency at low load).
            if soon is None:
                soon = self._soon = BatchPlan(self._max_batch)
                self._soon_instance = self._idle.pop()
                self._loop.call_soon(self._run_soon)
            request.taken = soon.add(request, images, 0)
        else:
            self._queue.put_nowait(request)
            self._queued_rows += rows
            if self._open_rows >= 0:
                total = self._open_rows + self._queued_rows
                if total >= self._max_batch or total in self._preferred:
                    self._wake_former()
        ok = False
        try:
            result = await request.future
            ok = True
            return result
        finally:
            if request.waiting:  # cancelled while waiting
                request.waiting = False
                self._waiting -= 1
            if self._observer is not None:
                now = _now_ns()
                started = request.started_ns or now
                self._observer.request_done(rows, started - request.enqueued_ns, now - request.enqueued_ns, ok)

    async def close(self, grace: float) -> None:
        """Stop intake, let queued and running work finish for up to ``grace`` seconds, then cancel the rest.

        New calls raise Unavailable at once; callers whose requests are cancelled get Unavailable. A second call
        waits for the first.
        """
        self._accepting = False
        if self._former is None:
            return
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = self._loop.create_future()
        self._closing = True
        self._drained = self._loop.create_future()
        self._check_drained()
        self._wake_former()  # a batch waiting for more images runs now
        try:
            async with asyncio.timeout(grace):
                await self._drained
        except TimeoutError:
            pass
        finally:
            self._former.cancel()
            await asyncio.wait([self._former])
            self._fail_all(_GRACE_PASSED)
            self._closed.set_result(None)

    def _reject(self, rows: int) -> None:
        if self._observer is not None:
            self._observer.request_done(rows, 0, 0, False)

    # -- the former: takes requests into batches and hands closed batches to idle instances --

    async def _form_batches(self) -> None:
        loop = self._loop
        queue = self._queue
        delay = self._delay
        first_at = 0.0
        try:
            while True:
                plan = self._plan
                if plan.rows == 0 and self._carry is None:
                    if self._closing:
                        self._check_drained()
                    # No local keeps the request: a caller that goes away must not leave its images behind.
                    self._former_idle = True
                    try:
                        self._carry = await queue.get()
                    finally:
                        self._former_idle = False
                    self._queued_rows -= self._carry.rows
                now = loop.time()
                fresh = plan.rows == 0
                self._fill(plan, now)
                if plan.rows == 0:
                    continue  # everything taken had expired or been cancelled
                if fresh:
                    first_at = now
                    self._delay_passed = False
                if (
                    plan.rows >= self._max_batch
                    or delay <= 0
                    or self._closing
                    or self._delay_passed
                    or (plan.rows in self._preferred and self._carry is None and queue.empty())
                    or now >= first_at + delay
                ):
                    if self._timer is not None:
                        self._timer.cancel()
                        self._timer = None
                    if self._idle:
                        if not fresh:
                            self._recheck(plan, now)
                        if plan.rows:
                            self._plan = BatchPlan(self._max_batch)
                            self._start(plan, self._idle.pop())
                        continue
                    self._open_rows = -1  # closed: sleep until an instance comes free
                else:
                    self._open_rows = plan.rows
                    if self._timer is None:
                        self._timer = loop.call_at(first_at + delay, self._on_delay_passed)
                wake = self._wake = loop.create_future()
                try:
                    await wake
                finally:
                    self._wake = None
                    self._open_rows = -1
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _fill(self, plan: _Plan, now: float) -> None:
        """Take requests, the carried one first, into ``plan`` until it is full or nothing waits."""
        queue = self._queue
        request = self._carry
        self._carry = None
        while True:
            if request is None:
                if plan.rows >= self._max_batch or queue.empty():
                    return
                request = queue.get_nowait()
                self._queued_rows -= request.rows
            if request.future.done():  # the caller went away, or another of its parts failed
                pass
            elif request.deadline is not None and request.deadline <= now:
                self._expire(request)
            else:
                request.taken = plan.add(request, request.images, request.taken)
                if request.taken < request.rows:
                    self._carry = request
                    return
            request = None

    def _recheck(self, plan: _Plan, now: float) -> None:
        """Drop from a batch that waited what expired or was cancelled meanwhile, and fill the room again."""
        dropped = False
        for part in list(plan.parts):
            request = part.request
            if request.future.done() or (request.deadline is not None and request.deadline <= now):
                if not request.future.done():
                    self._expire(request)
                plan.drop(request)
                dropped = True
        if dropped:
            self._fill(plan, now)

    def _run_soon(self) -> None:
        plan, self._soon = self._soon, None
        if plan is None:
            return  # close() failed its requests
        for request in [part.request for part in plan.parts if part.request.future.done()]:
            plan.drop(request)  # its caller went away during this loop iteration
        if plan.rows:
            self._start(plan, self._soon_instance)
        else:
            self._release(self._soon_instance)
            if self._closing:
                self._check_drained()

    def _start(self, plan: _Plan, instance: int) -> None:
        """Run ``plan`` on ``instance``, an idle one taken off the idle list."""
        started_ns = _now_ns()
        for part in plan.parts:
            request = part.request
            if request.waiting:
                request.waiting = False
                self._waiting -= 1
                request.started_ns = started_ns
        # executor.submit plus one call_soon_threadsafe back, rather than run_in_executor: its asyncio future and
        # done-callback cost an extra loop iteration per batch.
        try:
            future = self._executor.submit(_execute, self._instances[instance], plan)
        except RuntimeError as exc:  # the executor was shut down under us
            self._release(instance)
            for part in plan.parts:
                self._fail(part.request, Unavailable(f"the model cannot run: {exc}"))
            if self._closing:
                self._check_drained()
            return
        self._running[future] = (instance, plan)
        future.add_done_callback(functools.partial(_call_back, self._loop, self._batch_finished))

    def _on_delay_passed(self) -> None:
        self._timer = None
        self._delay_passed = True
        self._wake_former()

    def _wake_former(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _release(self, instance: int) -> None:
        self._idle.append(instance)
        if self._open_rows < 0:  # the former may be holding a closed batch for want of an instance
            self._wake_former()

    # -- results, on the loop thread --

    def _batch_finished(self, future: concurrent.futures.Future[Any]) -> None:
        entry = self._running.pop(future, None)
        if entry is None:
            return  # close() already failed its requests
        instance, plan = entry
        self._release(instance)
        error = future.exception()  # only what _execute does not catch (BaseException)
        outcomes, executions = future.result() if error is None else ([error] * len(plan.parts), [])
        for part, outcome in zip(plan.parts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._fail(part.request, outcome)
            else:
                self._deliver(part, outcome)
        if self._observer is not None:
            for batch_size, compute_ns in executions:
                self._observer.batch_done(batch_size, compute_ns)
        if self._closing:
            self._check_drained()

    def _deliver(self, part: Part[_Request], outputs: np.ndarray) -> None:
        request = part.request
        future = request.future
        if future.done():
            return
        if part.start == 0 and part.stop == request.rows:
            future.set_result(outputs)
            return
        if request.assembly is None:
            request.assembly = Assembly(request.rows)
        try:
            result = request.assembly.add(part.start, outputs)
        except ValueError as exc:  # parts of one request came back with different output shapes
            future.set_exception(exc)
            return
        if result is not None:
            future.set_result(result)

    def _fail(self, request: _Request, error: BaseException) -> None:
        if request.waiting:
            request.waiting = False
            self._waiting -= 1
        if not request.future.done():
            request.future.set_exception(error)

    def _expire(self, request: _Request) -> None:
        waited_ms = (_now_ns() - request.enqueued_ns) / 1e6
        self._fail(request, DeadlineExceeded(f"deadline exceeded: the request waited {waited_ms:.1f} ms in the queue"))

    # -- shutdown --

    def _check_drained(self) -> None:
        drained = self._drained
        if (
            drained is not None
            and not drained.done()
            and not self._running
            and self._plan.rows == 0
            and self._carry is None
            and self._soon is None
            and self._queue.empty()
        ):
            drained.set_result(None)

    def _fail_all(self, message: str) -> None:
        """Fail everything queued, forming or running with Unavailable; running threads are abandoned."""
        self._accepting = False
        self._closing = True
        for future, (_, plan) in list(self._running.items()):
            future.cancel()
            for part in plan.parts:
                self._fail(part.request, Unavailable(message))
        self._running.clear()
        for forming in (self._plan, self._soon):
            for part in forming.parts if forming is not None else ():
                self._fail(part.request, Unavailable(message))
        self._plan = BatchPlan(self._max_batch)
        self._soon = None
        if self._carry is not None:
            self._fail(self._carry, Unavailable(message))
            self._carry = None
        while not self._queue.empty():
            self._fail(self._queue.get_nowait(), Unavailable(message))
        self._queued_rows = 0

    def _former_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            _log.error("the batching task failed; failing every waiting request", exc_info=error)
            self._fail_all(f"the model's batcher failed: {error}")
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
