"""Where the server's time goes under load: py-spy samples of one worker and of the engine at the same time.

Digits: perf_analyzer drives single-image KServe requests. Cat/dog: ``classify bench`` sends the validation
JPEGs, ``--batch`` per request. Writes py-spy's raw collapsed stacks per process (for a flame graph) and
prints the lines with the most samples, self and inclusive, next to the CPU and GPU use measured over the
same seconds and each profiled process's own CPU use.

    python -m benchmarks.profile_server --perf-analyzer perf_analyzer --workers 8 --concurrency 512 --streaming
    python -m benchmarks.profile_server --model catdog --photos cats_and_dogs.zip --workers 8 --concurrency 128
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.catdog_grpc import extract_validation_photos
from benchmarks.harness import (
    Server,
    repository,
    sample_usage,
    start_classify_server,
)

RATE = 250  # py-spy samples per second
_WORKERS_STARTED = re.compile(r"pids \[([\d, ]+)\]; engine pid (\d+)")


def summarise(collapsed: Path, top: int, gil_chances: int | None = None) -> str:
    """The ``top`` frames by self and by inclusive samples, in percent of all samples. With py-spy's ``--gil``
    only a thread holding the GIL is sampled, so samples over ``gil_chances`` (rate times seconds) is the share
    of the time the process's GIL was held, at least (a sampler that falls behind its rate misses some): near
    100%, its Python code is the limit, whatever its CPU use."""
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
    if gil_chances:
        held = f"{100 * total / gil_chances:.0f}%"
        lines.append(f"GIL held at least {held} of the time ({total} of {gil_chances} samples)")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"-- by {title} samples --")
        lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines)


def profiled_processes(server: Server) -> dict[str, int]:
    """The first worker and the engine, from the server's log line; a lone server process is the worker."""
    found = _WORKERS_STARTED.search(server.log.read_text(errors="replace"))
    if found is None:
        return {"worker": server.process.pid}
    return {"worker": int(found[1].split(",")[0]), "engine": int(found[2])}


def load_command(args: argparse.Namespace, port: int, photos: Path | None) -> list[str]:
    """The load generator, running long enough to cover the warm-up and the sampled seconds."""
    seconds = args.seconds + 6
    if args.model == "digits":
        return [
            args.perf_analyzer, "-m", "digits", "-u", f"127.0.0.1:{port}", "-i", "grpc", "--async",
            f"--concurrency-range={args.concurrency}:{args.concurrency}",
            f"--measurement-interval={int(seconds * 1000 - 2000)}", "--max-trials=1",
            *(["--streaming"] if args.streaming else []),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "serving.client.cli", "bench", "--server", f"127.0.0.1:{port}", "--model", "catdog",
        "--api", "classify", "--images", str(photos), "--batch", str(args.batch), "--concurrency",
        str(args.concurrency), "--processes", str(args.bench_processes), "--channels", str(args.bench_channels),
        "--duration", str(seconds), "--json",
        *(["--stream"] if args.streaming else []),
    ]  # fmt: skip


def record(py_spy: str, pid: int, seconds: float, collapsed: Path, gil: bool) -> subprocess.Popen[bytes]:
    spy = [
        py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(RATE), "--format",
        "raw", "--output", str(collapsed), "--nonblocking", "--threads", *(["--gil"] if gil else []),
    ]  # fmt: skip
    return subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", choices=["digits", "catdog"])
    parser.add_argument("--perf-analyzer", metavar="PATH", help="perf_analyzer binary (digits)")
    parser.add_argument("--photos", type=Path, help="the cats/dogs photo zip (catdog)")
    parser.add_argument("--py-spy", default="py-spy", metavar="PATH")
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="images per request (catdog)")
    parser.add_argument("--bench-processes", type=int, default=4, help="classify bench processes (catdog)")
    parser.add_argument("--bench-channels", type=int, default=4, help="connections per bench process (catdog)")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL (py-spy --gil)")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if (args.model == "digits") != (args.perf_analyzer is not None) or (args.model == "catdog") != bool(args.photos):
        parser.error("digits is driven by --perf-analyzer, catdog by classify bench over --photos")
    log_dir: Path = args.log_dir or Path(tempfile.mkdtemp(prefix="profile-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model}.{'stream' if args.streaming else 'unary'}{'.gil' if args.gil else ''}"
    with tempfile.TemporaryDirectory() as scratch:
        photos = None
        if args.photos:
            (Path(scratch) / "photos").mkdir()
            photos = extract_validation_photos(args.photos, Path(scratch) / "photos")
        repo = repository(args.model_repository, Path(scratch) / "models", [args.model])
        server = start_classify_server(f"profile.{tag}", repo, args.device, args.workers, log_dir)
        port = server.port
        try:
            with (log_dir / f"profile.{tag}.load.log").open("w") as out:
                generator = subprocess.Popen(load_command(args, port, photos), stdout=out, stderr=subprocess.STDOUT)
                time.sleep(3)  # connected and at full load
                targets = profiled_processes(server)
                collapsed = {name: log_dir / f"profile.{tag}.{name}.collapsed.txt" for name in targets}
                with sample_usage(server) as probe:
                    spies = {
                        name: record(args.py_spy, pid, args.seconds, collapsed[name], args.gil)
                        for name, pid in targets.items()
                    }
                    for name, spy in spies.items():
                        _, errors = spy.communicate()
                        if spy.returncode != 0:
                            raise RuntimeError(f"py-spy on the {name} failed: {errors.decode()[-2000:]}")
                usage = probe.over()  # the block is the profiled seconds, all under full load
                cores = {name: usage.process_cores.get(pid) for name, pid in targets.items()}
                generator.wait(120)
        finally:
            server.stop()
    header = json.dumps(
        {"model": args.model, "tag": tag, "workers": args.workers, "usage": asdict(usage), "cores": cores}
    )
    gil_chances = RATE * int(args.seconds) if args.gil else None
    report = [header] + [
        f"== {name} (pid {targets[name]}) ==\n{summarise(path, args.top, gil_chances)}"
        for name, path in collapsed.items()
    ]
    (log_dir / f"profile.{tag}.summary.txt").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
