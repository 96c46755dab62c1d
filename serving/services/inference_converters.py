"""KServe v2 / Triton messages to and from the data plane's types: the only place this API's protobufs are unpacked."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from serving.dataplane import rank
from serving.errors import InvalidArgument
from serving.model_config import ModelSpec
from serving.protos.inference import grpc_service_pb2 as pb
from serving.repository import IndexEntry, ModelVersion
from serving.statistics import Duration, ModelStatistics

__all__ = [
    "CLASSIFICATION",
    "index_response",
    "infer_response",
    "input_tensor",
    "model_metadata",
    "requested_outputs",
    "statistics_of",
    "timeout_of",
]

CLASSIFICATION = "classification"  # the requested-output parameter of Triton's classification extension


def timeout_of(request: pb.ModelInferRequest) -> float | None:
    """The request's ``timeout`` parameter (microseconds) in seconds, if given."""
    if "timeout" not in request.parameters:
        return None
    value = request.parameters["timeout"]
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param") or getattr(value, kind) < 0:
        raise InvalidArgument("parameter `timeout` must be a non-negative integer number of microseconds")
    return float(getattr(value, kind)) / 1e6


def input_tensor(request: pb.ModelInferRequest, spec: ModelSpec) -> np.ndarray:
    """The one uint8 ``[N, H, W, C]`` input, checked against the model (a zero-copy view of raw bytes).

    The requested outputs are checked here too, so a request that cannot be answered never runs.
    """
    requested_outputs(request, spec)
    expected_dims = [spec.input.height, spec.input.width, spec.input.channels]
    if len(request.inputs) != 1:
        raise InvalidArgument(
            f"model {spec.name!r} takes exactly one input, {spec.input_name!r}; got {len(request.inputs)}"
        )
    (tensor,) = request.inputs
    if tensor.name != spec.input_name:
        raise InvalidArgument(f"unknown input {tensor.name!r}; model {spec.name!r} takes {spec.input_name!r}")
    if tensor.datatype != "UINT8":
        raise InvalidArgument(f"input {tensor.name!r} has datatype {tensor.datatype!r}; the model takes UINT8")
    shape = list(tensor.shape)
    if len(shape) != 4 or shape[0] < 1 or shape[1:] != expected_dims:
        raise InvalidArgument(
            f"input {tensor.name!r} has shape {shape}; expected [batch >= 1, {', '.join(map(str, expected_dims))}]"
        )
    count = math.prod(shape)
    has_typed = tensor.HasField("contents")
    if request.raw_input_contents:
        if has_typed:
            raise InvalidArgument("send the input either in raw_input_contents or in contents, not both")
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(f"raw_input_contents holds {len(request.raw_input_contents)} entries for 1 input")
        raw = request.raw_input_contents[0]
        if len(raw) != count:
            raise InvalidArgument(
                f"input {tensor.name!r}: {len(raw)} bytes of raw data, shape {shape} of UINT8 needs {count}"
            )
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    values = tensor.contents.uint_contents
    if len(values) != count:
        raise InvalidArgument(
            f"input {tensor.name!r}: {len(values)} values in contents.uint_contents, shape {shape} needs {count}"
        )
    array = np.asarray(values, dtype=np.uint32)
    if array.size and int(array.max()) > 255:
        raise InvalidArgument(f"input {tensor.name!r}: UINT8 values must be 0..255, found {int(array.max())}")
    return array.astype(np.uint8).reshape(shape)


def _bytes_tensor(elements: Sequence[str]) -> bytes:
    """Triton's BYTES serialisation: each element as a 4-byte little-endian length, then its bytes."""
    encoded = [e.encode() for e in elements]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def requested_outputs(
    request: pb.ModelInferRequest, spec: ModelSpec
) -> list[pb.ModelInferRequest.InferRequestedOutputTensor]:
    """The outputs to return (all, if none are named), checked before the model runs."""
    requested = list(request.outputs) or [pb.ModelInferRequest.InferRequestedOutputTensor(name=spec.output_name)]
    for output in requested:
        if output.name != spec.output_name:
            raise InvalidArgument(f"unknown output {output.name!r}; model {spec.name!r} has {spec.output_name!r}")
        if CLASSIFICATION in output.parameters:
            top_k = output.parameters[CLASSIFICATION].int64_param
            if not 1 <= top_k <= len(spec.labels):
                raise InvalidArgument(f"classification count must be 1..{len(spec.labels)}, got {top_k}")
    return requested


def infer_response(
    request: pb.ModelInferRequest, served: ModelVersion, probabilities: np.ndarray
) -> pb.ModelInferResponse:
    """Every requested output in ``raw_output_contents``, in ``outputs`` order (Triton's rule)."""
    spec = served.spec
    response = pb.ModelInferResponse(model_name=spec.name, model_version=str(served.version), id=request.id)
    batch = len(probabilities)
    for output in requested_outputs(request, spec):
        if CLASSIFICATION in output.parameters:
            top_k = output.parameters[CLASSIFICATION].int64_param
            rows = rank(probabilities, spec.labels, top_k)
            response.outputs.add(name=output.name, datatype="BYTES", shape=[batch, top_k])
            response.raw_output_contents.append(
                _bytes_tensor([f"{s.score:f}:{s.index}:{s.label}" for row in rows for s in row])
            )
        else:
            response.outputs.add(name=output.name, datatype="FP32", shape=list(probabilities.shape))
            response.raw_output_contents.append(np.ascontiguousarray(probabilities, dtype="<f4").tobytes())
    return response


def model_metadata(name: str, versions: Sequence[ModelVersion]) -> pb.ModelMetadataResponse:
    spec = versions[-1].spec
    return pb.ModelMetadataResponse(
        name=name,
        versions=[str(v.version) for v in versions],
        platform=spec.config.platform or "onnxruntime_onnx",
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(
                name=spec.input_name,
                datatype="UINT8",
                shape=[-1, spec.input.height, spec.input.width, spec.input.channels],
            )
        ],
        outputs=[
            pb.ModelMetadataResponse.TensorMetadata(
                name=spec.output_name, datatype="FP32", shape=[-1, len(spec.labels)]
            )
        ],
    )


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def statistics_of(served: ModelVersion) -> pb.ModelStatistics:
    stats: ModelStatistics = served.statistics
    nothing = pb.StatisticDuration()
    return pb.ModelStatistics(
        name=served.name,
        version=str(served.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=pb.StatisticDuration(count=stats.success.count),  # inputs go in with the run
            compute_infer=_duration(stats.compute_infer),
            compute_output=pb.StatisticDuration(count=stats.success.count),
            cache_hit=nothing,
            cache_miss=nothing,
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=pb.StatisticDuration(count=duration.count),
                compute_infer=_duration(duration),
                compute_output=pb.StatisticDuration(count=duration.count),
            )
            for size, duration in sorted(stats.batches.items())
        ],
    )


def index_response(entries: Sequence[IndexEntry], ready_only: bool) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state.value, reason=e.reason)
            for e in entries
            if not ready_only or e.state.value == "READY"
        ]
    )
