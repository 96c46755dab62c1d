"""The KServe v2 ``inference.GRPCInferenceService`` with Triton's extensions: a thin adapter over the data plane."""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator
from typing import Any

import grpc

from serving.dataplane import DataPlane
from serving.errors import InvalidArgument, ServiceError
from serving.model_config import ConfigError
from serving.protos.inference import grpc_service_pb2 as pb
from serving.protos.inference import grpc_service_pb2_grpc
from serving.services.common import answer_stream, deadline_of, grpc_errors
from serving.services.inference_converters import (
    index_response,
    infer_response,
    input_tensor,
    model_metadata,
    statistics_of,
    timeout_of,
)

__all__ = ["EXTENSIONS", "SERVER_NAME", "InferenceService"]

SERVER_NAME = "classify-service"
# What perf_analyzer and tritonclient look for; "statistics" makes perf_analyzer poll ModelStatistics.
EXTENSIONS = ("classification", "model_repository", "model_configuration", "statistics")

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceService(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.repository = dataplane.repository
        try:
            self.version = importlib.metadata.version("classify-service")
        except importlib.metadata.PackageNotFoundError:
            self.version = "unknown"

    @grpc_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.repository.ready)

    @grpc_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            self.repository.get(request.name, request.version)
        except ServiceError:  # unknown, loading or unloaded: not ready
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @grpc_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    @grpc_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        self.repository.get(request.name, request.version)  # NOT_FOUND / UNAVAILABLE as for inference
        return model_metadata(request.name, self.repository.versions(request.name))

    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.repository.get(request.name, request.version).spec.config)

    @grpc_errors
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        if request.name:
            served = (
                [self.repository.get(request.name, request.version)]
                if request.version
                else self.repository.versions(request.name)
            )
            if not served:
                self.repository.get(request.name)  # raises the right NOT_FOUND / UNAVAILABLE
        else:
            served = [v for name in self.repository.names() for v in self.repository.versions(name)]
        return pb.ModelStatisticsResponse(model_stats=[statistics_of(v) for v in served])

    @grpc_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        return index_response(self.repository.index(), request.ready)

    @grpc_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        try:
            await self.repository.load(request.model_name)
        except ConfigError as exc:
            raise InvalidArgument(f"failed to load {request.model_name!r}: {exc}") from None
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        timeout = timeout_of(request)
        if timeout is not None:
            own = asyncio.get_running_loop().time() + timeout
            deadline = own if deadline is None else min(deadline, own)
        served, probabilities = await self.dataplane.infer(
            request.model_name, request.model_version, lambda spec: input_tensor(request, spec), deadline
        )
        return infer_response(request, served, probabilities)

    @grpc_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        deadline = deadline_of(context)

        async def infer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))

        async for response in answer_stream(
            request_iterator,
            infer,
            lambda request, _, message: pb.ModelStreamInferResponse(
                error_message=message, infer_response=pb.ModelInferResponse(id=request.id)
            ),
            "ModelStreamInfer",
        ):
            yield response
