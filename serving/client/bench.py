"""``classify bench``: a load generator that measures a model's throughput and latency over either gRPC API.

Python's gRPC client manages about 7,000 unary calls/s (27,000 streamed messages/s) per process, so the load
comes from several processes, each an asyncio loop with its own connection(s) keeping its share of the
concurrency in flight. Requests are serialized once up front and sent as bytes (identity serializers), so a
request costs no protobuf work on the client; latencies come back to the parent as numpy arrays and are
merged there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving.client.connection import failure_message, open_channel
from serving.client.inputs import expand_arguments
from serving.errors import InvalidArgument
from serving.images import InputSpec, decode_image, resize_for
from serving.protos.classify.v1 import classify_pb2, classify_pb2_grpc
from serving.protos.inference import grpc_service_pb2, grpc_service_pb2_grpc

__all__ = ["add_bench_parser", "run_bench"]

_METHODS = {  # (api, stream) -> the RPC's path
    ("classify", False): "/classify.v1.Classifier/Classify",
    ("classify", True): "/classify.v1.Classifier/ClassifyStream",
    ("kserve", False): "/inference.GRPCInferenceService/ModelInfer",
    ("kserve", True): "/inference.GRPCInferenceService/ModelStreamInfer",
}
_SYNTHETIC_IMAGES = 16  # distinct random images when none are given: enough that no two neighbours repeat
_CONNECT_TIMEOUT = 10.0  # seconds to reach the server when --timeout is not given
_START_MARGIN_NS = 100_000_000  # the parent's go signal names a start this far ahead, so all workers begin together
_STREAM_ERROR = "ERROR"  # ModelStreamInfer reports failures as a message without a status code
_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # one connection per channel, even to the same address
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


class BenchError(Exception):
    """The benchmark cannot run (bad arguments, unreachable server, unknown model): exit status 2."""


# ---- arguments -------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def add_bench_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``bench``; ``common`` carries --server, --timeout and the TLS flags."""
    parser = subparsers.add_parser(
        "bench",
        parents=[common],
        allow_abbrev=False,
        help="measure a model's throughput and latency under load",
        description="Load a model with requests from several processes, C in flight at a time, and report "
        "throughput (successful requests and images per second), latency percentiles of the successful requests "
        "and failures by gRPC status. --timeout is each unary request's deadline [default: none] and how long "
        "to wait for the server at the start [default: 10]. "
        "Exit status: 0 every request succeeded; 1 some failed; 2 usage error, or the server cannot be reached.",
    )
    parser.add_argument("--model", metavar="NAME", required=True, help="the model to load, e.g. digits")
    parser.add_argument(
        "--api",
        choices=["classify", "kserve"],
        default="classify",
        help="classify.v1 Classify, or KServe v2 ModelInfer with raw tensors [default: classify]",
    )
    parser.add_argument(
        "--concurrency", metavar="C", type=_positive_int, default=16, help="requests in flight [default: 16]"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--duration", metavar="S", type=_seconds, help="seconds of measured load [default: 10]")
    length.add_argument(
        "--requests", metavar="N", type=_positive_int, help="measure exactly N requests instead of a duration"
    )
    parser.add_argument(
        "--warmup",
        metavar="S",
        type=_seconds,
        help="seconds of load before measuring, not counted [default: 1; 0 with --requests]",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="image files, folders (their image files, recursively) or globs, sent in turn [default: random "
        "uint8 images of the model's input shape]. classify sends the files as they are; kserve decodes and "
        "resizes them once, here, as the server would",
    )
    parser.add_argument("--batch", metavar="B", type=_positive_int, default=1, help="images per request [default: 1]")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="ClassifyStream / ModelStreamInfer: requests pipelined on bidirectional streams, answers matched "
        "in order (ModelStreamInfer errors carry no status code: counted as ERROR)",
    )
    parser.add_argument(
        "--stream-depth",
        metavar="D",
        type=_positive_int,
        default=16,
        help="with --stream: the most requests in flight on one stream; each process opens as few streams as "
        "that allows for its share of C, the same number on each of its connections [default: 16]",
    )
    parser.add_argument(
        "--processes",
        metavar="P",
        type=_positive_int,
        help="load processes, each with its own event loop and connections [default: min(CPUs, ceil(C / 64))]",
    )
    parser.add_argument(
        "--channels", metavar="K", type=_positive_int, default=1, help="connections per process [default: 1]"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run_bench)


