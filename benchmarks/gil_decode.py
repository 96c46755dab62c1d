"""A probe of the decode stage's wait: Pillow's decode beside a thread holding the GIL, per switch interval.

Under load a worker's event loop holds its process's GIL in bursts while the decode threads decode beside it.
They leave the GIL inside Pillow's C code and take it back between steps (the JPEG load, the crop, the resize,
the copy out). Each time, they wait for the thread holding it: about the switch interval
(``sys.setswitchinterval``, 5 ms by default) when that thread runs Python without pause, after which it is asked
to let go. This decodes the
validation photos as the server does (``serving.images.decode_image``, the cat/dog input) on one thread, alone
and beside one thread that runs Python for ``--burst-ms`` and then sleeps ``--pause-ms``, at each interval, and
prints a decode's wall time against its thread's CPU time. It needs no GPU:

    python -m benchmarks.gil_decode ZIP --intervals-ms 5 1 0.5 --json F
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness import format_table
from benchmarks.photos import CATDOG_INPUT, validation_photos
from serving.images import decode_image


@dataclass
class Row:
    interval_ms: float  # the switch interval in force while decoding (sys.getswitchinterval), in milliseconds
    beside: str  # "nothing", or the bursts of the other thread
    images: int
    wall_ms: float  # per decode
    cpu_ms: float  # the decoding thread's CPU time per decode


def _hold_gil_in_bursts(stop: threading.Event, burst_s: float, pause_s: float) -> None:
    """Run Python for ``burst_s`` (reading a clock never leaves the GIL), then sleep ``pause_s``, until stopped."""
    while not stop.is_set():
        until = time.perf_counter() + burst_s
        while time.perf_counter() < until:
            pass
        time.sleep(pause_s)


@contextmanager
def _switch_interval(seconds: float) -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@contextmanager
def _bursts(burst_s: float, pause_s: float) -> Iterator[None]:
    stop = threading.Event()
    holder = threading.Thread(target=_hold_gil_in_bursts, args=(stop, burst_s, pause_s), daemon=True)
    holder.start()
    try:
        yield
    finally:
        stop.set()
        holder.join()


def decode_timed(photos: Sequence[bytes], seconds: float) -> tuple[int, float, float]:
    """Decode ``photos`` in turn for ``seconds`` at least (one pass at least): images, wall and CPU seconds."""
    images, wall, cpu = 0, 0.0, 0.0
    started = time.perf_counter()
    while images < len(photos) or time.perf_counter() - started < seconds:
        photo = photos[images % len(photos)]
        wall_before, cpu_before = time.perf_counter(), time.thread_time()
        decode_image(photo, CATDOG_INPUT)
        wall += time.perf_counter() - wall_before
        cpu += time.thread_time() - cpu_before
        images += 1
    return images, wall, cpu


def measure(
    photos: Sequence[bytes], intervals_ms: Sequence[float], burst_ms: float, pause_ms: float, seconds: float
) -> list[Row]:
    """One row alone and one beside the bursts, per switch interval."""
    rows = []
    for interval_ms in intervals_ms:
        with _switch_interval(interval_ms / 1e3):
            for beside_bursts in (False, True):
                with _bursts(burst_ms / 1e3, pause_ms / 1e3) if beside_bursts else nullcontext():
                    images, wall, cpu = decode_timed(photos, seconds)
                label = f"{burst_ms:g} ms bursts, {pause_ms:g} ms pauses" if beside_bursts else "nothing"
                in_force = sys.getswitchinterval() * 1e3
                rows.append(Row(in_force, label, images, 1e3 * wall / images, 1e3 * cpu / images))
    return rows


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a switch interval is more than 0 ms")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="the cat/dog photo zip (its val/ JPEGs are decoded)")
    parser.add_argument(
        "--intervals-ms", type=_positive, nargs="+", default=[5.0, 1.0, 0.5], help="GIL switch intervals to try"
    )
    parser.add_argument("--burst-ms", type=float, default=2.0, help="Python run by the other thread at a time")
    parser.add_argument("--pause-ms", type=float, default=1.0, help="its sleep between bursts")
    parser.add_argument("--seconds", type=float, default=3.0, help="decoding per row")
    parser.add_argument("--limit", type=int, default=0, help="only the first N photos (quick checks)")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    photos = list(validation_photos(args.photos).values())[: args.limit or None]
    rows = measure(photos, args.intervals_ms, args.burst_ms, args.pause_ms, args.seconds)
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1))
    print(f"{len(photos)} photos, Python {sys.version.split()[0]}")
    print(
        format_table(
            ["interval ms", "beside", "images", "decode ms", "cpu ms", "wall / cpu"],
            [[r.interval_ms, r.beside, r.images, r.wall_ms, r.cpu_ms, r.wall_ms / r.cpu_ms] for r in rows],
        )
    )


if __name__ == "__main__":
    main()
