"""What a request asks of the models, free of any protocol: decode images, batch, run, rank labels.

Both APIs (classify.v1 and KServe v2) call into this module, so they share validation, limits, deadlines,
statistics and metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from serving.errors import InvalidArgument, ServiceError
from serving.images import ImageLimits, InputSpec, decode_image, raw_image
from serving.metrics import Metrics, ModelMetrics
from serving.model_config import ModelSpec
from serving.repository import ModelRepository, ModelVersion

__all__ = ["DataPlane", "ImageInput", "LabelScore"]


@dataclass(frozen=True)
class ImageInput:
    """One image from a client: ``encoded`` file bytes, or ``raw`` uint8 HWC pixels with their ``shape``."""

    encoded: bytes | None = None
    raw: bytes | None = None
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class LabelScore:
    label: str
    index: int
    score: float


def _decode_timed(
    data: bytes, spec: InputSpec, limits: ImageLimits, metrics: ModelMetrics, submitted_ns: int
) -> np.ndarray:
    """``decode_image`` on a decode thread, recording the wait for the thread, the decode's wall time and the
    thread's CPU time in it: wall time well above CPU time means the decode threads wait for the GIL or a core."""
    started_ns, cpu_started_ns = time.perf_counter_ns(), time.thread_time_ns()
    try:
        return decode_image(data, spec, limits)
    finally:
        metrics.image_decoded(
            started_ns - submitted_ns, time.perf_counter_ns() - started_ns, time.thread_time_ns() - cpu_started_ns
        )


class DataPlane:
    """Decodes on a thread pool, queues on the model's batcher, and records each request's outcome."""

    def __init__(
        self, repository: ModelRepository, metrics: Metrics, decode_executor: Executor, limits: ImageLimits
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.decode_executor = decode_executor
        self.limits = limits
        self._in_flight = 0
        self._started = 0  # requests ever started: tells a quiet spell from a busy one
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_quiet(self, quiet: float, timeout: float) -> bool:
        """Wait until no request has been in flight or started for ``quiet`` seconds; False on ``timeout``.

        Shutdown waits for this rather than for gRPC's graceful stop, which cancels calls that reached the
        server but were not yet handed to a handler.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while loop.time() < give_up:
            try:
                await asyncio.wait_for(self._idle.wait(), give_up - loop.time())
            except TimeoutError:
                return False
            started = self._started
            await asyncio.sleep(min(quiet, max(0.0, give_up - loop.time())))
            if self._idle.is_set() and self._started == started:
                return True
        return False

    def _begin(self) -> int:
        """Count a request in; returns its start time (ns) for the latency ``_end`` records."""
        self._in_flight += 1
        self._started += 1
        self._idle.clear()
        return time.perf_counter_ns()

    def _end(self, served: ModelVersion, started_ns: int, error: BaseException | None) -> None:
        """Count a request out and record its status (the gRPC name; OK, CANCELLED or INTERNAL) and latency."""
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()
        if error is None:
            status = "OK"
        elif isinstance(error, ServiceError):
            status = error.status.name
        else:  # CancelledError: the client went away or its deadline passed
            status = "CANCELLED" if isinstance(error, asyncio.CancelledError) else "INTERNAL"
        seconds = (time.perf_counter_ns() - started_ns) / 1e9
        self.metrics.request(served.name, str(served.version), status, seconds)

    def _deadline(self, served: ModelVersion, deadline: float | None) -> float | None:
        default = served.spec.default_timeout
        if default is None:
            return deadline
        own = asyncio.get_running_loop().time() + default
        return own if deadline is None else min(deadline, own)

    async def _images(self, served: ModelVersion, images: Sequence[ImageInput]) -> np.ndarray:
        if not images:
            raise InvalidArgument("the request holds no images; send at least one")
        spec = served.spec.input
        loop = asyncio.get_running_loop()

        async def one(index: int, image: ImageInput) -> np.ndarray:
            try:
                if image.raw is not None:
                    return raw_image(image.raw, image.shape, spec)
                if image.encoded is None:
                    raise InvalidArgument("neither encoded bytes nor a raw tensor was given")
                return await loop.run_in_executor(
                    self.decode_executor, _decode_timed, image.encoded, spec, self.limits, served.metrics,
                    time.perf_counter_ns(),
                )  # fmt: skip
            except InvalidArgument as exc:
                raise InvalidArgument(f"image {index}: {exc}") from None

        arrays = await asyncio.gather(*(one(i, image) for i, image in enumerate(images)))
        return np.stack(arrays)

    async def classify(
        self, model: str, version: str, images: Sequence[ImageInput], top_k: int, deadline: float | None
    ) -> tuple[ModelVersion, list[list[LabelScore]]]:
        """Labels with scores for each image, best first, ``top_k`` of them."""
        served = self.repository.get(model, version)
        started = self._begin()
        try:
            labels = served.spec.labels
            if not 1 <= top_k <= len(labels):
                raise InvalidArgument(f"top_k must be between 1 and {len(labels)} for model {model!r}, got {top_k}")
            batch = await self._images(served, images)
            probabilities = await served.batcher.infer(batch, self._deadline(served, deadline))
        except BaseException as exc:
            self._end(served, started, exc)
            raise
        self._end(served, started, None)
        return served, rank(probabilities, labels, top_k)

    async def infer(
        self, model: str, version: str, tensor_for: Callable[[ModelSpec], np.ndarray], deadline: float | None
    ) -> tuple[ModelVersion, np.ndarray]:
        """Probabilities for the uint8 ``[N, H, W, C]`` tensor that ``tensor_for`` checks against the model."""
        served = self.repository.get(model, version)
        started = self._begin()
        try:
            probabilities = await served.batcher.infer(tensor_for(served.spec), self._deadline(served, deadline))
        except BaseException as exc:
            self._end(served, started, exc)
            raise
        self._end(served, started, None)
        return served, probabilities


def rank(probabilities: np.ndarray, labels: Sequence[str], top_k: int) -> list[list[LabelScore]]:
    """The ``top_k`` labels of each row, by descending probability (ties: lower index first)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    return [
        [LabelScore(labels[i], int(i), float(row[i])) for i in indices]
        for row, indices in zip(probabilities, order, strict=True)
    ]
