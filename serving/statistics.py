"""Per-model-version counters behind Triton's ModelStatistics RPC, fed by the batcher as work completes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Duration", "ModelStatistics"]


@dataclass
class Duration:
    """A count and the nanoseconds they took together, as Triton's StatisticDuration."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class ModelStatistics:
    """Cumulative figures since load; called on the event loop thread only, so no locking."""

    inference_count: int = 0  # images
    execution_count: int = 0  # model runs (batches)
    last_inference_ms: int = 0  # wall clock, milliseconds since the epoch
    success: Duration = field(default_factory=Duration)  # per request, end to end
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # per request, waiting before its first run
    compute_infer: Duration = field(default_factory=Duration)  # per request, from its first run to its result
    batches: dict[int, Duration] = field(default_factory=dict)  # per batch size: executions and their time

    def batch_done(self, batch_size: int, compute_ns: int) -> None:
        self.execution_count += 1
        self.inference_count += batch_size
        self.batches.setdefault(batch_size, Duration()).add(compute_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def request_done(self, images: int, queue_ns: int, total_ns: int, ok: bool) -> None:
        (self.success if ok else self.fail).add(total_ns)
        if ok:
            self.queue.add(queue_ns)
            self.compute_infer.add(total_ns - queue_ns)
