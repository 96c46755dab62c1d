"""A worker's view of a model whose sessions live in the engine process (``serving.engine``).

``RemoteRuntime`` has ``ModelRuntime``'s face (providers, input, output, one blocking runner per instance),
so the worker's repository and dynamic batcher use it unchanged; each runner copies its batch into shared
memory, sends the row count and waits for the engine's answer.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from serving.engine import FRAME, OK, TIMING, ModelKey, receive_exactly, receive_json, send_json, tensor_of
from serving.engine_merge import EngineRun
from serving.gpu_options import NO_GPU_OPTIONS, GpuOptions
from serving.runtime import DeviceUnavailable

__all__ = ["EngineError", "RemoteRuntime"]

_log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine could not load the model or run a batch; the message says why."""


class _Connection:
    """One connection to the engine, with its shared memory block: one batch at a time, run on whichever of the
    engine's instances of the model is free."""

    def __init__(self, address: str, key: ModelKey) -> None:
        self.connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.connection.connect(address)
            send_json(self.connection, {"model": dataclasses.asdict(key)})
            answer = receive_json(self.connection)
            if answer is None:
                raise EngineError("the engine closed the connection while loading the model")
            if "error" in answer:
                raise (DeviceUnavailable if answer.get("device_unavailable") else EngineError)(answer["error"])
            self.providers: list[str] = answer["providers"]
            self.fp16: bool = answer["fp16"]
            self.input, self.output = tensor_of(answer["input"]), tensor_of(answer["output"])
            image_shape, classes = self.input.shape[1:], self.output.shape[1]
            input_bytes = key.max_batch_size * int(np.prod(image_shape))
            fd = _shared_memory(input_bytes + key.max_batch_size * classes * 4)
            try:
                self.shared = mmap.mmap(fd, 0)
                socket.send_fds(self.connection, [b"m"], [fd])
            finally:
                os.close(fd)
        except BaseException:
            self.connection.close()
            raise
        self.inputs = np.frombuffer(self.shared, np.uint8, input_bytes).reshape(-1, *image_shape)
        self.outputs = np.frombuffer(self.shared, np.float32, key.max_batch_size * classes, input_bytes)
        self.outputs = self.outputs.reshape(-1, classes)
        self.frame = bytearray(FRAME.size)
        self.timing = bytearray(TIMING.size)
        self.observer: Callable[[EngineRun], None] | None = None

    def run(self, images: np.ndarray) -> np.ndarray:
        """Blocking, on the batcher's executor thread: one batch through the engine."""
        rows = len(images)
        self.inputs[:rows] = images
        try:
            self.connection.sendall(FRAME.pack(rows))
        except OSError as exc:
            raise EngineError(f"the engine process went away: {exc}") from None
        self._receive(self.frame)
        if FRAME.unpack(self.frame)[0] != OK:
            length = bytearray(FRAME.size)
            self._receive(length)
            reason = bytearray(FRAME.unpack(length)[0])
            self._receive(reason)
            raise EngineError(f"the engine failed the batch: {reason.decode()}")
        self._receive(self.timing)
        if self.observer is not None:
            try:
                self.observer(EngineRun(*TIMING.unpack(self.timing)))
            except Exception:  # a statistic must not fail a batch that ran
                _log.exception("recording the engine's timing failed")
        return self.outputs[:rows].copy()

    def _receive(self, buffer: bytearray) -> None:
        try:
            answered = receive_exactly(self.connection, buffer)
        except OSError as exc:
            raise EngineError(f"the engine process went away: {exc}") from None
        if not answered:
            raise EngineError("the engine process went away")

    def close(self) -> None:
        self.connection.close()


def _shared_memory(size: int) -> int:
    """A descriptor of ``size`` bytes of anonymous shared memory (memfd where there is one), to pass and map."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("classify-batch")
    else:
        with tempfile.TemporaryFile() as file:  # already unlinked: only the descriptors keep it
            fd = os.dup(file.fileno())
    os.ftruncate(fd, size)
    return fd


class RemoteRuntime:
    """``instance_count`` instances of one ONNX file, loaded and run by the engine at ``address``."""

    def __init__(
        self,
        address: str,
        path: Path,
        instance_count: int,
        max_batch_size: int,
        cpu_only: bool,
        gpu: GpuOptions = NO_GPU_OPTIONS,
    ) -> None:
        self.path = path
        self.max_batch_size = max_batch_size
        modified = path.stat().st_mtime_ns
        key = ModelKey(str(path.resolve()), instance_count, max_batch_size, cpu_only, modified, gpu)
        # One connection per instance the batcher runs: as many batches in flight as the engine has instances.
        self._connections: list[_Connection] = []
        try:
            for _ in range(instance_count):
                self._connections.append(_Connection(address, key))
        except BaseException:
            self.close()
            raise
        first = self._connections[0]
        self.providers, self.fp16, self.input, self.output = first.providers, first.fp16, first.input, first.output
        self.runners = [connection.run for connection in self._connections]

    def warm_up(self) -> None:
        """Nothing to do: the engine warmed every bucket up when it loaded the model."""

    def observe_engine(self, observer: Callable[[EngineRun], None]) -> None:
        """Have ``observer`` called with where each batch's time in the engine went (and on which instance), on
        the batcher's executor thread that ran the batch (not the event loop's): it must be thread-safe, as
        Prometheus metrics are."""
        for connection in self._connections:
            connection.observer = observer

    def close(self) -> None:
        for connection in self._connections:
            connection.close()