# ---- what to send ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """The model as the server describes it: its input image and, for KServe, the input tensor's name."""

    model: str
    input: InputSpec
    input_name: str


_Pems = tuple[bytes, bytes | None, bytes | None]  # CA, client certificate chain, client key: what a worker needs


def _channel(address: str, tls: _Pems | None) -> grpc.aio.Channel:
    """A load channel: its own connection (open_channel's channels to one address would share one)."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
    ca, cert, key = tls
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.aio.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)


def _read_tls(args: argparse.Namespace) -> _Pems | None:
    """The PEM files for the load processes; open_channel has checked the flags (TLS is on with --tls-ca)."""
    if args.tls_ca is None:
        return None
    try:
        ca = Path(args.tls_ca).read_bytes()
        cert = None if args.tls_cert is None else Path(args.tls_cert).read_bytes()
        key = None if args.tls_key is None else Path(args.tls_key).read_bytes()
    except OSError as exc:
        raise BenchError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return ca, cert, key


def _input_spec(height: int, width: int, channels: int) -> InputSpec:
    try:
        return InputSpec(height=height, width=width, channels=channels, resize=resize_for(channels))
    except ValueError as exc:
        raise BenchError(f"model input {height}x{width}x{channels}: {exc}") from None


async def _describe(args: argparse.Namespace) -> _Target:
    """Ask the server (ListModels, or KServe ModelMetadata) what the model takes; BenchError if it cannot."""
    address, timeout = args.server, args.timeout or _CONNECT_TIMEOUT
    try:
        channel = open_channel(address, args.tls_ca, args.tls_cert, args.tls_key)
    except ValueError as exc:  # connection.CredentialsError: incomplete TLS flags, unreadable PEM files
        raise BenchError(str(exc)) from None
    async with channel:
        try:
            if args.api == "classify":
                stub = classify_pb2_grpc.ClassifierStub(channel)
                listing = await stub.ListModels(classify_pb2.ListModelsRequest(), timeout=timeout)
                return _classify_target(listing, args.model, address)
            inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await inference.ServerLive(grpc_service_pb2.ServerLiveRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise BenchError(failure_message(address, exc, timeout)) from None
        try:
            request = grpc_service_pb2.ModelMetadataRequest(name=args.model)
            metadata = await inference.ModelMetadata(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise BenchError(f"model {args.model!r} at {address}: {exc.code().name}: {exc.details()}") from None
    inputs = list(metadata.inputs)
    if len(inputs) != 1 or inputs[0].datatype != "UINT8" or len(inputs[0].shape) != 4:
        described = ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in inputs)
        raise BenchError(f"model {args.model!r} takes {described}; bench sends one UINT8 [batch, H, W, C] input")
    height, width, channels = (int(dim) for dim in inputs[0].shape[1:])
    return _Target(args.model, _input_spec(height, width, channels), inputs[0].name)


def _classify_target(listing: classify_pb2.ListModelsResponse, model: str, address: str) -> _Target:
    models = {info.name: info for info in listing.models}
    if model not in models:
        served = ", ".join(sorted(models)) or "none"
        raise BenchError(f"model {model!r} is not served at {address}; it serves: {served}")
    info = models[model]
    if not info.ready:
        raise BenchError(f"model {model!r} at {address} is not ready")
    return _Target(model, _input_spec(info.input.height, info.input.width, info.input.channels), "")


def _image_files(patterns: Sequence[str]) -> list[Path]:
    """Files named, found in folders or matched by globs, in the given order (as ``classify`` expands them)."""
    files = []
    for image in expand_arguments(patterns):
        if image.failure is not None:
            raise BenchError(f"{image.name}: {image.failure.message}")
        if image.path is None:
            raise BenchError("--images -: standard input cannot be replayed; name image files instead")
        files.append(image.path)
    return files


def _load_images(patterns: Sequence[str] | None, target: _Target, api: str) -> list[bytes]:
    """Encoded files (classify), raw HWC pixels (kserve), or random pixels (no --images), one per image."""
    if not patterns:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, target.input.shape, dtype=np.uint8).tobytes() for _ in range(_SYNTHETIC_IMAGES)]
    images = []
    for file in _image_files(patterns):
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise BenchError(f"cannot read {file}: {exc.strerror}") from None
        if api == "classify":
            images.append(data)
            continue
        try:
            images.append(decode_image(data, target.input).tobytes())
        except InvalidArgument as exc:
            raise BenchError(f"{file}: {exc}") from None
    return images


def _payloads(images: list[bytes], encoded: bool, target: _Target, api: str, batch: int) -> list[bytes]:
    """Serialized requests of ``batch`` images each, taking the images in turn (wrapping round as needed)."""
    shape = list(target.input.shape)
    requests = []
    for first in range(0, len(images) if len(images) > batch else 1, batch):
        group = [images[(first + i) % len(images)] for i in range(batch)]
        message: classify_pb2.ClassifyRequest | grpc_service_pb2.ModelInferRequest
        if api == "classify":
            message = classify_pb2.ClassifyRequest(
                model=target.model,
                images=[
                    classify_pb2.Image(encoded=data)
                    if encoded
                    else classify_pb2.Image(raw=classify_pb2.RawImage(data=data, shape=shape))
                    for data in group
                ],
            )
        else:
            tensor = grpc_service_pb2.ModelInferRequest.InferInputTensor(
                name=target.input_name, datatype="UINT8", shape=[batch, *shape]
            )
            message = grpc_service_pb2.ModelInferRequest(
                model_name=target.model, inputs=[tensor], raw_input_contents=[b"".join(group)]
            )
        requests.append(message.SerializeToString())
    return requests


# ---- one process's load ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What one load process does; picklable, as it travels to a spawned process."""

    address: str
    tls: _Pems | None
    api: str
    stream: bool
    payloads: list[bytes]
    first_payload: int  # where this process's slots start in ``payloads``, so processes send different images
    concurrency: int
    channels: int
    stream_depth: int
    warmup_ns: int
    duration_ns: int | None  # None: count requests
    requests: int | None  # this process's share of --requests
    timeout: float | None


