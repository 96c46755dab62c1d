"""The service's exceptions. Each names the gRPC status it maps to; one interceptor does the mapping."""

from __future__ import annotations

import grpc

__all__ = [
    "DeadlineExceeded",
    "InvalidArgument",
    "NotFound",
    "QueueFull",
    "ServiceError",
    "Unavailable",
]


class ServiceError(Exception):
    """Base of every error a client may see; the message is shown to the client as it is."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """INVALID_ARGUMENT: the request is malformed (bad image, shape, dtype, byte count, top_k, ...)."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """NOT_FOUND: no such model or model version."""

    status = grpc.StatusCode.NOT_FOUND


class Unavailable(ServiceError):
    """UNAVAILABLE: the model or server is not ready, or is shutting down."""

    status = grpc.StatusCode.UNAVAILABLE


class QueueFull(ServiceError):
    """RESOURCE_EXHAUSTED: the model's queue is at ``max_queue_size``; retry later."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    """DEADLINE_EXCEEDED: the request's deadline or timeout passed before it could run."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED
