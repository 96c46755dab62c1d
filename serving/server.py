"""Wiring and lifecycle: build the services on one gRPC server, load the models, serve, drain on a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, start_http_server

from serving.dataplane import DataPlane
from serving.images import ImageLimits
from serving.metrics import Metrics
from serving.pem import PemError, read_pem
from serving.protos import DESCRIPTOR_POOL
from serving.protos.classify.v1 import classify_pb2, classify_pb2_grpc
from serving.protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from serving.repository import ModelRepository
from serving.runtime import ProviderSelector
from serving.services.classify import ClassifierService
from serving.services.inference import InferenceService
from serving.settings import Settings

__all__ = ["ClassifyServer", "StartupError", "serve"]

_log = logging.getLogger(__name__)
_QUIET_SECONDS = 0.3  # no request in flight or started for this long: the drain is over
_FLUSH_SECONDS = 1.0  # then the last responses have this long to go out before open streams are cut
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_NAMES = (
    classify_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)


class StartupError(RuntimeError):
    """The server cannot start (a port is taken, a certificate unreadable); the message says which."""


class ClassifyServer:
    """One process's server: every gRPC service on one port, models loaded from the repository."""

    def __init__(
        self, settings: Settings, registry: CollectorRegistry | None = None, engine: str | None = None
    ) -> None:
        """``engine``: with ``--workers N``, the socket of the process that holds the model sessions."""
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.repository = ModelRepository(
            settings.model_repository,
            ProviderSelector(settings.device),
            self.metrics,
            drain_grace=settings.grace_period,
            engine=engine,
        )
        self.decode_threads = settings.decode_pool_size()  # read once: a container's CPU limit can change
        self.decode_executor = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        limits = ImageLimits(max_encoded_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.dataplane = DataPlane(self.repository, self.metrics, self.decode_executor, limits)
        self.health = health.aio.HealthServicer()
        self._servers: list[grpc.aio.Server] = []
        self.port = 0  # the bound ports (useful when settings ask for port 0)
        self.health_port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._stopped = asyncio.Event()

    def _options(self) -> list[tuple[str, int]]:
        size = self.settings.max_message_bytes
        return [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 1 if self.settings.workers > 1 else 0),
        ]

    def _credentials(self) -> grpc.ServerCredentials | None:
        settings = self.settings
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        try:
            client_ca = read_pem("--tls-client-ca", settings.tls_client_ca) if settings.tls_client_ca else None
            key_and_chain = (read_pem("--tls-key", settings.tls_key), read_pem("--tls-cert", settings.tls_cert))
        except PemError as exc:
            raise StartupError(str(exc)) from None
        return grpc.ssl_server_credentials(
            [key_and_chain], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    async def start(self) -> None:
        """Listen at once (health answers NOT_SERVING and ServerLive true while models load), then load them."""
        for service in ("", *_SERVICE_NAMES):
            await self.health.set(service, _NOT_SERVING)
        server = grpc.aio.server(options=self._options())
        classify_pb2_grpc.add_ClassifierServicer_to_server(ClassifierService(self.dataplane), server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(self.dataplane), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        _enable_reflection(server)
        credentials = self._credentials()
        self.port = _bind(server, self.settings.host, self.settings.port, credentials)
        self._servers.append(server)
        if self.settings.health_port:
            probe = grpc.aio.server(options=self._options())
            health_pb2_grpc.add_HealthServicer_to_server(self.health, probe)
            self.health_port = _bind(probe, self.settings.host, self.settings.health_port, None)
            self._servers.append(probe)
        for each in self._servers:
            await each.start()
        if self.settings.metrics_port:
            try:
                self._metrics_server, _ = start_http_server(
                    self.settings.metrics_port, addr=self.settings.host, registry=self.registry
                )
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {self.settings.host}:{self.settings.metrics_port}: "
                                   f"{exc.strerror}") from None  # fmt: skip
            self.metrics_port = self._metrics_server.server_port
        _log.info(
            "listening on %s port %d (%s), metrics port %d, health port %d; decode threads: %d",
            self.settings.host, self.port, "TLS" if credentials else "plaintext", self.metrics_port, self.health_port,
            self.decode_threads,
        )  # fmt: skip
        await self.repository.load_all()
        if self.repository.ready:
            for service in ("", *_SERVICE_NAMES):
                await self.health.set(service, _SERVING)
            _log.info("ready: %s", ", ".join(self.repository.names()))

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, finish in-flight requests within ``grace``, stop listening, release models.

        Requests keep being served until the data plane has been quiet for a moment: clients that have not yet
        seen NOT_SERVING (or a load balancer still sending) are answered rather than cut off.
        """
        grace = self.settings.grace_period if grace is None else grace
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.health.enter_graceful_shutdown()
        drained = await self.dataplane.wait_quiet(_QUIET_SECONDS, grace)
        _log.info("in-flight requests %s", "finished" if drained else f"cut off after {grace:.0f} s")
        # What may remain are idle streams and health watches; give responses a moment to go out, then end them.
        await asyncio.gather(*(server.stop(_FLUSH_SECONDS) for server in self._servers))
        await self.repository.close()
        self.decode_executor.shutdown(wait=False, cancel_futures=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        _log.info("stopped after %.2f s", loop.time() - started)
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


def _bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    address = f"{host}:{port}"
    try:
        return server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        if credentials is not None:  # gRPC checks the certificate, key and CA only here, and says so only in its log
            raise StartupError(
                f"cannot serve TLS on {address}: gRPC refused the certificate setup (--tls-cert must hold the "
                "chain for --tls-key's private key; --tls-client-ca a PEM CA bundle), or the port is taken"
            ) from None
        raise StartupError(f"cannot listen on {address}: is the port in use, or the address not local?") from None


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection (grpcurl) over our own descriptor pool, which also needs health's and reflection's files."""
    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        try:
            DESCRIPTOR_POOL.FindFileByName(file.name)
        except KeyError:
            DESCRIPTOR_POOL.AddSerializedFile(file.serialized_pb)
    names = (*_SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=DESCRIPTOR_POOL)


async def serve(settings: Settings, engine: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain; a second signal exits at once."""
    server = ClassifyServer(settings, engine=engine)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if stopping:
            _log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        _log.info("%s: draining (up to %.0f s)", signal.Signals(signum).name, settings.grace_period)
        stopping.append(loop.create_task(server.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.start()
    except BaseException:
        await server.stop(grace=0)
        raise
    await server.wait()
