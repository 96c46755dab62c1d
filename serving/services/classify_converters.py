"""classify.v1 messages to and from the data plane's types: the only place this API's protobufs are unpacked."""

from __future__ import annotations

from collections.abc import Sequence

from serving.dataplane import ImageInput, LabelScore
from serving.errors import InvalidArgument
from serving.protos.classify.v1 import classify_pb2 as pb
from serving.repository import ModelVersion

__all__ = ["classification_response", "error_response", "images_of", "model_info"]


def images_of(request: pb.ClassifyRequest) -> list[ImageInput]:
    """The request's images as data-plane inputs (raw bytes are passed on without a copy)."""
    images = []
    for index, image in enumerate(request.images):
        kind = image.WhichOneof("payload")
        if kind == "encoded":
            images.append(ImageInput(encoded=image.encoded))
        elif kind == "raw":
            images.append(ImageInput(raw=image.raw.data, shape=tuple(image.raw.shape)))
        else:
            raise InvalidArgument(f"image {index}: set either `encoded` (image file bytes) or `raw` (uint8 HWC pixels)")
    return images


def classification_response(
    request: pb.ClassifyRequest, served: ModelVersion, results: Sequence[Sequence[LabelScore]]
) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        model=served.name,
        version=str(served.version),
        request_id=request.request_id,
        results=[
            pb.Classification(labels=[pb.Label(label=s.label, index=s.index, score=s.score) for s in labels])
            for labels in results
        ],
    )


def error_response(request: pb.ClassifyRequest, code: str, message: str) -> pb.ClassifyResponse:
    """A stream's answer to a request that failed: the error instead of results."""
    return pb.ClassifyResponse(
        model=request.model, request_id=request.request_id, error=pb.Error(code=code, message=message)
    )


def model_info(name: str, versions: Sequence[ModelVersion], ready: bool) -> pb.ModelInfo:
    info = pb.ModelInfo(name=name, versions=[str(v.version) for v in versions], ready=ready)
    if versions:
        spec = versions[-1].spec
        info.input.CopyFrom(
            pb.InputInfo(
                height=spec.input.height, width=spec.input.width, channels=spec.input.channels, dtype="UINT8",
                layout="NHWC",
            )
        )  # fmt: skip
        info.labels.extend(spec.labels)
        info.max_batch_size = spec.max_batch_size
    return info