@dataclass(frozen=True)
class _Measured:
    """What one process measured: latencies of the successful requests, failures by status, measured time."""

    latencies_ns: np.ndarray
    errors: dict[str, int]
    messages: dict[str, str]  # the first message seen per status
    elapsed_ns: int
    began_ns: int  # when this process's load began, a time.monotonic_ns: where its measured window lies


@dataclass
class _Cursor:
    """A stream slot's place in the payloads, and whether it has sent all it should, across reopened streams."""

    index: int
    finished: bool = False


_StreamMethod = grpc.aio.StreamStreamMultiCallable[bytes, bytes]
_StreamCall = grpc.aio.StreamStreamCall[bytes, bytes]


class _Load:
    """Keeps a process's share of the concurrency in flight and records what it counts."""

    def __init__(self, plan: _Plan, start_ns: int) -> None:
        self.plan = plan
        self.warm_end = start_ns + plan.warmup_ns
        self.end = None if plan.duration_ns is None else self.warm_end + plan.duration_ns
        self.remaining = plan.requests or 0
        self.last_ns = self.warm_end
        self.latencies = array("q")
        self.errors: Counter[str] = Counter()
        self.messages: dict[str, str] = {}

    def take(self, now: int) -> bool:
        """Whether to send a request at ``now``: before the end, or while counted requests are left."""
        if self.end is not None:
            return now < self.end
        if now < self.warm_end:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    def record(self, sent: int, done: int, error: str | None = None, message: str = "") -> None:
        """Count a request that completed in the measured window (or, counting requests, was sent after warm-up)."""
        if self.end is not None:
            if not self.warm_end <= done < self.end:
                return
        elif sent < self.warm_end:
            return
        self.last_ns = max(self.last_ns, done)
        if error is None:
            self.latencies.append(done - sent)
        else:
            self.errors[error] += 1
            self.messages.setdefault(error, message)

    async def unary(self, channel: grpc.aio.Channel, slot: int) -> None:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            _METHODS[self.plan.api, False], request_serializer=None, response_deserializer=None
        )
        payloads, timeout, clock = self.plan.payloads, self.plan.timeout, time.perf_counter_ns
        index = self.plan.first_payload + slot
        while self.take(sent := clock()):
            try:
                await call(payloads[index % len(payloads)], timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                self.record(sent, clock(), exc.code().name, exc.details() or "")
            else:
                self.record(sent, clock())
            index += 1

    async def stream(self, channel: grpc.aio.Channel, slot: int, depth: int) -> None:
        """One stream with ``depth`` requests in flight; a broken stream counts its in-flight requests and reopens."""
        open_stream: _StreamMethod = channel.stream_stream(
            _METHODS[self.plan.api, True], request_serializer=None, response_deserializer=None
        )
        failure = _classify_stream_error if self.plan.api == "classify" else _kserve_stream_error
        clock = time.perf_counter_ns
        cursor = _Cursor(self.plan.first_payload + slot * depth)
        while not cursor.finished:
            call: _StreamCall = open_stream()
            sent: deque[int] = deque()  # send times of the requests in flight, oldest first: answers come in order
            window = asyncio.Semaphore(depth)
            writer = asyncio.ensure_future(self._feed(call, sent, window, cursor))
            try:
                while isinstance(response := await call.read(), bytes):  # until grpc.aio.EOF
                    done = clock()
                    window.release()
                    error = failure(response)
                    if error is None:
                        self.record(sent.popleft(), done)
                    else:
                        self.record(sent.popleft(), done, *error)
            except grpc.aio.AioRpcError as exc:
                done = clock()
                for request_sent in sent:
                    self.record(request_sent, done, exc.code().name, exc.details() or "")
            finally:
                writer.cancel()
                call.cancel()

    async def _feed(self, call: _StreamCall, sent: deque[int], window: asyncio.Semaphore, cursor: _Cursor) -> None:
        """Write requests while ``window`` allows, until the load is done; then half-close the stream."""
        payloads, clock = self.plan.payloads, time.perf_counter_ns
        try:
            while True:
                await window.acquire()
                if not self.take(now := clock()):
                    cursor.finished = True
                    break
                sent.append(now)
                await call.write(payloads[cursor.index % len(payloads)])
                cursor.index += 1
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the stream broke: reading gets its status

    async def run(self, channels: list[grpc.aio.Channel]) -> None:
        plan = self.plan
        slots: list[Awaitable[None]]
        if plan.stream:
            slots = [self.stream(channels[i % len(channels)], i, depth) for i, depth in enumerate(_stream_depths(plan))]
        else:
            slots = [self.unary(channels[i % len(channels)], i) for i in range(plan.concurrency)]
        tasks = [asyncio.ensure_future(slot) for slot in slots]
        try:
            # Counting time, what is in flight at the end would not count: stop it rather than wait for it.
            timeout = None if self.end is None else max(0.0, (self.end - time.perf_counter_ns()) / 1e9)
            done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a slot's bug surfaces here
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def measured(self, began_ns: int) -> _Measured:
        elapsed = self.plan.duration_ns if self.plan.duration_ns is not None else self.last_ns - self.warm_end
        latencies = np.frombuffer(self.latencies, dtype=np.int64).copy()
        return _Measured(latencies, dict(self.errors), self.messages, elapsed, began_ns)


def _stream_depths(plan: _Plan) -> list[int]:
    """Requests in flight on each of a process's streams, evenly filled: as few streams as --stream-depth allows,
    rounded up to the same number on every connection (a server whose workers share a port by connection
    leaves a worker without a stream idle), and no more streams than requests."""
    needed = math.ceil(plan.concurrency / plan.stream_depth)
    streams = min(plan.concurrency, math.ceil(needed / plan.channels) * plan.channels)
    return [plan.concurrency // streams + (i < plan.concurrency % streams) for i in range(streams)]


def _classify_stream_error(response: bytes) -> tuple[str, str] | None:
    reply = classify_pb2.ClassifyResponse.FromString(response)
    return (reply.error.code or "UNKNOWN", reply.error.message) if reply.HasField("error") else None


def _kserve_stream_error(response: bytes) -> tuple[str, str] | None:
    reply = grpc_service_pb2.ModelStreamInferResponse.FromString(response)
    return (_STREAM_ERROR, reply.error_message) if reply.error_message else None


async def _run_plan(plan: _Plan, announce_ready: Callable[[], None], wait_start: Callable[[], int]) -> _Measured:
    """Connect, say so, wait for the common start (a time.monotonic_ns), then run the load."""
    channels = [_channel(plan.address, plan.tls) for _ in range(plan.channels)]
    try:
        timeout = plan.timeout or _CONNECT_TIMEOUT
        try:
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), timeout)
        except TimeoutError:
            raise BenchError(f"cannot connect to the server at {plan.address} within {timeout:g} s") from None
        announce_ready()
        start = await asyncio.to_thread(wait_start)
        await asyncio.sleep(max(0, start - time.monotonic_ns()) / 1e9)
        began = time.monotonic_ns()  # a process that woke late measures later than the common start
        load = _Load(plan, time.perf_counter_ns())
        await load.run(channels)
        return load.measured(began)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def _process_main(plan: _Plan, index: int, events: Any, starts: Any) -> None:
    """A spawned load process: reports ("ready"|"done"|"error", index, detail) to the parent on ``events``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops its workers
    try:
        measured = asyncio.run(_run_plan(plan, lambda: events.put(("ready", index, None)), starts.get))
    except BenchError as exc:
        events.put(("error", index, str(exc)))
    except Exception:
        events.put(("error", index, traceback.format_exc()))
    else:
        events.put(("done", index, measured))


def _wait_for(events: Any, processes: list[Any], kind: str) -> list[Any]:
    """Each process's ``kind`` message, in process order; BenchError if one fails or dies first."""
    details: dict[int, Any] = {}
    while len(details) < len(processes):
        try:
            got, index, detail = events.get(timeout=0.5)
        except queue.Empty:
            for i, process in enumerate(processes):
                if i not in details and process.exitcode is not None:
                    raise BenchError(f"load process {i} exited with status {process.exitcode}") from None
            continue
        if got == "error":
            raise BenchError(detail)
        details[index] = detail
    return [details[i] for i in range(len(processes))]


