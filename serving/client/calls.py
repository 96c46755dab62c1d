"""Many images to one model: multi-image Classify calls, several in flight, and one outcome for every input."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from serving.client.inputs import Failure, ImageInput, group_inputs, read_input
from serving.protos.classify.v1 import classify_pb2 as pb

__all__ = ["CallPlan", "Label", "Outcome", "classify_inputs"]

_RETRIES = 3  # RESOURCE_EXHAUSTED means the model's queue is full: worth a few tries after a pause
_RETRY_PAUSE = 0.2  # seconds, doubled after each try


@dataclass(frozen=True)
class Label:
    """One of an image's most likely classes."""

    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Outcome:
    """What one input got: labels from a model version, or a failure."""

    name: str
    model: str = ""
    version: str = ""
    labels: tuple[Label, ...] = ()
    failure: Failure | None = None


@dataclass(frozen=True)
class CallPlan:
    """What to ask for and how to split the work into calls."""

    model: str
    version: str  # "": the newest ready version
    top_k: int | None  # None: the server's default, 1
    timeout: float  # seconds, per call
    max_images: int  # per call
    max_bytes: int  # per call, roughly: a larger file goes alone
    in_flight: int  # calls at once


async def _call(stub: Any, contents: Sequence[bytes], plan: CallPlan) -> pb.ClassifyResponse | Failure:
    """One Classify call, retried while the model's queue is full; a failure is returned, not raised."""
    request = pb.ClassifyRequest(model=plan.model, version=plan.version, images=[pb.Image(encoded=c) for c in contents])
    if plan.top_k is not None:
        request.top_k = plan.top_k
    attempt = 0
    while True:
        try:
            response: pb.ClassifyResponse = await stub.Classify(request, timeout=plan.timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and attempt < _RETRIES:
                await asyncio.sleep(_RETRY_PAUSE * 2**attempt)
                attempt += 1
                continue
            message = error.details() or ""
            # Alone in its request, the image is image 0 to the server; the output names it by its path instead.
            return Failure(error.code().name, message.removeprefix("image 0: ") if len(contents) == 1 else message)
        if len(response.results) != len(contents):
            answered = len(response.results)
            return Failure("INTERNAL", f"the server answered {answered} results for {len(contents)} images")
        return response


def _outcome(name: str, answer: pb.ClassifyResponse | Failure, position: int) -> Outcome:
    if isinstance(answer, Failure):
        return Outcome(name, failure=answer)
    labels = tuple(Label(label.label, label.index, label.score) for label in answer.results[position].labels)
    return Outcome(name, answer.model, answer.version, labels)


async def _classify_group(
    stub: Any, group: Sequence[tuple[int, ImageInput]], plan: CallPlan, stdin: bytes
) -> list[tuple[int, Outcome]]:
    """Outcomes for one group of inputs: one call, or one call per image when the group's call is refused."""
    contents = await asyncio.to_thread(lambda: [read_input(image, stdin) for _, image in group])
    outcomes: list[tuple[int, Outcome]] = []
    sendable: list[tuple[int, str, bytes]] = []
    for (index, image), content in zip(group, contents, strict=True):
        if isinstance(content, Failure):
            outcomes.append((index, Outcome(image.name, failure=content)))
        else:
            sendable.append((index, image.name, content))
    if not sendable:
        return outcomes
    answer = await _call(stub, [content for _, _, content in sendable], plan)
    if isinstance(answer, Failure) and answer.code == "INVALID_ARGUMENT" and len(sendable) > 1:
        # One bad image fails the whole call; alone, each image gets its own answer (the message is not parsed).
        singles = await asyncio.gather(*(_call(stub, [content], plan) for _, _, content in sendable))
        for (index, name, _), single in zip(sendable, singles, strict=True):
            outcomes.append((index, _outcome(name, single, 0)))
    else:
        outcomes.extend((index, _outcome(name, answer, i)) for i, (index, name, _) in enumerate(sendable))
    return outcomes


async def classify_inputs(
    stub: Any,
    inputs: Sequence[ImageInput],
    plan: CallPlan,
    stdin: bytes,
    on_outcome: Callable[[int, Outcome], None],
) -> None:
    """Classify every input, calling ``on_outcome(position, outcome)`` once per input as it completes (any order).

    Args:
        stub: a ``ClassifierStub`` on a ``grpc.aio`` channel.
        inputs: the images; those with a ``failure`` already are reported at once, without a call.
        plan: the model, top-k and how to split the calls.
        stdin: the bytes of standard input, for the input named ``-``.
        on_outcome: receives each outcome with its position in ``inputs``.
    """
    for index, image in enumerate(inputs):
        if image.failure is not None:
            on_outcome(index, Outcome(image.name, failure=image.failure))
    groups = group_inputs(inputs, plan.max_images, plan.max_bytes)

    async def worker() -> None:
        for group in groups:  # shared: each group goes to the first free worker
            for index, outcome in await _classify_group(stub, group, plan, stdin):
                on_outcome(index, outcome)

    await asyncio.gather(*(worker() for _ in range(plan.in_flight)))
