"""Where a server worker's time goes under load: py-spy samples of one worker while perf_analyzer drives digits.

Writes py-spy's raw collapsed stacks (for a flame graph) and prints the functions with the most samples,
self and inclusive, next to the CPU and GPU use measured over the same seconds.

    python -m benchmarks.profile_server --perf-analyzer perf_analyzer --workers 8 --concurrency 512 --streaming
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import psutil

from benchmarks.harness import (
    SERVER_READY,
    free_port,
    repository,
    sample_usage,
    server_command,
    start_server,
)

MODEL = "digits"


def summarise(collapsed: Path, top: int) -> str:
    """The ``top`` frames by self and by inclusive samples, in percent of all samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"-- by {title} samples --")
        lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perf-analyzer", required=True, metavar="PATH")
    parser.add_argument("--py-spy", default="py-spy", metavar="PATH")
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args()
    log_dir: Path = args.log_dir or Path(tempfile.mkdtemp(prefix="profile-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    mode = "stream" if args.streaming else "unary"
    with tempfile.TemporaryDirectory() as scratch:
        repo = repository(args.model_repository, Path(scratch), [MODEL])
        port = free_port()
        command = server_command(repo, port, args.device, args.workers)
        server = start_server(f"profile.{mode}", command, port, SERVER_READY, args.workers, log_dir)
        try:
            load = [
                args.perf_analyzer, "-m", MODEL, "-u", f"127.0.0.1:{port}", "-i", "grpc", "--async",
                f"--concurrency-range={args.concurrency}:{args.concurrency}",
                f"--measurement-interval={int(args.seconds * 1000 + 4000)}", "--max-trials=1",
                *(["--streaming"] if args.streaming else []),
            ]  # fmt: skip
            with (log_dir / f"profile.{mode}.perf_analyzer.log").open("w") as out:
                generator = subprocess.Popen(load, stdout=out, stderr=subprocess.STDOUT)
                time.sleep(3)  # connected and at full load
                pids = server.pids()
                worker = pids[-1]  # with --workers, a child; else the server itself
                collapsed = log_dir / f"profile.{mode}.collapsed.txt"
                spy = [
                    args.py_spy, "record", "--pid", str(worker), "--duration", str(int(args.seconds)),
                    "--rate", "250", "--format", "raw", "--output", str(collapsed), "--nonblocking", "--threads",
                ]  # fmt: skip
                with sample_usage(pids) as usage:
                    subprocess.run(spy, check=True, capture_output=True)
                generator.wait(120)
            worker_cpu = psutil.Process(worker).cpu_percent(0.5) if psutil.pid_exists(worker) else None
        finally:
            server.stop()
    summary = summarise(collapsed, args.top)
    header = json.dumps({"mode": mode, "workers": args.workers, "usage": asdict(usage), "worker_cpu": worker_cpu})
    (log_dir / f"profile.{mode}.summary.txt").write_text(header + "\n" + summary + "\n")
    print(header)
    print(summary)


if __name__ == "__main__":
    main()
