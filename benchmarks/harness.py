"""What every benchmark script shares: start servers, drive load generators, sample CPU and GPU, print tables.

CPU and GPU use is sampled through a whole load run and taken over the seconds the load generator measured,
where it says which (``classify bench`` does, on the machine's monotonic clock), so that its start-up, warm-up
and exit do not dilute the figures.

Every load run writes its raw output (perf_analyzer's CSV and log, ``classify bench --json``) under a log
folder, so each figure in a table can be traced to the run that produced it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from google.protobuf import text_format

from benchmarks.worker_metrics import WorkerShare, free_port_run, scrape, share
from serving.protos.inference import model_config_pb2 as mc

__all__ = [
    "LoadResult",
    "Server",
    "Usage",
    "UsageProbe",
    "classify_bench",
    "format_table",
    "free_port",
    "perf_analyzer",
    "perf_analyzer_result",
    "repository",
    "sample_usage",
    "server_command",
    "server_flags",
    "server_repository",
    "start_classify_server",
    "start_named_server",
    "start_server",
]

_READY_TIMEOUT = 300.0
_CHANGE = re.compile(
    r"i(?P<instances>\d+)|d(?P<delay>\d+)|(?P<precision>fp16|fp32)|(?P<layout>nhwc|nchw)|t(?P<decode_threads>\d+)"
)


@dataclass
class Server:
    """A server process tree started for a benchmark, with the log it writes."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    metrics_ports: tuple[int, ...] = ()  # one per worker; none for the echo server
    repeat: int = 1  # 1 for the first server of its name in the log folder, 2 for the next, and so on

    @property
    def tag(self) -> str:
        """What this server's raw files are named by: its log's name, unique in the log folder."""
        return self.log.name.removesuffix(".server.log")

    def pids(self) -> list[int]:
        """The parent and every worker: all their CPU time is the server's."""
        try:
            parent = psutil.Process(self.process.pid)
            return [parent.pid, *(child.pid for child in parent.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def repository(
    source: Path,
    target: Path,
    models: Sequence[str],
    batching: bool = True,
    instances: int | None = None,
    delay_us: int | None = None,
    parameters: Mapping[str, str] | None = None,
) -> Path:
    """A model repository at ``target`` serving ``models`` from ``source`` (linked, not copied), with changes.

    ``batching=False`` gives the no-batching baseline: ``max_batch_size: 1`` and no ``dynamic_batching``, so
    every request runs alone, as soon as it arrives. ``instances`` and ``delay_us`` replace the instance count
    and the queue delay; ``parameters`` are set over the model's own.
    """
    target.mkdir(parents=True, exist_ok=True)
    for name in models:
        folder = target / name
        folder.mkdir(exist_ok=True)
        for entry in (source / name).iterdir():
            if entry.name != "config.pbtxt" and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry.resolve())
        config = text_format.Parse((source / name / "config.pbtxt").read_text(), mc.ModelConfig())
        if not batching:
            config.max_batch_size = 1
            config.ClearField("dynamic_batching")
        if instances is not None:
            config.instance_group[0].count = instances
        if delay_us is not None:
            config.dynamic_batching.max_queue_delay_microseconds = delay_us
        for key, value in (parameters or {}).items():
            config.parameters[key].string_value = value
        (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
    return target


def _changes(name: str) -> tuple[str, dict[str, str]]:
    """A server name's base and the settings it changes: ``server:i2:fp32`` -> ``server``,
    ``{"instances": "2", "precision": "fp32"}``."""
    base, *changes = name.split(":")
    if base not in ("server", "baseline"):
        raise ValueError(f"server {name!r}: the name starts with server or baseline")
    settings: dict[str, str] = {}
    for change in changes:
        match = _CHANGE.fullmatch(change)
        if match is None:
            raise ValueError(f"server {name!r}: unknown change {change!r} (iN, dN, fp16, fp32, nhwc, nchw, tN)")
        ((setting, value),) = ((key, value) for key, value in match.groupdict().items() if value is not None)
        if setting in settings:
            raise ValueError(f"server {name!r}: {change!r} changes the {setting} again")
        settings[setting] = value
    return base, settings


def server_repository(source: Path, scratch: Path, model: str, name: str) -> Path:
    """The repository for a named server: ``server`` (the committed config) or ``baseline`` (batching off), with
    changes after colons: ``:i2`` two instances, ``:d0`` no queue delay, ``:fp16`` and ``:fp32`` the precision
    on the GPU, ``:nhwc`` and ``:nchw`` the ``prefer_nhwc`` parameter on and off (``:tN`` is a server flag,
    ``server_flags``).

    Raises:
        ValueError: an unknown name or change, or one setting changed twice.
    """
    base, settings = _changes(name)
    parameters = {"precision": settings["precision"]} if "precision" in settings else {}
    if "layout" in settings:
        parameters["prefer_nhwc"] = "1" if settings["layout"] == "nhwc" else "0"
    return repository(
        source,
        scratch / name.replace(":", "-"),
        [model],
        batching=base == "server",
        instances=int(settings["instances"]) if "instances" in settings else None,
        delay_us=int(settings["delay"]) if "delay" in settings else None,
        parameters=parameters,
    )


def server_flags(name: str) -> list[str]:
    """The command-line flags a named server adds: ``:tN`` is ``--decode-threads N`` in each worker."""
    _, settings = _changes(name)
    return ["--decode-threads", settings["decode_threads"]] if "decode_threads" in settings else []


def server_command(
    repository: Path, port: int, device: str, workers: int, metrics_port: int = 0, flags: Sequence[str] = ()
) -> list[str]:
    """``classify-server`` on ``repository``, loopback only; worker i serves metrics on ``metrics_port`` + i."""
    return [
        sys.executable, "-m", "serving", "--model-repository", str(repository), "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(metrics_port), "--device", device, "--workers", str(workers),
        "--log-level", "info", *flags,
    ]  # fmt: skip


SERVER_READY = "serving.server: ready:"
ECHO_READY = "echo server listening"


def echo_command(repository: Path, port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.echo_server", "--model-repository", str(repository),
        "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(
    name: str,
    command: Sequence[str],
    port: int,
    ready_line: str,
    count: int,
    log_dir: Path,
    metrics_ports: Sequence[int] = (),
) -> Server:
    """Start ``command`` and wait until its log holds ``ready_line`` ``count`` times (once per worker). A name
    already measured in ``log_dir``, in this run or an earlier one, gets a numbered log
    (``server-i3.2.server.log``): a repeat keeps both."""
    stem = name.replace(":", "-")
    repeat = 1
    while (log := log_dir / f"{stem}{'' if repeat == 1 else f'.{repeat}'}.server.log").exists():
        repeat += 1
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Server(name, process, port, log, tuple(metrics_ports), repeat)
    give_up = time.monotonic() + _READY_TIMEOUT
    while log.read_text(errors="replace").count(ready_line) < count:
        if process.poll() is not None or time.monotonic() > give_up:
            server.stop()
            raise RuntimeError(f"{name} did not get ready; its log {log}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return server


def start_classify_server(
    name: str, repository: Path, device: str, workers: int, log_dir: Path, flags: Sequence[str] = ()
) -> Server:
    """``classify-server`` on ``repository`` on free ports, each worker's metrics on one of its own."""
    port, metrics = free_port(), free_port_run(workers)
    command = server_command(repository, port, device, workers, metrics, flags)
    return start_server(name, command, port, SERVER_READY, workers, log_dir, range(metrics, metrics + workers))


def start_named_server(
    name: str, source: Path, scratch: Path, model: str, device: str, workers: int, log_dir: Path
) -> Server:
    """The server ``name`` stands for (``server_repository``) with ``workers`` workers, or one for a baseline."""
    repository = server_repository(source, scratch, model, name)
    count = 1 if name.split(":")[0] == "baseline" else workers
    return start_classify_server(name, repository, device, count, log_dir, server_flags(name))


@dataclass
class Usage:
    """CPU and GPU use over one load run: the seconds its load generator measured (``window_s``), or all of it."""

    server_cores: float = 0.0  # CPU seconds of the server's processes per second of wall time
    process_cores: dict[int, float] = field(default_factory=dict)  # the same per pid (the server log names roles)
    box_percent: float = 0.0  # all cores, busy time, in percent
    gpu_percent: float | None = None  # nvidia-smi utilization.gpu, mean of its samples; None without a GPU
    workers: list[WorkerShare] = field(default_factory=list)  # each worker's requests and where their time went
    window_s: float | None = None  # the seconds measured: the load generator's own window; None: the whole block


@dataclass(frozen=True)
class _CpuSample:
    """Cumulative CPU counters read at one moment of time.monotonic()."""

    at: float
    processes: tuple[float, ...]  # CPU seconds of each server process
    box_busy: float  # busy seconds of all cores
    box_all: float  # all seconds of all cores


class UsageProbe:
    """What ``sample_usage`` recorded: CPU counters every 100 ms and the GPU's utilisation samples, each at its
    time.monotonic(), and each worker's share from its metrics at the block's start and end."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self.processes = processes
        self.cpu: list[_CpuSample] = []
        self.gpu: list[tuple[float, float]] = []  # (time.monotonic(), utilization.gpu)
        self.workers: list[WorkerShare] = []

    def sample(self) -> None:
        """Read the CPU counters now: at the block's start and end, and every 100 ms between."""
        box = psutil.cpu_times()
        last = self.cpu[-1].processes if self.cpu else (0.0,) * len(self.processes)
        spent = tuple(_cpu_seconds(p, seen) for p, seen in zip(self.processes, last, strict=True))
        self.cpu.append(_CpuSample(time.monotonic(), spent, sum(box) - box.idle, sum(box)))

    def over(self, window: tuple[float, float] | None = None) -> Usage:
        """The figures over ``window`` (time.monotonic() seconds inside the block, such as the measured window
        ``classify bench`` reports), or over the whole block; the workers' shares always cover the whole block.

        Raises:
            ValueError: the window does not lie inside the block.
        """
        times = [sample.at for sample in self.cpu]
        start, end = window or (times[0], times[-1])
        if not times[0] <= start < end <= times[-1]:
            block = f"{times[0]:.3f}-{times[-1]:.3f}"
            raise ValueError(f"window {start:.3f}-{end:.3f} s is not inside the sampled block, {block} s")
        seconds = end - start

        def grown(counter: Sequence[float]) -> float:
            return _growth(times, counter, (start, end))

        spent = [grown([sample.processes[i] for sample in self.cpu]) for i in range(len(self.processes))]
        process_cores = {p.pid: cpu / seconds for p, cpu in zip(self.processes, spent, strict=True)}
        busy = grown([sample.box_busy for sample in self.cpu])
        everything = grown([sample.box_all for sample in self.cpu])
        return Usage(
            server_cores=sum(process_cores.values()),
            process_cores=process_cores,
            box_percent=100.0 * busy / max(1e-9, everything),
            gpu_percent=_mean_inside(self.gpu, (start, end)),
            workers=self.workers,
            window_s=None if window is None else seconds,
        )


def _growth(times: Sequence[float], counter: Sequence[float], window: tuple[float, float]) -> float:
    """How much a cumulative counter read at ``times`` grew over ``window``, taken as linear between readings:
    a window's bounds fall between samples."""
    before, after = np.interp(window, times, counter)
    return float(after - before)


def _mean_inside(samples: Sequence[tuple[float, float]], window: tuple[float, float]) -> float | None:
    """The mean of the (time, value) samples taken inside ``window``; None if none was."""
    inside = [value for at, value in samples if window[0] <= at <= window[1]]
    return sum(inside) / len(inside) if inside else None


_SAMPLE_EVERY = 0.1  # seconds between CPU samples, as often as nvidia-smi samples the GPU


@contextlib.contextmanager
def sample_usage(server: Server) -> Iterator[UsageProbe]:
    """Sample the server's CPU time (in all and per process: workers share the port by connection, so their
    loads can differ), the whole box's and the GPU's utilisation while the block runs, and each worker's share
    from its metrics. After the block, ``probe.over(window)`` gives the figures over a window inside it: a load
    generator's start-up, warm-up and exit would dilute them."""
    probe = UsageProbe([psutil.Process(pid) for pid in server.pids()])
    metrics_before = [scrape(port) for port in server.metrics_ports]
    sampler = _GpuSampler(probe.gpu) if shutil.which("nvidia-smi") else None
    stop = threading.Event()
    thread = threading.Thread(target=_sample_until, args=(probe, stop), daemon=True)
    probe.sample()
    thread.start()
    try:
        yield probe
    finally:
        stop.set()
        thread.join()
        probe.sample()
        if sampler is not None:
            sampler.stop()
        probe.workers = [
            share(port, before, scrape(port)) for port, before in zip(server.metrics_ports, metrics_before, strict=True)
        ]


def _sample_until(probe: UsageProbe, stop: threading.Event) -> None:
    while not stop.wait(_SAMPLE_EVERY):
        probe.sample()


def _cpu_seconds(process: psutil.Process, last: float) -> float:
    """The process's CPU seconds so far; one that has exited keeps the ``last`` it was seen to use."""
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return last
    return float(times.user + times.system)


class _GpuSampler:
    """nvidia-smi printing GPU utilisation every 100 ms, read on a thread."""

    def __init__(self, samples: list[tuple[float, float]]) -> None:
        command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, args=(samples,), daemon=True)
        self.thread.start()

    def _read(self, samples: list[tuple[float, float]]) -> None:
        """Each line as (time.monotonic() when it came, utilisation)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                samples.append((time.monotonic(), float(line.split(",")[0])))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        self.thread.join(2)


@dataclass
class LoadResult:
    """One load run's figures: throughput in images/s, latencies in milliseconds."""

    generator: str
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int = 0
    usage: Usage = field(default_factory=Usage)
    raw: str = ""  # the file holding the generator's own output
    mean_ms: float | None = None  # mean latency of the answered requests
    window: tuple[float, float] | None = None  # the measured seconds on time.monotonic()'s clock, where known


# perf_analyzer's mean latency: its log's last summary line (its CSV holds it only as parts, and those only
# where the server reports statistics, which the echo server does not).
_AVG_LATENCY = re.compile(r"Avg latency: (\d+) usec")


def perf_analyzer(
    binary: str, model: str, port: int, concurrency: int, streaming: bool, log_dir: Path, tag: str
) -> LoadResult:
    """One concurrency level with Triton's perf_analyzer over the KServe v2 gRPC API (random uint8 input)."""
    report = log_dir / f"{tag}.perf_analyzer.csv"
    log = log_dir / f"{tag}.perf_analyzer.log"
    command = [
        binary, "-m", model, "-u", f"127.0.0.1:{port}", "-i", "grpc", "--async",
        f"--concurrency-range={concurrency}:{concurrency}", "--measurement-interval=2000", "--max-trials=8",
        "-f", str(report), *(["--streaming"] if streaming else []),
    ]  # fmt: skip
    # Stable: three windows within 25% of each other; where the latency at low load jitters more than that,
    # the second try accepts any three windows (perf_analyzer reports nothing at all when it finds none).
    for stability in (25, 100):
        with log.open("a") as out:
            subprocess.run(
                [*command, f"--stability-percentage={stability}"],
                stdout=out, stderr=subprocess.STDOUT, check=False, timeout=180,
            )  # fmt: skip
        if report.exists():
            break
    else:
        raise RuntimeError(f"perf_analyzer wrote no report; its log {log}:\n{log.read_text()[-2000:]}")
    return perf_analyzer_result(report, log)


def perf_analyzer_result(report: Path, log: Path) -> LoadResult:
    """One run's figures from perf_analyzer's CSV report and its log (for the mean)."""
    with report.open() as handle:
        row = next(csv.DictReader(handle))
    return LoadResult(
        generator="perf_analyzer",
        images_per_s=float(row["Inferences/Second"]),
        p50_ms=float(row["p50 latency"]) / 1000,
        p90_ms=float(row["p90 latency"]) / 1000,
        p99_ms=float(row["p99 latency"]) / 1000,
        raw=report.name,
        mean_ms=_mean_latency_ms(log),
    )


def _mean_latency_ms(log: Path) -> float | None:
    """The last run's mean latency in perf_analyzer's log; None if it printed none."""
    found = _AVG_LATENCY.findall(log.read_text(errors="replace"))
    return float(found[-1]) / 1000 if found else None


def classify_bench(
    address: str, model: str, arguments: Sequence[str], log_dir: Path, tag: str, duration: float = 5.0
) -> LoadResult:
    """One ``classify bench --json`` run (its own multi-process load generator)."""
    raw = log_dir / f"{tag}.bench.json"
    command = [
        sys.executable, "-m", "serving.client.cli", "bench", "--server", address, "--model", model,
        "--duration", str(duration), "--json", *arguments,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=duration + 120)
    raw.write_text(done.stdout + done.stderr)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"classify bench failed ({done.returncode}): {done.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(done.stdout)
    window = summary["window_monotonic_s"]
    return LoadResult(
        generator="classify bench",
        images_per_s=summary["images_per_s"],
        p50_ms=summary["p50_ms"] or 0.0,
        p90_ms=summary["p90_ms"] or 0.0,
        p99_ms=summary["p99_ms"] or 0.0,
        errors=summary["failed"],
        raw=raw.name,
        mean_ms=summary["mean_ms"],
        window=None if window is None else (window[0], window[1]),
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, right-aligned numbers, fit to its widest cell."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(header), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    gpu = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
    return {"cpus": os.cpu_count(), "gpu": gpu, "python": sys.version.split()[0]}
