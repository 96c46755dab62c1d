"""Real servers for the serving tests: ``classify-server`` processes on free loopback ports, small repositories."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.protos.inference import model_config_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120.0
_LISTENING = re.compile(r"listening on \S+ port (\d+) \((\w+)\), metrics port (\d+), health port (\d+)")
# Small batches keep warm-up (every bucket on every instance) quick on a 2-core CI machine.
SMALL_BATCHING = {
    "digits": {"max_batch_size": 16, "delay_us": 2000, "max_queue_size": 256, "instances": 1},
    "catdog": {"max_batch_size": 4, "delay_us": 2000, "max_queue_size": 64, "instances": 1},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_repository(root: Path, batching: Mapping[str, Mapping[str, int]] = SMALL_BATCHING) -> Path:
    """Copy the committed models into ``root`` with the given batching settings written into config.pbtxt."""
    for name, settings in batching.items():
        shutil.copytree(REPO_ROOT / "models" / name, root / name)
        path = root / name / "config.pbtxt"
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        config.max_batch_size = settings["max_batch_size"]
        config.dynamic_batching.max_queue_delay_microseconds = settings["delay_us"]
        config.dynamic_batching.default_queue_policy.max_queue_size = settings["max_queue_size"]
        del config.instance_group[:]
        config.instance_group.add(count=settings["instances"])
        path.write_text(text_format.MessageToString(config))
    return root


def digits_with_parameters(root: Path, parameters: Mapping[str, str]) -> Path:
    """A copy of the committed digits model in ``root`` with ``parameters`` set in its config.pbtxt."""
    model_dir = root / "digits"
    shutil.copytree(REPO_ROOT / "models" / "digits", model_dir)
    path = model_dir / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    path.write_text(text_format.MessageToString(config))
    return model_dir


class ServerProcess:
    """A ``python -m serving`` child process; its log goes to a file the test can read."""

    def __init__(self, args: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *args],
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.port = self.metrics_port = self.health_port = 0
        self.tls = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log)
            if match:
                self.port, self.metrics_port, self.health_port = int(match[1]), int(match[3]), int(match[4])
                self.tls = match[2] == "TLS"
                return
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log}")
            time.sleep(0.05)
        raise AssertionError(f"server did not start listening within {START_TIMEOUT}s:\n{self.log}")

    def wait_serving(self, channel_factory: Callable[[str], grpc.Channel] = grpc.insecure_channel) -> None:
        """Wait until the health service says SERVING (every model loaded and warmed up)."""
        self.wait_listening()
        address = f"127.0.0.1:{self.health_port}" if self.tls else self.address
        deadline = time.monotonic() + START_TIMEOUT
        with channel_factory(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                time.sleep(0.1)
        raise AssertionError(f"server not SERVING within {START_TIMEOUT}s:\n{self.log}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers for one test; every one still running at the end is killed."""
    started: list[ServerProcess] = []

    def start(*args: str, env: Mapping[str, str] | None = None, serving: bool = True, **kwargs: Any) -> ServerProcess:
        server = ServerProcess(list(args), tmp_path / f"server-{len(started)}.log", env)
        started.append(server)
        if serving:
            server.wait_serving(**kwargs)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed models with small batches, shared by the tests that only read from the server."""
    return write_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on the CPU for the whole session, with metrics; tests must not change its state."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(
        ["--model-repository", str(repository), "--device", "cpu", "--metrics-port", str(free_port())], log
    )
    try:
        process.wait_serving()
        yield process
    finally:
        process.stop()
