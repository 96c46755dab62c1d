"""``classify bench`` against a real server: both APIs, unary and streaming, synthetic and real images, errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.client.bench import _kserve_stream_error, add_bench_parser
from serving.protos.inference import grpc_service_pb2
from tests.serving.conftest import ServerProcess, free_port, write_repository

SUMMARY_FIELDS = {
    "target": str,
    "model": str,
    "api": str,
    "stream": bool,
    "concurrency": int,
    "processes": int,
    "channels": int,
    "streams": int,
    "batch": int,
    "warmup_s": float,
    "duration_s": float,
    "requests": int,
    "failed": int,
    "images": int,
    "requests_per_s": float,
    "images_per_s": float,
    "p50_ms": float,
    "p90_ms": float,
    "p99_ms": float,
    "max_ms": float,
    "mean_ms": float,
    "errors": dict,
    "error_messages": dict,
}
TABLE_ROWS = (
    "target",
    "api",
    "stream",
    "concurrency",
    "processes",
    "duration",
    "requests",
    "images",
    "requests/s",
    "images/s",
    "latency p50",
    "latency p90",
    "latency p99",
    "latency max",
    "errors",
)


def bench(*argv: str) -> int:
    """``classify bench ARGV``, parsed as the ``classify`` CLI parses it (a ``common`` parent with the server flags)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default="localhost:8001")
    common.add_argument("--timeout", type=float)
    common.add_argument("--tls-ca", type=Path)
    common.add_argument("--tls-cert", type=Path)
    common.add_argument("--tls-key", type=Path)
    parser = argparse.ArgumentParser(prog="classify")
    add_bench_parser(parser.add_subparsers(required=True), common)
    args = parser.parse_args(["bench", *argv])
    status: int = args.func(args)
    return status


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    status = bench(*argv, "--json")
    return status, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def bench_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A CPU server with small batches, for this module's load alone (the session server's metrics stay as they are)."""
    folder = tmp_path_factory.mktemp("bench")
    process = ServerProcess(
        ["--model-repository", str(write_repository(folder / "models")), "--device", "cpu"], folder / "server.log"
    )
    try:
        process.wait_serving()
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def photos(photo_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 4 cat and 4 dog JPEGs from the validation split, in sub-folders, as a user would have them."""
    folder = tmp_path_factory.mktemp("photos")
    with zipfile.ZipFile(photo_zip) as archive:
        names = [name for name in archive.namelist() if name.startswith("val/") and name.endswith(".jpg")]
        for label in ("cat", "dog"):
            for name in [n for n in names if f"/{label}/" in n][:4]:
                archive.extract(name, folder)
    return folder


def _assert_clean_run(summary: dict[str, Any]) -> None:
    assert summary["failed"] == 0, summary["error_messages"]
    assert summary["errors"] == {}
    assert summary["requests"] > 0
    assert summary["requests_per_s"] > 0
    assert summary["images_per_s"] == pytest.approx(summary["requests_per_s"] * summary["batch"])
    assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]


@pytest.mark.parametrize(
    ("api", "stream"), [("classify", False), ("kserve", False), ("classify", True), ("kserve", True)]
)
def test_digits_synthetic_load(
    bench_server: ServerProcess, capsys: pytest.CaptureFixture[str], api: str, stream: bool
) -> None:
    """2 s of random digit tensors over each API, unary and streamed: throughput, latency, no errors."""
    argv = ["--server", bench_server.address, "--model", "digits", "--api", api, "--concurrency", "8"]
    argv += ["--duration", "2", "--warmup", "0.3", *(["--stream", "--stream-depth", "4"] if stream else [])]
    status, summary = run_json(capsys, *argv)
    assert status == 0
    _assert_clean_run(summary)
    assert (summary["api"], summary["stream"], summary["model"]) == (api, stream, "digits")
    assert (summary["concurrency"], summary["processes"], summary["duration_s"]) == (8, 1, 2.0)
    assert summary["streams"] == (2 if stream else 0)


