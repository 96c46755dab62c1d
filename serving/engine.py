"""The engine: one process that owns every ONNX Runtime session when ``--workers N`` runs several gRPC processes.

Several processes each with its own CUDA context on one GPU take turns on it in time slices, so a batch of
small kernels waits for every other process's turn: on an H100, eight digits workers each holding a session
ran slower together than one alone. So with ``--workers N`` the gRPC workers keep the protocol work and the
dynamic batching, and send each formed batch here; this process runs it on the one CUDA context, joining
the batches that workers send at the same time into one run (``serving.engine_merge``).

Wire: one Unix-socket connection per worker-side model instance, each free to run on any of the engine's
instances of the model. The worker names the model (ONNX file, instance count, max batch size) in a
length-prefixed JSON message; the engine loads it (once for all workers) and answers with its inputs and
outputs, or the reason it cannot; the worker then passes the file descriptor of a shared memory block sized
for one full batch in and out. From then on each batch is a 4-byte row count one way and a 4-byte status the
other, followed on success by where the batch's time went (``TIMING``: its wait for an instance, the run's
time, the model's part of it and the run's images, and which instance ran it): images and probabilities stay
in shared memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import signal
import socket
import struct
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.engine_merge import BatchMerger
from serving.gpu_options import NO_GPU_OPTIONS, GpuOptions
from serving.page_locked import lock_where_possible
from serving.runtime import Device, DeviceUnavailable, ModelRuntime, ProviderSelector, TensorInfo, placement

__all__ = [
    "FRAME", "OK", "TIMING", "ModelKey", "receive_exactly", "receive_json", "run_engine", "send_json", "tensor_of",
]  # fmt: skip

_log = logging.getLogger(__name__)
FRAME = struct.Struct("<I")  # a batch's row count (worker -> engine); a status (engine -> worker)
OK = 0
FAILED = 1  # followed by a FRAME-sized length and that many bytes of UTF-8 message
TIMING = struct.Struct("<QQQII")  # after OK: EngineRun's wait_ns, run_ns, infer_ns, run_rows and instance


@dataclass(frozen=True)
class ModelKey:
    """What identifies a loaded runtime: the same file, instances and bucket sizes share one."""

    path: str
    instance_count: int
    max_batch_size: int
    cpu_only: bool
    modified_ns: int  # a replaced file (a reload) gets new sessions
    gpu: GpuOptions = NO_GPU_OPTIONS  # the model's own CUDA provider options and precision

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelKey:
        """The key a worker sent (``dataclasses.asdict`` as JSON)."""
        return cls(**{**data, "gpu": GpuOptions.from_json(data["gpu"])})


def _tensor_json(info: TensorInfo) -> dict[str, Any]:
    return {"name": info.name, "dtype": info.dtype.str, "shape": list(info.shape)}


def tensor_of(data: dict[str, Any]) -> TensorInfo:
    return TensorInfo(data["name"], np.dtype(data["dtype"]), tuple(data["shape"]))


@dataclass
class _Loaded:
    """A runtime the engine holds, the merger that runs every connection's batches on its instances, and how many
    connections use it."""

    runtime: ModelRuntime
    merger: BatchMerger
    users: int = 0


class _Engine:
    """Loaded runtimes, shared by every connection that asks for the same key, dropped when the last one leaves."""

    def __init__(self, device: Device) -> None:
        self.providers = ProviderSelector(device)
        self.cpu = ProviderSelector(Device.CPU)
        self.lock = threading.Lock()
        self.loaded: dict[ModelKey, _Loaded] = {}

    def acquire(self, key: ModelKey) -> _Loaded:
        with self.lock:  # one load at a time: the first asker loads and warms up, the others reuse
            loaded = self.loaded.get(key)
            if loaded is None:
                providers = self.cpu if key.cpu_only else self.providers
                runtime = ModelRuntime(Path(key.path), key.instance_count, key.max_batch_size, providers, key.gpu)
                runtime.warm_up()
                _log.info("engine loaded %s on %s", key.path, placement(runtime.providers, runtime.fp16))
                merger = BatchMerger(runtime.runners, key.max_batch_size)
                loaded = self.loaded[key] = _Loaded(runtime, merger)
            loaded.users += 1
            return loaded

    def release(self, key: ModelKey) -> None:
        with self.lock:
            loaded = self.loaded[key]
            loaded.users -= 1
            if loaded.users == 0:
                del self.loaded[key]
                loaded.runtime.close()

    def serve(self, connection: socket.socket) -> None:
        """One worker-side instance: the handshake, then batches until the worker closes the connection."""
        with connection:
            hello = receive_json(connection)
            if hello is None:
                return
            key = ModelKey.from_json(hello["model"])
            try:
                loaded = self.acquire(key)
            except DeviceUnavailable as exc:
                send_json(connection, {"error": str(exc), "device_unavailable": True})
                return
            except Exception as exc:  # a model that cannot load: the worker reports it for that model
                send_json(connection, {"error": f"{type(exc).__name__}: {exc}"})
                return
            try:
                runtime = loaded.runtime
                send_json(connection, {"providers": runtime.providers, "fp16": runtime.fp16,
                                       "input": _tensor_json(runtime.input),
                                       "output": _tensor_json(runtime.output)})  # fmt: skip
                _, fds, _, _ = socket.recv_fds(connection, 1, 1)
                if not fds:
                    return
                with mmap.mmap(fds[0], 0) as shared:
                    os.close(fds[0])
                    self._run_batches(connection, runtime, loaded.merger, shared)
            finally:
                self.release(key)

    @staticmethod
    def _run_batches(connection: socket.socket, runtime: ModelRuntime, merger: BatchMerger, shared: mmap.mmap) -> None:
        image_shape, classes = runtime.input.shape[1:], runtime.output.shape[1]
        inputs = np.frombuffer(shared, np.uint8, runtime.max_batch_size * int(np.prod(image_shape)))
        inputs = inputs.reshape(-1, *image_shape)
        outputs = np.frombuffer(shared, np.float32, runtime.max_batch_size * classes, inputs.nbytes)
        outputs = outputs.reshape(-1, classes)
        frame = bytearray(FRAME.size)
        try:
            with ExitStack() as page_locks:
                if runtime.on_cuda:  # a lone batch is read from here in place: copied to the GPU directly
                    lock_where_possible(page_locks, inputs, "a worker's shared batch memory")
                while receive_exactly(connection, frame):
                    (rows,) = FRAME.unpack(frame)
                    try:
                        timing = merger.run(inputs, rows, outputs[:rows])
                    except Exception as exc:  # the worker fails this batch's requests with the reason
                        reason = f"{type(exc).__name__}: {exc}".encode()
                        connection.sendall(FRAME.pack(FAILED) + FRAME.pack(len(reason)) + reason)
                    else:
                        connection.sendall(FRAME.pack(OK) + TIMING.pack(*dataclasses.astuple(timing)))
        finally:
            del inputs, outputs  # the views must go before the mmap closes


def send_json(connection: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    connection.sendall(FRAME.pack(len(data)) + data)


def receive_json(connection: socket.socket) -> Any:
    """The next length-prefixed JSON message; None if the peer closed the connection."""
    header = bytearray(FRAME.size)
    if not receive_exactly(connection, header):
        return None
    body = bytearray(FRAME.unpack(header)[0])
    return json.loads(body) if receive_exactly(connection, body) else None


def receive_exactly(connection: socket.socket, buffer: bytearray) -> bool:
    """Fill ``buffer`` from the socket; False if the peer closed the connection first."""
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        count = connection.recv_into(view[got:])
        if count == 0:
            return False
        got += count
    return True


def run_engine(address: str, device: Device) -> None:
    """Serve worker connections on the Unix socket ``address`` until terminated (the parent does that last)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the workers drain first
    engine = _Engine(device)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound under another name and moved into place once listening: whoever sees ``address`` exist (the parent
    # waits for it before starting the workers) can connect at once, not in the gap between bind and listen.
    listener.bind(f"{address}.new")
    listener.listen()
    os.rename(f"{address}.new", address)
    _log.info("engine listening on %s", address)
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=engine.serve, args=(connection,), daemon=True, name="engine-connection").start()
