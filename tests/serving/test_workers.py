"""``--workers N``: several processes share one port, each serves, and SIGTERM stops them all cleanly."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.worker_metrics import scrape, share
from serving.protos.classify.v1 import classify_pb2 as pb
from serving.protos.classify.v1 import classify_pb2_grpc
from tests.serving.conftest import ServerProcess, free_port, write_repository

WORKERS = 2
CONNECTIONS = 24


def _samples(metrics_port: int) -> dict[str, float]:
    """Each sample's value by its name, summed over label sets (one model here), and by name and instance for
    the samples that name an engine instance (``name{model_instance=N}``)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names = [sample.name]
            if "model_instance" in sample.labels:
                names.append(f"{sample.name}{{model_instance={sample.labels['model_instance']}}}")
            for name in names:
                totals[name] = totals.get(name, 0.0) + sample.value
    return totals


def test_workers_share_the_port_and_all_serve(start_server: object, tmp_path: Path) -> None:
    """One Python process cannot use a big machine; N workers must all take connections on the same port."""
    repository = write_repository(
        tmp_path / "models", {"digits": {"max_batch_size": 16, "delay_us": 2000, "max_queue_size": 256, "instances": 2}}
    )
    metrics_base = free_port()
    port = free_port()
    server: ServerProcess = start_server(  # type: ignore[operator]
        "--model-repository", str(repository), "--device", "cpu", "--port", str(port),
        "--workers", str(WORKERS), "--metrics-port", str(metrics_base),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while server.log.count("serving.server: ready:") < WORKERS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log.count("serving.server: ready:") == WORKERS, server.log

    request = pb.ClassifyRequest(
        model="digits", images=[pb.Image(raw=pb.RawImage(data=np.zeros(784, np.uint8).tobytes(), shape=[28, 28, 1]))]
    )
    metrics_ports = [metrics_base + index for index in range(WORKERS)]
    before = [scrape(metrics_port) for metrics_port in metrics_ports]
    for _ in range(CONNECTIONS):  # separate TCP connections: the kernel spreads connections, not calls
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            classify_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=30)

    samples = [_samples(metrics_base + index) for index in range(WORKERS)]
    served = [worker["nv_inference_request_success_total"] for worker in samples]
    assert sum(served) == CONNECTIONS
    assert all(count > 0 for count in served), f"requests per worker: {served}"
    for worker in samples:  # every execution went through the engine, which says where its time went
        assert worker["classify_engine_run_duration_seconds_count"] == worker["classify_batch_size_count"]
        assert worker["classify_engine_run_size_sum"] >= worker["classify_batch_size_sum"]
        assert (
            0
            < worker["classify_engine_run_duration_seconds_sum"]
            <= worker["classify_compute_infer_duration_seconds_sum"]
        )
        assert worker["classify_engine_infer_duration_seconds_count"] == worker["classify_batch_size_count"]
        assert (
            0
            < worker["classify_engine_infer_duration_seconds_sum"]
            <= worker["classify_engine_run_duration_seconds_sum"]
        ), "the model's part of each run is within the run"
        by_instance = [worker[f"classify_engine_run_duration_seconds_count{{model_instance={i}}}"] for i in (0, 1)]
        assert sum(by_instance) == worker["classify_batch_size_count"], "each batch counted under its instance"
    for metrics_port, scraped in zip(metrics_ports, before, strict=True):  # as the benchmarks read them
        worker_share = share(metrics_port, scraped, scrape(metrics_port))
        assert worker_share.engine_run_ms is not None
        assert worker_share.engine_infer_ms is not None
        assert 0 < worker_share.engine_infer_ms <= worker_share.engine_run_ms

    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0, server.log
    assert server.log.count("stopped after") == WORKERS


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    """With port 0 every worker would listen somewhere else: refuse it up front."""
    import subprocess
    import sys

    from tests.serving.conftest import REPO_ROOT

    result = subprocess.run(
        [sys.executable, "-m", "serving", "--workers", "2", "--port", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--workers above 1 needs a fixed --port" in result.stderr