def _run_processes(plans: list[_Plan]) -> list[_Measured]:
    context = multiprocessing.get_context("spawn")  # forking after gRPC has run in this process is unsafe
    events, starts = context.Queue(), context.Queue()
    processes = [
        context.Process(target=_process_main, args=(plan, i, events, starts), daemon=True, name=f"bench-{i}")
        for i, plan in enumerate(plans)
    ]
    try:
        for process in processes:
            process.start()
        _wait_for(events, processes, "ready")
        start = time.monotonic_ns() + _START_MARGIN_NS
        for _ in processes:
            starts.put(start)
        measured: list[_Measured] = _wait_for(events, processes, "done")
        return measured
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()


# ---- the report ------------------------------------------------------------------------------------------------


def _summary(args: argparse.Namespace, plans: list[_Plan], measured: list[_Measured]) -> dict[str, Any]:
    latencies = np.concatenate([m.latencies_ns for m in measured]) / 1e6
    errors: Counter[str] = Counter()
    messages: dict[str, str] = {}
    for m in measured:
        errors.update(m.errors)
        for code, message in m.messages.items():
            messages.setdefault(code, message)
    duration = max(m.elapsed_ns for m in measured) / 1e9
    succeeded, failed = len(latencies), sum(errors.values())
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]).tolist() if succeeded else (None, None, None)
    return {
        "target": plans[0].address,
        "model": args.model,
        "api": args.api,
        "stream": bool(args.stream),
        "concurrency": sum(p.concurrency for p in plans),
        "processes": len(plans),
        "channels": plans[0].channels,
        "streams": sum(len(_stream_depths(p)) for p in plans) if args.stream else 0,
        "stream_depth": max(max(_stream_depths(p)) for p in plans) if args.stream else None,
        "batch": args.batch,
        "warmup_s": plans[0].warmup_ns / 1e9,
        "duration_s": duration,
        "window_monotonic_s": _window(plans[0], [m.began_ns for m in measured], duration),
        "requests": succeeded + failed,
        "failed": failed,
        "images": succeeded * args.batch,
        "requests_per_s": succeeded / duration if duration else 0.0,
        "images_per_s": succeeded * args.batch / duration if duration else 0.0,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": float(latencies.max()) if succeeded else None,
        "mean_ms": float(latencies.mean()) if succeeded else None,
        "errors": dict(sorted(errors.items())),
        "error_messages": dict(sorted(messages.items())),
    }


