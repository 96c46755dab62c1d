"""``--workers N``: N server processes on one port (SO_REUSEPORT), each with its own sessions and batchers.

One Python process tops out at a few thousand gRPC calls a second; the kernel spreads connections over the
workers. The parent only starts them, forwards SIGTERM/SIGINT, and reports the worst exit status.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
from types import FrameType

from serving.settings import Settings

__all__ = ["run_workers", "worker_settings"]

_log = logging.getLogger(__name__)


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: the same gRPC and health ports, its own metrics port (base + index)."""
    metrics_port = settings.metrics_port + index if settings.metrics_port else 0
    return dataclasses.replace(settings, metrics_port=metrics_port)


def _worker(settings: Settings, index: int) -> None:
    from serving.cli import run_server  # imported in the child: nothing of ONNX Runtime is inherited
    from serving.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    raise SystemExit(run_server(worker_settings(settings, index)))


def run_workers(settings: Settings) -> int:
    """Run ``settings.workers`` server processes until they exit; returns the worst exit status."""
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(settings, index), name=f"classify-worker-{index}")
        for index in range(settings.workers)
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    for worker in workers:
        worker.start()
    _log.info("started %d workers on port %d: pids %s", len(workers), settings.port, [w.pid for w in workers])
    for worker in workers:
        worker.join()
    codes = [worker.exitcode or 0 for worker in workers]
    return max(codes, key=abs)
