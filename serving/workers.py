"""``--workers N``: N gRPC server processes on one port (SO_REUSEPORT) and one engine process for the models.

One Python process tops out at a few thousand gRPC calls a second, so N processes share the port and the
kernel spreads connections over them; each decodes, validates and batches its own requests. The batches run
in one engine process (``serving.engine``) that holds every ONNX Runtime session: one CUDA context, instead of
N contexts taking turns on the GPU. The parent starts the engine, then the workers; it forwards SIGTERM/SIGINT
to the workers, stops the engine once they have drained, and reports the worst exit status.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from serving.settings import Settings

__all__ = ["run_workers", "worker_settings"]

_log = logging.getLogger(__name__)
_ENGINE_START_TIMEOUT = 60.0


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: the same gRPC and health ports, its own metrics port (base + index)."""
    metrics_port = settings.metrics_port + index if settings.metrics_port else 0
    return dataclasses.replace(settings, metrics_port=metrics_port)


def _worker(settings: Settings, index: int, engine: str) -> None:
    from serving.cli import run_server  # imported in the child: nothing of ONNX Runtime is inherited
    from serving.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    raise SystemExit(run_server(worker_settings(settings, index), engine))


def _engine(settings: Settings, address: str) -> None:
    from serving.engine import run_engine
    from serving.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    run_engine(address, settings.device)


def _start_engine(context: multiprocessing.context.SpawnContext, settings: Settings, address: Path) -> BaseProcess:
    engine = context.Process(target=_engine, args=(settings, str(address)), name="classify-engine")
    engine.start()
    give_up = time.monotonic() + _ENGINE_START_TIMEOUT
    while not address.exists():
        if not engine.is_alive() or time.monotonic() > give_up:
            engine.kill()
            raise RuntimeError("the engine process did not start")
        time.sleep(0.01)
    return engine


def run_workers(settings: Settings) -> int:
    """Run the engine and ``settings.workers`` server processes until the workers exit; the worst exit status."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="classify-engine-") as folder:
        address = Path(folder) / "engine.sock"
        try:
            engine = _start_engine(context, settings, address)
        except RuntimeError as exc:
            _log.error("%s", exc)
            return 2
        workers = [
            context.Process(target=_worker, args=(settings, index, str(address)), name=f"classify-worker-{index}")
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
        _log.info(
            "started %d workers on port %d: pids %s; engine pid %s",
            len(workers), settings.port, [w.pid for w in workers], engine.pid,
        )  # fmt: skip
        for worker in workers:
            worker.join()
        engine.terminate()
        engine.join()
    codes = [worker.exitcode or 0 for worker in workers]
    return max(codes, key=abs)