def _window(plan: _Plan, began_ns: Sequence[int], duration_s: float) -> list[float] | None:
    """The seconds any process measured, as [from, to] on time.monotonic()'s clock; None when the run counts
    requests. That clock is CLOCK_MONOTONIC on Linux, one for all processes on the machine, so whoever ran the
    benchmark can match it with its own time.monotonic() readings (CPU samples, say) and leave out start-up and
    warm-up."""
    if plan.duration_ns is None:
        return None
    return [(min(began_ns) + plan.warmup_ns) / 1e9, (max(began_ns) + plan.warmup_ns) / 1e9 + duration_s]


def _table(summary: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.2f} ms"

    stream = "no"
    if summary["stream"]:
        stream = f"yes: {summary['streams']} stream(s), up to {summary['stream_depth']} requests in flight on each"
    errors = ", ".join(f"{code} {count:,}" for code, count in summary["errors"].items()) or "none"
    rows = [
        ("target", summary["target"]),
        ("model", summary["model"]),
        ("api", summary["api"]),
        ("stream", stream),
        ("concurrency", f"{summary['concurrency']}"),
        ("processes", f"{summary['processes']} ({summary['channels']} channel(s) each)"),
        ("batch", f"{summary['batch']} image(s) per request"),
        ("duration", f"{summary['duration_s']:,.2f} s (after {summary['warmup_s']:g} s warm-up)"),
        ("requests", f"{summary['requests']:,} ({summary['failed']:,} failed)"),
        ("images", f"{summary['images']:,}"),
        ("requests/s", f"{summary['requests_per_s']:,.1f}"),
        ("images/s", f"{summary['images_per_s']:,.1f}"),
        ("latency p50", ms(summary["p50_ms"])),
        ("latency p90", ms(summary["p90_ms"])),
        ("latency p99", ms(summary["p99_ms"])),
        ("latency max", ms(summary["max_ms"])),
        ("errors", errors),
    ]
    lines = [f"{name:<13} {value}" for name, value in rows]
    lines += [f"  {code}: {message}" for code, message in summary["error_messages"].items()]
    return "\n".join(lines)


