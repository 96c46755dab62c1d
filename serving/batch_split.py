"""Merge requests' rows into batches and split batch outputs back: pure bookkeeping, no asyncio, no clocks.

A batch is a list of parts; a part is a contiguous run of one request's rows. A request that does not fit in
the room a batch has left contributes a part and continues in the next batch, so one request may span several
batches (and a request larger than the batch size always does). Outputs come back per part, as views of the
batch output; a request split over several parts is stitched together by an `Assembly`.
"""

from __future__ import annotations

from typing import Generic, NamedTuple, TypeVar

import numpy as np

__all__ = ["Assembly", "BatchPlan", "Part"]

R = TypeVar("R")


class Part(NamedTuple, Generic[R]):
    """Rows ``start:stop`` of one request's images, as one contiguous run of a batch."""

    request: R
    start: int
    stop: int


class BatchPlan(Generic[R]):
    """The parts of one batch, in batch order, and the input rows they bring.

    Args:
        capacity: the most rows the batch may hold (the model's ``max_batch_size``).
    """

    __slots__ = ("_inputs", "capacity", "parts", "rows")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a batch holds at least one row, got capacity {capacity}")
        self.capacity = capacity
        self.parts: list[Part[R]] = []
        self._inputs: list[np.ndarray] = []
        self.rows = 0

    @property
    def room(self) -> int:
        """Rows that still fit."""
        return self.capacity - self.rows

    def add(self, request: R, images: np.ndarray, start: int) -> int:
        """Take as many of ``images[start:]`` as fit; a full batch takes nothing.

        Args:
            request: the owner of the rows, returned with their outputs.
            images: all of the request's images, ``[N, ...]``.
            start: the first row not yet taken by an earlier batch.

        Returns:
            The row after the last one taken: ``len(images)`` when the rest of the request fit.
        """
        total = len(images)
        stop = min(total, start + self.capacity - self.rows)
        if stop <= start:
            return start
        self.parts.append(Part(request, start, stop))
        # A whole request goes in as it is (no slicing); a row slice of a C-contiguous array is a view.
        self._inputs.append(images if start == 0 and stop == total else images[start:stop])
        self.rows += stop - start
        return stop

    def drop(self, request: R) -> int:
        """Remove ``request``'s part (a batch holds at most one part per request); returns the rows removed."""
        for index, part in enumerate(self.parts):
            if part.request is request:
                del self.parts[index]
                del self._inputs[index]
                removed = part.stop - part.start
                self.rows -= removed
                return removed
        return 0

    def inputs(self) -> np.ndarray:
        """The batch's input, ``[rows, ...]``: one part's rows as they are, several concatenated once."""
        if len(self._inputs) == 1:
            return self._inputs[0]
        return np.concatenate(self._inputs)

    def part_inputs(self) -> list[np.ndarray]:
        """Each part's input rows, in part order (to run the parts one at a time)."""
        return list(self._inputs)

    def split(self, outputs: np.ndarray) -> list[np.ndarray]:
        """Each part's rows of the batch output ``[rows, ...]``, as views, in part order."""
        if len(outputs) != self.rows:
            raise ValueError(f"the model returned {len(outputs)} rows for a batch of {self.rows}")
        if len(self.parts) == 1:
            return [outputs]
        views = []
        offset = 0
        for part in self.parts:
            end = offset + part.stop - part.start
            views.append(outputs[offset:end])
            offset = end
        return views


class Assembly:
    """One request's output, stitched from its parts' outputs as they arrive, in any order.

    Args:
        rows: the request's image count.
    """

    __slots__ = ("_missing", "_result", "rows")

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._missing = rows
        self._result: np.ndarray | None = None

    def add(self, start: int, outputs: np.ndarray) -> np.ndarray | None:
        """Place the outputs of the request's rows ``start:start + len(outputs)``.

        Returns:
            The whole result ``[rows, ...]`` once every row is in, else None.
        """
        if self._result is None:
            self._result = np.empty((self.rows, *outputs.shape[1:]), dtype=outputs.dtype)
        stop = start + len(outputs)
        if start < 0 or stop > self.rows:
            raise ValueError(f"rows {start}:{stop} are outside a request of {self.rows} rows")
        self._result[start:stop] = outputs
        self._missing -= len(outputs)
        return self._result if self._missing == 0 else None
