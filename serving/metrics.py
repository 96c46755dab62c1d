"""Prometheus metrics, named after Triton's where it has a counterpart, on a registry the caller owns."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.engine_merge import EngineRun

__all__ = ["Metrics", "ModelMetrics"]

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    """Every metric the server exports; ``for_model`` hands out the per-model-version view the batcher feeds."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("model", "version")
        self.success = Counter("nv_inference_request_success", "Requests that succeeded", labels, registry=registry)
        self.failure = Counter(
            "nv_inference_request_failure", "Requests that failed, by gRPC status", (*labels, "reason"),
            registry=registry,
        )  # fmt: skip
        self.inferences = Counter("nv_inference_count", "Images inferred", labels, registry=registry)
        self.executions = Counter("nv_inference_exec_count", "Model executions (batches)", labels, registry=registry)
        self.pending = Gauge(
            "nv_inference_pending_request_count", "Requests queued, not yet running", labels, registry=registry
        )

        def histogram(name: str, documentation: str, buckets: tuple[float, ...], *extra: str) -> Histogram:
            return Histogram(name, documentation, (*labels, *extra), buckets=buckets, registry=registry)

        self.request_latency = histogram(
            "classify_request_duration_seconds", "Request latency inside the server, by gRPC status",
            _LATENCY_BUCKETS, "status",
        )  # fmt: skip
        self.queue_time = histogram(
            "classify_queue_duration_seconds", "Time a request waited before its first execution", _LATENCY_BUCKETS
        )
        self.compute_time = histogram(
            "classify_compute_infer_duration_seconds", "Time of one model execution", _LATENCY_BUCKETS
        )
        self.batch_size = histogram("classify_batch_size", "Images per model execution", _BATCH_BUCKETS)
        # With --workers N an execution goes through the engine process, which joins the batches workers send at
        # once: per batch sent, its wait there for a model instance, the joined run that answered it and the
        # model's own part of that run (the rest is the engine joining inputs and splitting outputs), by the
        # model instance that ran it (the counts show how the runs spread over the instances). Not "instance":
        # Prometheus gives every scraped series that label itself, for the address it scraped.
        self.engine_wait = histogram(
            "classify_engine_wait_duration_seconds", "Time a batch waited in the engine for its model instance",
            _LATENCY_BUCKETS, "model_instance",
        )  # fmt: skip
        self.engine_run = histogram(
            "classify_engine_run_duration_seconds",
            "Time of the engine run that answered a batch (for a split batch, the later of its runs to end)",
            _LATENCY_BUCKETS, "model_instance",
        )  # fmt: skip
        self.engine_infer = histogram(
            "classify_engine_infer_duration_seconds",
            "Time of the model call (session, device copies) within the engine run that answered a batch (for a "
            "split batch, the later of its runs to end)",
            _LATENCY_BUCKETS, "model_instance",
        )  # fmt: skip
        self.engine_run_size = histogram(
            "classify_engine_run_size", "Images in the engine run that answered a batch", _BATCH_BUCKETS,
            "model_instance",
        )  # fmt: skip
        # Per encoded image: its wait for a decode thread (behind other requests' images and its own request's,
        # so a request of more images than threads waits even alone), the decode's wall time on that thread, and
        # the thread's CPU time in it. Where the wall time runs ahead of the CPU time the thread was ready but
        # not running: waiting for its process's GIL or for a core.
        self.decode_wait = histogram(
            "classify_decode_wait_duration_seconds",
            "Time an encoded image waited for a decode thread, behind other images of its own request or others",
            _LATENCY_BUCKETS,
        )
        self.decode_time = histogram(
            "classify_decode_duration_seconds", "Wall time of one image's decode on its thread", _LATENCY_BUCKETS
        )
        self.decode_cpu = Counter(
            "classify_decode_cpu_seconds", "CPU time the decode threads spent decoding", labels, registry=registry
        )
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    def for_model(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version)

    def request(self, model: str, version: str, status: str, seconds: float) -> None:
        """One finished request at the API edge, ``status`` being the gRPC status name (``OK`` on success)."""
        key = (model, version, status)
        children = self._request_children.get(key)
        if children is None:  # labels() costs a locked lookup: once per label set, not once per request
            counter = self.success.labels(model, version) if status == "OK" else self.failure.labels(*key)
            children = self._request_children[key] = (counter, self.request_latency.labels(*key))
        children[0].inc()
        children[1].observe(seconds)


@dataclass
class ModelMetrics:
    """The batcher's observer for one model version (see ``serving.batching.BatchObserver``)."""

    metrics: Metrics
    model: str
    version: str

    def __post_init__(self) -> None:
        m, labels = self.metrics, (self.model, self.version)
        self._inferences = m.inferences.labels(*labels)
        self._executions = m.executions.labels(*labels)
        self._compute = m.compute_time.labels(*labels)
        self._batch = m.batch_size.labels(*labels)
        self._queue = m.queue_time.labels(*labels)
        self._engine_children: list[tuple[Histogram, Histogram, Histogram, Histogram]] = []
        self._decode_wait = m.decode_wait.labels(*labels)
        self._decode_time = m.decode_time.labels(*labels)
        self._decode_cpu = m.decode_cpu.labels(*labels)
        self.pending = m.pending.labels(*labels)

    def batch_done(self, batch_size: int, compute_ns: int) -> None:
        self._inferences.inc(batch_size)
        self._executions.inc()
        self._compute.observe(compute_ns / 1e9)
        self._batch.observe(batch_size)

    def track_engine(self, instances: int) -> None:
        """Export the engine series of each of the model's ``instances`` from now on (at 0 until batches come
        back), for a model whose sessions live in the engine process: only ``--workers N`` servers have them."""
        m = self.metrics
        self._engine_children = [
            (
                m.engine_wait.labels(*labels),
                m.engine_run.labels(*labels),
                m.engine_infer.labels(*labels),
                m.engine_run_size.labels(*labels),
            )
            for labels in ((self.model, self.version, str(instance)) for instance in range(instances))
        ]

    def engine_done(self, run: EngineRun) -> None:
        """One batch back from the engine (``serving.engine_client.RemoteRuntime.observe_engine``), on the
        executor thread that sent it; ``track_engine`` made the series of the instance that ran it."""
        wait, run_time, infer_time, run_size = self._engine_children[run.instance]
        wait.observe(run.wait_ns / 1e9)
        run_time.observe(run.run_ns / 1e9)
        infer_time.observe(run.infer_ns / 1e9)
        run_size.observe(run.run_rows)

    def image_decoded(self, wait_ns: int, wall_ns: int, cpu_ns: int) -> None:
        """One encoded image decoded, or refused as unreadable, on its decode thread."""
        self._decode_wait.observe(wait_ns / 1e9)
        self._decode_time.observe(wall_ns / 1e9)
        self._decode_cpu.inc(cpu_ns / 1e9)

    def request_done(self, images: int, queue_ns: int, total_ns: int, ok: bool) -> None:
        if ok:
            self._queue.observe(queue_ns / 1e9)
