"""The classify.v1 Classifier service: a thin adapter over the data plane."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from serving.dataplane import DataPlane
from serving.protos.classify.v1 import classify_pb2 as pb
from serving.protos.classify.v1 import classify_pb2_grpc
from serving.repository import ModelState
from serving.services.classify_converters import classification_response, error_response, images_of, model_info
from serving.services.common import answer_stream, deadline_of, grpc_errors

__all__ = ["DEFAULT_TOP_K", "ClassifierService"]

DEFAULT_TOP_K = 1

Context = grpc.aio.ServicerContext[Any, Any]


class ClassifierService(classify_pb2_grpc.ClassifierServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        top_k = request.top_k if request.HasField("top_k") else DEFAULT_TOP_K
        served, results = await self.dataplane.classify(
            request.model, request.version, images_of(request), top_k, deadline
        )
        return classification_response(request, served, results)

    @grpc_errors
    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        return await self._classify(request, deadline_of(context))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: Context
    ) -> AsyncIterator[pb.ClassifyResponse]:
        deadline = deadline_of(context)
        async for response in answer_stream(
            request_iterator,
            lambda request: self._classify(request, deadline),
            lambda request, status, message: error_response(request, status.name, message),
            "ClassifyStream",
        ):
            yield response

    @grpc_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        repository = self.dataplane.repository
        states = {entry.name: entry.state for entry in repository.index()}
        return pb.ListModelsResponse(
            models=[
                model_info(name, repository.versions(name), states.get(name) is ModelState.READY)
                for name in repository.names()
            ]
        )
