"""A gRPC server that does no work: the protocol layer's ceiling the real server is divided by.

It answers what the load generators call (KServe v2 ``ModelInfer``/``ModelStreamInfer`` and the metadata
perf_analyzer reads first; classify.v1 ``Classify``/``ClassifyStream``/``ListModels``) with a canned answer
of the right shape. Requests are parsed and responses serialised by the same generated protobuf classes as in
the real server, so the difference between the two is exactly the serving work: no image is checked, decoded,
batched or run. ``--workers N`` starts N processes on one port, as the real server does.

    python -m benchmarks.echo_server --port 8001 --workers 4
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from serving.model_config import ModelSpec, load_model_spec
from serving.protos.classify.v1 import classify_pb2 as cpb
from serving.protos.classify.v1 import classify_pb2_grpc
from serving.protos.inference import grpc_service_pb2 as pb
from serving.protos.inference import grpc_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
_VERSION = "1"
_OUTPUT = pb.ModelInferResponse.InferOutputTensor


class EchoInference(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 answers without inference: zero probabilities, shaped for the request's batch."""

    def __init__(self, specs: dict[str, ModelSpec]) -> None:
        self.specs = specs

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self.specs)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="echo", version=_VERSION)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        spec = await self._spec(request.name, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=[_VERSION],
            platform="onnxruntime_onnx",
            inputs=[tensor(name=spec.input_name, datatype="UINT8", shape=[-1, *_dims(spec)])],
            outputs=[tensor(name=spec.output_name, datatype="FP32", shape=[-1, len(spec.labels)])],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=(await self._spec(request.name, context)).config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        names = [request.name] if request.name else list(self.specs)
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(name=n, version=_VERSION) for n in names])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return self._answer(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self._answer(request))

    def _answer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        spec = self.specs[request.model_name]
        rows = request.inputs[0].shape[0] if request.inputs else 1
        classes = len(spec.labels)
        return pb.ModelInferResponse(
            model_name=spec.name,
            model_version=_VERSION,
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(name=spec.output_name, datatype="FP32", shape=[rows, classes])
            ],
            raw_output_contents=[bytes(4 * rows * classes)],
        )

    async def _spec(self, name: str, context: Context) -> ModelSpec:
        if name not in self.specs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}")
        return self.specs[name]


class EchoClassifier(classify_pb2_grpc.ClassifierServicer):
    """classify.v1 answers without inference: every image gets the model's first label."""

    def __init__(self, specs: dict[str, ModelSpec]) -> None:
        self.specs = specs

    async def Classify(self, request: cpb.ClassifyRequest, context: Context) -> cpb.ClassifyResponse:
        return self._answer(request)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[cpb.ClassifyRequest], context: Context
    ) -> AsyncIterator[cpb.ClassifyResponse]:
        async for request in request_iterator:
            yield self._answer(request)

    async def ListModels(self, request: cpb.ListModelsRequest, context: Context) -> cpb.ListModelsResponse:
        return cpb.ListModelsResponse(models=[_model_info(spec) for spec in self.specs.values()])

    def _answer(self, request: cpb.ClassifyRequest) -> cpb.ClassifyResponse:
        label = self.specs[request.model].labels[0]
        result = cpb.Classification(labels=[cpb.Label(label=label, index=0, score=1.0)])
        return cpb.ClassifyResponse(
            model=request.model, version=_VERSION, request_id=request.request_id, results=[result] * len(request.images)
        )


def _dims(spec: ModelSpec) -> list[int]:
    return [spec.input.height, spec.input.width, spec.input.channels]


def _model_info(spec: ModelSpec) -> cpb.ModelInfo:
    height, width, channels = _dims(spec)
    return cpb.ModelInfo(
        name=spec.name,
        versions=[_VERSION],
        ready=True,
        input=cpb.InputInfo(height=height, width=width, channels=channels, dtype="UINT8", layout="NHWC"),
        labels=spec.labels,
        max_batch_size=spec.max_batch_size,
    )


def load_specs(repository: Path) -> dict[str, ModelSpec]:
    """Every model's spec in a Triton-layout repository (what the real server would serve)."""
    return {folder.name: load_model_spec(folder) for folder in sorted(repository.iterdir()) if folder.is_dir()}


async def serve(repository: Path, port: int, reuse_port: bool) -> None:
    specs = load_specs(repository)
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(EchoInference(specs), server)
    classify_pb2_grpc.add_ClassifierServicer_to_server(EchoClassifier(specs), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo server listening on port {port}", flush=True)
    await server.wait_for_termination()


def _serve_process(repository: Path, port: int, reuse_port: bool, loop: str) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(serve(repository, port, reuse_port))
    else:
        asyncio.run(serve(repository, port, reuse_port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument(
        "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop [default: uvloop, as the server]"
    )
    args = parser.parse_args()
    if args.workers == 1:
        _serve_process(args.model_repository, args.port, False, args.loop)
        return
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_serve_process, args=(args.model_repository, args.port, True, args.loop))
        for _ in range(args.workers)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
