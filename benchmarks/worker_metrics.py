"""Each worker's share of a load run, from its Prometheus ``/metrics`` before and after the run.

Workers share the gRPC port by connection, so one can be busy while another has nothing to do; and a
request's time inside a worker splits into what comes before the batcher (decoding, conversion), the wait in
the batcher's queue and the model execution, which through the engine splits again into the wait for the
model instance there and the joined run, of which the model call is one part. All show here, per worker,
where the totals of a run hide them.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "WorkerShare",
    "decode_split",
    "engine_split",
    "first_instance_share",
    "free_port_run",
    "idle_workers",
    "inside_server",
    "scrape",
    "share",
]

# (sample name, the label a sample must carry with its value (None: any value), or None): what a share is
# computed from
_SAMPLES: dict[str, tuple[str, tuple[str, str | None] | None]] = {
    "requests": ("nv_inference_request_success_total", None),
    "request_s": ("classify_request_duration_seconds_sum", ("status", "OK")),
    "request_n": ("classify_request_duration_seconds_count", ("status", "OK")),
    "queue_s": ("classify_queue_duration_seconds_sum", None),
    "queue_n": ("classify_queue_duration_seconds_count", None),
    "compute_s": ("classify_compute_infer_duration_seconds_sum", None),
    "compute_n": ("classify_compute_infer_duration_seconds_count", None),
    "images": ("classify_batch_size_sum", None),
    "engine_wait_s": ("classify_engine_wait_duration_seconds_sum", None),
    "engine_run_s": ("classify_engine_run_duration_seconds_sum", None),
    "engine_infer_s": ("classify_engine_infer_duration_seconds_sum", None),
    "engine_infer_n": ("classify_engine_infer_duration_seconds_count", None),
    "engine_n": ("classify_engine_run_duration_seconds_count", None),
    "engine_n_labelled": ("classify_engine_run_duration_seconds_count", ("model_instance", None)),
    "engine_n_first": ("classify_engine_run_duration_seconds_count", ("model_instance", "0")),
    "engine_images": ("classify_engine_run_size_sum", None),
    "decode_wait_s": ("classify_decode_wait_duration_seconds_sum", None),
    "decode_s": ("classify_decode_duration_seconds_sum", None),
    "decode_n": ("classify_decode_duration_seconds_count", None),
    "decode_cpu_s": ("classify_decode_cpu_seconds_total", None),
}


@dataclass(frozen=True)
class WorkerShare:
    """One worker's part of a run; means are over the run's requests or executions, None where it had none."""

    metrics_port: int
    requests: int  # answered OK
    request_ms: float | None  # mean time inside the server per request: decode, queue and execution
    queue_ms: float | None  # mean wait in the batcher before a request's first execution
    compute_ms: float | None  # mean time of one model execution (through the engine with --workers N)
    batch: float | None  # mean images per execution
    # With --workers N, per batch sent to the engine: its wait there for the instance, and the joined run
    # that answered it (time, the model's part of it, and images); None without the engine
    engine_batches: int = 0
    engine_labelled_batches: int = 0  # of those, the batches counted by model instance (servers from 9f1b081 on)
    engine_first_instance_batches: int = 0  # and of those, the batches the model's instance 0 ran
    engine_wait_ms: float | None = None
    engine_run_ms: float | None = None
    engine_infer_ms: float | None = None  # None also from a server whose engine does not report it
    engine_run_images: float | None = None
    # Per encoded image: its wait for a decode thread, the decode's wall time and its thread's CPU time in it
    decoded: int = 0
    decode_wait_ms: float | None = None
    decode_ms: float | None = None
    decode_cpu_ms: float | None = None


def free_port_run(count: int, attempts: int = 50) -> int:
    """The first of ``count`` consecutive loopback ports that are free now (worker i serves metrics on base + i)."""
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        if base + count <= 65536 and all(_free(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found in {attempts} tries")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def scrape(port: int) -> dict[str, float]:
    """The totals a share is computed from, summed over every model the worker serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = dict.fromkeys(_SAMPLES, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for total, (name, label) in _SAMPLES.items():
                if sample.name == name and (label is None or _carries(sample.labels, *label)):
                    totals[total] += sample.value
    return totals


def _carries(labels: Mapping[str, str], key: str, value: str | None) -> bool:
    return key in labels if value is None else labels.get(key) == value


def share(port: int, before: dict[str, float], after: dict[str, float]) -> WorkerShare:
    """What the worker on metrics ``port`` did between two scrapes."""
    run = {key: after[key] - before[key] for key in _SAMPLES}

    def mean(total: str, count: str, scale: float) -> float | None:
        return scale * run[total] / run[count] if run[count] else None

    return WorkerShare(
        metrics_port=port,
        requests=round(run["requests"]),
        request_ms=mean("request_s", "request_n", 1e3),
        queue_ms=mean("queue_s", "queue_n", 1e3),
        compute_ms=mean("compute_s", "compute_n", 1e3),
        batch=mean("images", "compute_n", 1.0),
        engine_batches=round(run["engine_n"]),
        engine_labelled_batches=round(run["engine_n_labelled"]),
        engine_first_instance_batches=round(run["engine_n_first"]),
        engine_wait_ms=mean("engine_wait_s", "engine_n", 1e3),
        engine_run_ms=mean("engine_run_s", "engine_n", 1e3),
        engine_infer_ms=mean("engine_infer_s", "engine_infer_n", 1e3),
        engine_run_images=mean("engine_images", "engine_n", 1.0),
        decoded=round(run["decode_n"]),
        decode_wait_ms=mean("decode_wait_s", "decode_n", 1e3),
        decode_ms=mean("decode_s", "decode_n", 1e3),
        decode_cpu_ms=mean("decode_cpu_s", "decode_n", 1e3),
    )


def idle_workers(shares: Sequence[Mapping[str, Any]]) -> int | None:
    """How many workers answered nothing in a run (from its rows' ``asdict`` shares); None without shares."""
    return sum(1 for worker in shares if not worker["requests"]) if shares else None


def inside_server(shares: Sequence[Mapping[str, Any]], client_mean_ms: float | None) -> float | None:
    """The part of a request's mean latency, as its client measured it, spent inside the workers' handlers
    (decoding, batcher queue, execution); the rest is the gRPC layer's, both ends, and the client's. None
    without shares or a client mean."""
    inside = _weighted_mean(shares, "request_ms", "requests")
    return inside / client_mean_ms if inside is not None and client_mean_ms else None


def engine_split(shares: Sequence[Mapping[str, Any]]) -> tuple[float, ...] | None:
    """Over every batch the workers sent to the engine: the mean wait there for the instance (ms), the mean run
    that answered it (ms), the model's own part of that run (ms) and the run's mean images. None without the
    engine, or from one that does not report the model's part."""
    keys = ("engine_wait_ms", "engine_run_ms", "engine_infer_ms", "engine_run_images")
    return _weighted_means(shares, keys, "engine_batches")


def first_instance_share(shares: Sequence[Mapping[str, Any]]) -> float | None:
    """The part of every batch the workers sent to the engine that the model's instance 0 ran: 1 / instances
    when the workers spread them evenly. None without the engine, or from a server that does not count batches
    by instance."""
    batches = sum(worker.get("engine_labelled_batches", 0) for worker in shares)
    first = sum(worker.get("engine_first_instance_batches", 0) for worker in shares)
    return first / batches if batches else None


def decode_split(shares: Sequence[Mapping[str, Any]]) -> tuple[float, ...] | None:
    """Over every encoded image the workers decoded: the mean wait for a decode thread (ms), the mean decode's
    wall time (ms) and its thread's CPU time in it (ms). None where nothing was decoded."""
    return _weighted_means(shares, ("decode_wait_ms", "decode_ms", "decode_cpu_ms"), "decoded")


def _weighted_means(
    shares: Sequence[Mapping[str, Any]], keys: tuple[str, ...], weight: str
) -> tuple[float, ...] | None:
    """``_weighted_mean`` of each of ``keys``; None if any is None."""
    means: list[float] = []
    for key in keys:
        mean = _weighted_mean(shares, key, weight)
        if mean is None:
            return None
        means.append(mean)
    return tuple(means)


def _weighted_mean(shares: Sequence[Mapping[str, Any]], key: str, weight: str) -> float | None:
    """The workers' ``key`` means joined into one, each weighted by its ``weight`` count; None if all counts are 0
    or a counted worker's ``key`` is None (a server that does not report it)."""
    counted = [worker for worker in shares if worker.get(weight)]
    if any(worker[key] is None for worker in counted):
        return None
    total = sum(worker[weight] for worker in counted)
    return float(sum(worker[key] * worker[weight] for worker in counted) / total) if total else None
