"""What every gRPC adapter shares: the one place errors become status codes, deadlines, stream pipelining."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from serving.errors import ServiceError

__all__ = ["INTERNAL_MESSAGE", "answer_stream", "deadline_of", "error_of", "grpc_errors", "pipelined"]

_log = logging.getLogger(__name__)
INTERNAL_MESSAGE = "internal error; the server log has the details"

_Self = TypeVar("_Self")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_P = ParamSpec("_P")


def error_of(exc: BaseException, where: str) -> tuple[grpc.StatusCode, str]:
    """The status and client-facing message for an exception; unexpected ones are logged with traceback."""
    if isinstance(exc, ServiceError):
        return exc.status, str(exc)
    _log.error("unexpected error in %s", where, exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def grpc_errors(
    method: Callable[Concatenate[_Self, _Request, grpc.aio.ServicerContext[Any, Any], _P], Awaitable[_Response]],
) -> Callable[Concatenate[_Self, _Request, grpc.aio.ServicerContext[Any, Any], _P], Awaitable[_Response]]:
    """Turn our exceptions into their gRPC status (and anything else into INTERNAL) for a unary method."""

    @functools.wraps(method)
    async def wrapper(
        self: _Self, request: _Request, context: grpc.aio.ServicerContext[Any, Any], *args: _P.args, **kwargs: _P.kwargs
    ) -> _Response:
        try:
            return await method(self, request, context, *args, **kwargs)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every error must reach the client as a status, never as a traceback
            status, message = error_of(exc, method.__qualname__)
            await context.abort(status, message)
            raise AssertionError("unreachable: abort raises") from None

    return wrapper


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The client's gRPC deadline on the event loop's clock, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


async def answer_stream(
    requests: AsyncIterator[_Request],
    handle: Callable[[_Request], Awaitable[_Response]],
    on_error: Callable[[_Request, grpc.StatusCode, str], _Response],
    where: str,
) -> AsyncIterator[_Response]:
    """A stream's responses, in request order: a failed request is answered by ``on_error``, the stream goes on."""

    async def answer(request: _Request) -> _Response:
        try:
            return await handle(request)
        except Exception as exc:
            status, message = error_of(exc, where)
            return on_error(request, status, message)

    async for response in pipelined(requests, answer):
        yield response


async def pipelined(
    requests: AsyncIterator[_Request],
    handle: Callable[[_Request], Awaitable[_Response]],
    max_in_flight: int = 256,
) -> AsyncIterator[_Response]:
    """Handle a stream's requests concurrently (so they batch together) and yield responses in request order.

    ``handle`` must turn its own failures into a response. Reading pauses while ``max_in_flight`` requests
    are unanswered, so a fast client cannot make the server buffer without bound.
    """
    pending: asyncio.Queue[asyncio.Task[_Response] | None] = asyncio.Queue(max_in_flight)

    async def read() -> None:
        try:
            async for request in requests:
                await pending.put(asyncio.ensure_future(handle(request)))
        finally:
            await pending.put(None)

    reader = asyncio.ensure_future(read())
    try:
        while (task := await pending.get()) is not None:
            yield await task
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        while not pending.empty():
            if (task := pending.get_nowait()) is not None:
                task.cancel()