def test_catdog_photos_from_a_folder_print_a_table(
    bench_server: ServerProcess, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real JPEGs sent as encoded images for 2 s; the table names every figure."""
    argv = ["--server", bench_server.address, "--model", "catdog", "--images", str(photos)]
    status = bench(*argv, "--concurrency", "4", "--duration", "2", "--warmup", "0.3")
    table = capsys.readouterr().out
    assert status == 0, table
    rows = {line[:13].strip(): line[14:] for line in table.splitlines()}
    assert set(TABLE_ROWS) <= set(rows), table
    assert (rows["target"], rows["api"], rows["stream"], rows["errors"]) == (
        bench_server.address,
        "classify",
        "no",
        "none",
    )
    assert rows["requests"].endswith("(0 failed)")
    assert float(rows["images/s"].replace(",", "")) > 0
    assert rows["latency p99"].endswith(" ms")


def test_catdog_photos_decoded_for_kserve(
    bench_server: ServerProcess, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """KServe takes raw tensors: the photos, matched by a glob, are decoded and cropped to 224x224 once, here."""
    argv = ["--server", bench_server.address, "--model", "catdog", "--api", "kserve"]
    status, summary = run_json(capsys, *argv, "--images", f"{photos}/**/*.jpg", "--batch", "3", "--requests", "6")
    assert status == 0
    _assert_clean_run(summary)
    assert (summary["requests"], summary["images"]) == (6, 18)


@pytest.mark.parametrize("stream", [False, True])
def test_exact_request_count_across_processes(
    bench_server: ServerProcess, capsys: pytest.CaptureFixture[str], stream: bool
) -> None:
    """--requests 50 sends exactly 50 counted requests, split over 2 load processes."""
    argv = ["--server", bench_server.address, "--model", "digits", "--concurrency", "6", "--processes", "2"]
    status, summary = run_json(capsys, *argv, "--requests", "50", "--batch", "2", *(["--stream"] if stream else []))
    assert status == 0
    _assert_clean_run(summary)
    assert (summary["requests"], summary["images"], summary["processes"]) == (50, 100, 2)
    assert summary["warmup_s"] == 0


@pytest.mark.parametrize(
    ("concurrency", "channels", "streams", "depth"),
    [(8, 3, 6, 2),  # 4 a process: one stream on each of 3 connections, 2 + 1 + 1
     (96, 2, 8, 12),  # 48 a process fit 3 streams of 16: 4 of 12, two on each connection
     (2, 3, 2, 1)],  # 1 a process: one stream, however many connections
)  # fmt: skip
def test_streams_spread_evenly_over_the_connections(
    bench_server: ServerProcess,
    capsys: pytest.CaptureFixture[str],
    concurrency: int,
    channels: int,
    streams: int,
    depth: int,
) -> None:
    """Workers share the port by connection: each of a process's --channels carries as many streams as the
    next, even when --stream-depth would fit its share of the concurrency on fewer."""
    argv = ["--server", bench_server.address, "--model", "digits", "--stream", "--requests", "120"]
    status, summary = run_json(
        capsys, *argv, "--concurrency", str(concurrency), "--processes", "2", "--channels", str(channels)
    )
    assert status == 0
    _assert_clean_run(summary)
    assert (summary["streams"], summary["stream_depth"]) == (streams, depth)


def test_json_has_the_documented_fields(bench_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    status, summary = run_json(capsys, "--server", bench_server.address, "--model", "digits", "--requests", "10")
    assert status == 0
    assert set(summary) == set(SUMMARY_FIELDS) | {"stream_depth", "window_monotonic_s"}
    for field, kind in SUMMARY_FIELDS.items():
        assert isinstance(summary[field], (int, float) if kind is float else kind), field
    assert summary["stream_depth"] is None
    assert summary["window_monotonic_s"] is None, "counting requests, no process's window is the run's"
    assert summary["target"] == bench_server.address


@pytest.mark.parametrize("processes", [1, 2])
def test_the_measured_window_is_on_the_callers_monotonic_clock(
    bench_server: ServerProcess, capsys: pytest.CaptureFixture[str], processes: int
) -> None:
    """The measured seconds, on the clock every process on the machine shares: after the warm-up that followed
    the call, as long as the run's duration (longer by how much later than the first the last process woke),
    and over before the call returned."""
    argv = ["--server", bench_server.address, "--model", "digits", "--concurrency", "4", "--processes", str(processes)]
    before = time.monotonic()
    status, summary = run_json(capsys, *argv, "--duration", "1", "--warmup", "0.3")
    after = time.monotonic()
    assert status == 0
    begin, end = summary["window_monotonic_s"]
    assert summary["duration_s"] == pytest.approx(1.0)
    if processes == 1:
        assert end - begin == pytest.approx(1.0)
    assert 1.0 <= end - begin < 1.5
    assert before + 0.3 < begin < end < after


@pytest.mark.parametrize("stream", [False, True])
def test_failed_requests_are_counted_by_status(
    bench_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str], stream: bool
) -> None:
    """A file that is no image fails every request with INVALID_ARGUMENT; the run goes on and exits 1."""
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image at all")
    argv = ["--server", bench_server.address, "--model", "digits", "--images", str(bad), "--requests", "12"]
    status, summary = run_json(capsys, *argv, *(["--stream"] if stream else []))
    assert status == 1
    assert (summary["requests"], summary["failed"], summary["images"]) == (12, 12, 0)
    assert summary["errors"] == {"INVALID_ARGUMENT": 12}
    assert "unrecognised image data" in summary["error_messages"]["INVALID_ARGUMENT"]
    assert summary["p50_ms"] is None
    assert summary["requests_per_s"] == 0


def test_unreachable_server_exits_2_naming_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    assert bench("--server", address, "--model", "digits", "--requests", "1") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot reach" in captured.err
    assert address in captured.err


@pytest.mark.parametrize("api", ["classify", "kserve"])
def test_unknown_model_exits_2(bench_server: ServerProcess, capsys: pytest.CaptureFixture[str], api: str) -> None:
    assert bench("--server", bench_server.address, "--model", "letters", "--api", api, "--requests", "1") == 2
    err = capsys.readouterr().err
    assert "'letters'" in err
    assert "catdog, digits" in err


def test_images_that_kserve_cannot_use_exit_2(
    bench_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Decoding for KServe happens before any load: an undecodable file or a missing path is a usage error."""
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image at all")
    base = ["--server", bench_server.address, "--model", "digits", "--api", "kserve", "--requests", "1"]
    assert bench(*base, "--images", str(bad)) == 2
    assert f"{bad}: unrecognised image data" in capsys.readouterr().err
    assert bench(*base, "--images", str(tmp_path / "missing")) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err


def test_duration_and_requests_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench("--model", "digits", "--duration", "1", "--requests", "5")
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_kserve_stream_errors_are_counted_without_a_status() -> None:
    """ModelStreamInferResponse has only a message: bench counts such failures as ERROR."""
    failed = grpc_service_pb2.ModelStreamInferResponse(error_message="model queue is full")
    assert _kserve_stream_error(failed.SerializeToString()) == ("ERROR", "model queue is full")
    answered = grpc_service_pb2.ModelStreamInferResponse(infer_response=grpc_service_pb2.ModelInferResponse(id="7"))
    assert _kserve_stream_error(answered.SerializeToString()) is None


def test_the_installed_classify_script_runs_bench(bench_server: ServerProcess) -> None:
    """What users type: ``classify bench`` for a few seconds reports non-zero throughput and no errors."""
    script = Path(sys.executable).with_name("classify")
    result = subprocess.run(
        [str(script), "bench", "--server", bench_server.address, "--model", "digits", "--duration", "2",
         "--warmup", "0.5", "--concurrency", "8", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images_per_s"] > 0
    assert report["failed"] == 0
    assert report["errors"] == {}