# ---- the command -----------------------------------------------------------------------------------------------


def _plans(args: argparse.Namespace, tls: _Pems | None, payloads: list[bytes]) -> list[_Plan]:
    processes = args.processes or min(os.cpu_count() or 1, math.ceil(args.concurrency / 64))
    processes = min(processes, args.concurrency, args.requests or args.concurrency)
    warmup = args.warmup if args.warmup is not None else (0.0 if args.requests else 1.0)
    duration = None if args.requests else (args.duration if args.duration is not None else 10.0)
    if duration is not None and duration <= 0:
        raise BenchError("--duration must be more than 0 seconds")
    base = _Plan(
        address=args.server,
        tls=tls,
        api=args.api,
        stream=args.stream,
        payloads=payloads,
        first_payload=0,
        concurrency=0,
        channels=args.channels,
        stream_depth=args.stream_depth,
        warmup_ns=round(warmup * 1e9),
        duration_ns=None if duration is None else round(duration * 1e9),
        requests=None,
        timeout=args.timeout,
    )
    plans = []
    for i in range(processes):
        concurrency = args.concurrency // processes + (i < args.concurrency % processes)
        requests = None if not args.requests else args.requests // processes + (i < args.requests % processes)
        first = (i * args.concurrency // processes) % len(payloads)
        plans.append(replace(base, first_payload=first, concurrency=concurrency, requests=requests))
    return plans


def run_bench(args: argparse.Namespace) -> int:
    """Run ``classify bench``; 0 when every request succeeded, 1 when some failed, 2 when it cannot run."""
    try:
        target = asyncio.run(_describe(args))
        tls = _read_tls(args)
        images = _load_images(args.images, target, args.api)
        payloads = _payloads(images, bool(args.images), target, args.api, args.batch)
        plans = _plans(args, tls, payloads)
        if len(plans) == 1:  # no process to spawn: run the load here
            measured = [asyncio.run(_run_plan(plans[0], lambda: None, time.monotonic_ns))]
        else:
            measured = _run_processes(plans)
    except BenchError as exc:
        print(f"classify bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("classify bench: interrupted", file=sys.stderr)
        return 130
    summary = _summary(args, plans, measured)
    print(json.dumps(summary) if args.json else _table(summary))
    return 1 if summary["failed"] else 0
