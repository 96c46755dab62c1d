"""The two bounds on a cat/dog run with the engine, from ``catdog_grpc``'s raw JSON: which one set the throughput.

A worker's decode stage can pass at most its decode threads / a decode's wall time images a second, so all
the workers that decoded pass ``threads x workers / dec ms``; the engine's instances, running back to back,
pass ``instances x run imgs / eng run``. Both come from the same batch- and image-weighted means the
``catdog_grpc`` table prints. The throughput over the lower of the two says whether one of them was the limit
(near 1) or neither (well below); the numbers are estimates from means, good to a few per cent.

    python -m benchmarks.bounds benchmarks/results/h200/locked-2/B/*/catdog_grpc.json --decode-threads 2
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import format_table
from benchmarks.worker_metrics import decode_split, engine_split


@dataclass(frozen=True)
class Bounds:
    images_per_s: float
    decode: float  # images/s the decode stage could pass
    engine: float  # images/s the instances could pass back to back

    @property
    def lower(self) -> str:
        return "decode" if self.decode < self.engine else "engine"

    @property
    def of_lower(self) -> float:
        """The throughput over the lower bound."""
        return self.images_per_s / min(self.decode, self.engine)


def row_bounds(row: Mapping[str, Any], decode_threads: int, instances: int) -> Bounds | None:
    """A row's bounds, with ``decode_threads`` per worker; None for a row without the engine's or the decode's
    figures (one worker, or a server from before they were recorded)."""
    shares = row["usage"]["workers"]
    decoding = sum(1 for worker in shares if worker["decoded"])
    decode, engine = decode_split(shares), engine_split(shares)
    if decode is None or engine is None or not decoding:
        return None
    _, decode_ms, _ = decode
    _, run_ms, _, run_images = engine
    return Bounds(
        row["images_per_s"], 1e3 * decode_threads * decoding / decode_ms, 1e3 * instances * run_images / run_ms
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="catdog_grpc.json files")
    parser.add_argument("--decode-threads", type=int, default=2, help="per worker, as the runs' server had")
    parser.add_argument("--instances", type=int, default=2, help="of the cat/dog model, as the runs' config had")
    args = parser.parse_args(argv)
    table = []
    for run in args.runs:
        for row in json.loads(run.read_text())["rows"]:
            bounds = row_bounds(row, args.decode_threads, args.instances)
            if bounds is not None:
                table.append([str(run.parent), row["mode"], bounds.images_per_s, bounds.decode, bounds.engine,
                              bounds.lower, bounds.of_lower])  # fmt: skip
    print(format_table(["run", "mode", "images/s", "dec bound", "eng bound", "lower", "/lower"], table))


if __name__ == "__main__":
    main()
