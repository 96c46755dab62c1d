"""Digits over gRPC, single-image requests: the server against the echo ceiling and the no-batching baseline.

In one run, on one box, with the same load generators:
- ``server``: classify-server on the committed ``models/digits`` config (the tuned defaults), ``--workers W``;
- ``baseline``: the same server with batching off (``max_batch_size: 1``, no ``dynamic_batching``), one worker;
- ``echo``: ``benchmarks.echo_server`` with the same W processes: gRPC and protobuf with no work at all.

Load: Triton's perf_analyzer (KServe v2 ``ModelInfer``, unary and ``--streaming``) over a concurrency sweep,
and ``classify bench`` over both APIs, unary and streamed. Each row gives images/s, latency percentiles, the
server's CPU use, the box's and the GPU's, and the ratios server/echo and server/baseline. The use is taken
over the seconds ``classify bench`` measured (``usage.window_s``), without its start-up, warm-up and exit;
perf_analyzer does not say when its windows ran, so its rows cover its whole run. ``idle wkrs`` and
``in srv`` come from each worker's /metrics, over the whole run: workers that answered nothing, and the part of
the client's mean latency spent inside the workers' handlers (the rest is in gRPC, at both ends, and in the
client).

    python -m benchmarks.digits_grpc --perf-analyzer perf_analyzer --workers 8 --log-dir /tmp/digits
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.harness import (
    ECHO_READY,
    LoadResult,
    Server,
    classify_bench,
    echo_command,
    environment,
    format_table,
    free_port,
    perf_analyzer,
    sample_usage,
    server_repository,
    start_named_server,
    start_server,
)
from benchmarks.worker_metrics import idle_workers, inside_server

MODEL = "digits"
_MODES = {"unary": False, "stream": True}


def _start(args: argparse.Namespace, scratch: Path, name: str) -> Server:
    """Start one server to measure: the echo server, or ours on a named repository."""
    if name == "echo":
        tuned = server_repository(args.model_repository, scratch, MODEL, "server")
        port = free_port()
        return start_server(name, echo_command(tuned, port, args.workers), port, ECHO_READY, args.workers, args.log_dir)
    return start_named_server(name, args.model_repository, scratch, MODEL, args.device, args.workers, args.log_dir)


def _measure(args: argparse.Namespace, server: Server) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []

    def record(generator: str, api: str, mode: str, concurrency: int, result: LoadResult) -> None:
        row = {"server": server.name, "run": server.repeat, "generator": generator, "api": api, "mode": mode,
               "concurrency": concurrency}  # fmt: skip
        rows.append(row | asdict(result))
        print(json.dumps(rows[-1]), flush=True)

    for mode in args.modes:
        for concurrency in args.concurrency if args.perf_analyzer else ():
            tag = f"{server.tag}.kserve.{mode}.c{concurrency}"
            with sample_usage(server) as probe:
                result = perf_analyzer(
                    args.perf_analyzer, MODEL, server.port, concurrency, _MODES[mode], args.log_dir, tag
                )
            result.usage = probe.over()  # perf_analyzer does not say when its windows ran: the whole run
            record("perf_analyzer", "kserve", mode, concurrency, result)
        for api in args.bench_apis:
            tag = f"{server.tag}.{api}.{mode}"
            bench_args = ["--api", api, "--concurrency", str(args.bench_concurrency)]
            bench_args += ["--processes", str(args.bench_processes), "--channels", str(args.bench_channels)]
            bench_args += ["--stream"] if _MODES[mode] else []
            with sample_usage(server) as probe:
                result = classify_bench(f"127.0.0.1:{server.port}", MODEL, bench_args, args.log_dir, tag, args.duration)
            result.usage = probe.over(result.window)
            record("classify bench", api, mode, args.bench_concurrency, result)
    return rows


def _table(rows: list[dict[str, object]]) -> str:
    """One line per row; the ratios divide by the echo or baseline row of the same load and the same repeat
    (``--servers server echo server echo``: each server run by the echo run next to it), else the last one."""

    def key(row: dict[str, object], server: str) -> tuple[object, ...]:
        return (server, row["generator"], row["api"], row["mode"], row["concurrency"])

    runs: dict[tuple[object, ...], list[dict[str, object]]] = {}
    for row in rows:
        runs.setdefault(key(row, str(row["server"])), []).append(row)

    def reference(row: dict[str, object], server: str) -> dict[str, object] | None:
        measured = runs.get(key(row, server), [])
        repeat = int(row["run"])  # type: ignore[call-overload]
        return measured[repeat - 1] if repeat <= len(measured) else (measured[-1] if measured else None)

    lines = []
    for row in rows:
        echo = reference(row, "echo")
        baseline = reference(row, "baseline")
        rate = float(row["images_per_s"])  # type: ignore[arg-type]
        usage = row["usage"]
        assert isinstance(usage, dict)
        lines.append(
            [
                row["server"], row["generator"], row["api"], row["mode"], row["concurrency"], rate,
                row["p50_ms"], row["p90_ms"], row["p99_ms"], row["errors"], usage["server_cores"],
                usage["box_percent"], usage["gpu_percent"], idle_workers(usage["workers"]),
                inside_server(usage["workers"], row["mean_ms"]),  # type: ignore[arg-type]
                rate / float(echo["images_per_s"]) if echo else None,  # type: ignore[arg-type]
                rate / float(baseline["images_per_s"]) if baseline else None,  # type: ignore[arg-type]
            ]
        )  # fmt: skip
    headers = [
        "server", "load", "api", "mode", "conc", "images/s", "p50 ms", "p90 ms", "p99 ms", "errors",
        "srv cores", "box cpu%", "gpu%", "idle wkrs", "in srv", "/echo", "/baseline",
    ]  # fmt: skip
    return format_table(headers, lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--workers", type=int, default=8, help="server and echo processes [default: 8]")
    parser.add_argument("--servers", nargs="+", default=["server", "baseline", "echo"])
    parser.add_argument("--modes", nargs="+", default=["unary", "stream"], choices=list(_MODES))
    parser.add_argument("--perf-analyzer", metavar="PATH", help="perf_analyzer binary; none: skip it")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256, 512])
    parser.add_argument("--bench-apis", nargs="*", default=["kserve", "classify"], choices=["kserve", "classify"])
    parser.add_argument("--bench-concurrency", type=int, default=256)
    parser.add_argument("--bench-processes", type=int, default=8)
    parser.add_argument(
        "--bench-channels",
        type=int,
        default=2,
        help="connections per load process (workers share the port by connection: too few leave some idle)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per classify bench run")
    parser.add_argument("--log-dir", type=Path, default=None, help="raw outputs [default: a new temporary folder]")
    args = parser.parse_args(argv)
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="digits-grpc-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"environment": environment(), "workers": args.workers, "log_dir": str(args.log_dir)}))
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.servers:
            server = _start(args, Path(scratch), name)
            try:
                rows += _measure(args, server)
            finally:
                server.stop()
    (args.log_dir / "digits_grpc.json").write_text(json.dumps(rows, indent=1))
    table = _table(rows)
    (args.log_dir / "digits_grpc.txt").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
