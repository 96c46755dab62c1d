"""The gRPC benchmarks on the CPU: every server they start answers, and every row keeps its raw output and ratios."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format

from benchmarks import catdog_grpc, digits_grpc
from benchmarks.harness import (
    ECHO_READY,
    echo_command,
    free_port,
    perf_analyzer,
    perf_analyzer_result,
    server_flags,
    server_repository,
    start_server,
)
from benchmarks.worker_metrics import decode_split, inside_server
from serving.protos.inference import model_config_pb2 as mc

PERF_ANALYZER = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")


def _config(repository: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repository / model / "config.pbtxt").read_text(), mc.ModelConfig())


def _ratio_cells(table: str, server: str, columns: int) -> list[list[str]]:
    """The last ``columns`` cells of each row (below the header and its rule) that starts with ``server``."""
    return [line.split()[-columns:] for line in table.splitlines()[2:] if line.split()[:1] == [server]]


def test_server_repository_names_change_only_what_they_say(repo_root: Path, tmp_path: Path) -> None:
    """``baseline`` turns batching off; ``server:i2:d0:fp16`` sets instances, delay and precision."""
    models = repo_root / "models"
    committed = _config(models, "digits")

    baseline = _config(server_repository(models, tmp_path, "digits", "baseline"), "digits")
    assert baseline.max_batch_size == 1
    assert not baseline.HasField("dynamic_batching")

    variant = server_repository(models, tmp_path, "digits", "server:i2:d0:fp16")
    config = _config(variant, "digits")
    assert config.instance_group[0].count == 2
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.max_batch_size == committed.max_batch_size
    assert config.parameters["precision"].string_value == "fp16"
    assert (variant / "digits/1/model.onnx").resolve() == (models / "digits/1/model.onnx").resolve()
    fp32 = _config(server_repository(models, tmp_path, "catdog", "server:fp32"), "catdog")
    assert fp32.parameters["precision"].string_value == "fp32"
    fp32_baseline = _config(server_repository(models, tmp_path, "catdog", "baseline:fp32"), "catdog")
    assert fp32_baseline.max_batch_size == 1
    assert fp32_baseline.parameters["precision"].string_value == "fp32"

    served = _config(server_repository(models, tmp_path, "digits", "server"), "digits")
    assert served == committed, "the plain server runs the committed, tuned config"


def test_decode_threads_are_a_server_flag_not_a_config_change(repo_root: Path, tmp_path: Path) -> None:
    models = repo_root / "models"
    assert server_flags("server:t2:i1") == ["--decode-threads", "2"]
    assert server_flags("server:i1") == []
    threads = _config(server_repository(models, tmp_path / "a", "digits", "server:t2:i1"), "digits")
    assert threads == _config(server_repository(models, tmp_path / "b", "digits", "server:i1"), "digits")


@pytest.mark.parametrize(
    ("name", "error"),
    [("server:fp61", "unknown change 'fp61'"), ("server:fp16:fp32", "changes the precision again"),
     ("server:t2:t4", "changes the decode_threads again"), ("fast", "starts with server or baseline")],
)  # fmt: skip
def test_a_server_name_that_says_nothing_clear_is_refused(
    repo_root: Path, tmp_path: Path, name: str, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        server_repository(repo_root / "models", tmp_path, "digits", name)


def test_model_ceilings_take_the_server_at_its_precision_and_a_variant_at_the_other(repo_root: Path) -> None:
    """Before FP16 serving the server ran FP32 and only the fp16 variant FP16; after, the server is FP16."""
    results = repo_root / "benchmarks/results/h200"
    before = catdog_grpc.model_ceilings(results / "ceiling.json")
    after = catdog_grpc.model_ceilings(results / "fp16-served/ceiling-catdog.json")
    assert before == pytest.approx({"fp32": 8786.41, "fp16": 11157.05}, abs=0.01)
    assert after == pytest.approx({"fp32": 8767.96, "fp16": 11855.05}, abs=0.01)
    assert catdog_grpc.model_ceilings(None) == {}


def test_digits_grpc_measures_server_baseline_and_echo_in_one_run(repo_root: Path, tmp_path: Path) -> None:
    """Each of the three servers answers unary and streamed load without errors; ratios divide by the same row."""
    logs = tmp_path / "logs"
    digits_grpc.main(
        ["--model-repository", str(repo_root / "models"), "--device", "cpu", "--workers", "1",
         "--bench-apis", "kserve", "--bench-concurrency", "8", "--bench-processes", "1", "--duration", "1",
         "--log-dir", str(logs)]
    )  # fmt: skip
    rows = json.loads((logs / "digits_grpc.json").read_text())
    expected = {(server, mode) for server in ("server", "baseline", "echo") for mode in ("unary", "stream")}
    assert {(row["server"], row["mode"]) for row in rows} == expected
    assert all(row["images_per_s"] > 0 and row["errors"] == 0 for row in rows)
    assert all((logs / row["raw"]).is_file() for row in rows)
    assert all(row["usage"]["server_cores"] > 0 for row in rows), "the server's CPU time is sampled"
    for row in rows:  # each process apart too, so uneven workers show
        assert row["usage"]["server_cores"] == pytest.approx(sum(row["usage"]["process_cores"].values()))
    for row in rows:  # over the seconds classify bench measured, not its start-up, warm-up and exit
        begin, end = row["window"]
        assert row["usage"]["window_s"] == pytest.approx(end - begin) == pytest.approx(1.0)
    for row in rows:  # and each worker's requests and time split, from its metrics (the echo server has none)
        shares = row["usage"]["workers"]
        if row["server"] == "echo":
            assert shares == []
            continue
        ((worker,),) = [shares]
        bench = json.loads((logs / row["raw"]).read_text())
        assert worker["requests"] >= bench["requests"], "the worker answered every measured request"
        assert 0 <= worker["queue_ms"] <= worker["request_ms"]
        assert worker["compute_ms"] > 0
        assert worker["batch"] >= 1
        inside = inside_server(shares, row["mean_ms"])
        assert inside is not None
        assert 0 < inside <= 1.05, "the handlers' time is part of what the client waited (clocks apart: 5%)"
    assert "idle wkrs" in (logs / "digits_grpc.txt").read_text()

    rates = {(row["server"], row["mode"]): row["images_per_s"] for row in rows}
    table = (logs / "digits_grpc.txt").read_text()
    for (to_echo, to_baseline), mode in zip(_ratio_cells(table, "server", 2), ("unary", "stream"), strict=True):
        assert float(to_echo) == pytest.approx(rates["server", mode] / rates["echo", mode], abs=0.006)
        assert float(to_baseline) == pytest.approx(rates["server", mode] / rates["baseline", mode], abs=0.006)


@pytest.mark.skipif(PERF_ANALYZER is None, reason="Triton's perf_analyzer is not installed (it needs glibc 2.38)")
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_perf_analyzer_drives_the_echo_server(repo_root: Path, tmp_path: Path, streaming: bool) -> None:
    """perf_analyzer reads the echo server's KServe metadata, sends random input and reports a stable window."""
    assert PERF_ANALYZER is not None
    port = free_port()
    echo = start_server("echo", echo_command(repo_root / "models", port, 1), port, ECHO_READY, 1, tmp_path)
    try:
        result = perf_analyzer(PERF_ANALYZER, "digits", port, 4, streaming, tmp_path, "echo")
    finally:
        echo.stop()
    assert result.images_per_s > 0
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.mean_ms is not None
    assert 0 < result.mean_ms <= result.p99_ms
    assert (tmp_path / result.raw).is_file()


def test_catdog_grpc_sends_the_validation_jpegs(repo_root: Path, data_dir: Path, tmp_path: Path) -> None:
    """Server and baseline classify the photos without errors; /model divides by the ceiling file's best row
    at the precision the server ran: FP32 on the CPU, whatever the config asks of a GPU."""
    logs = tmp_path / "logs"
    ceiling = repo_root / "benchmarks/results/h200/ceiling.json"
    catdog_grpc.main(
        ["--photos", str(data_dir / "catdog/cats_and_dogs_filtered_s224_q80.zip"),
         "--model-repository", str(repo_root / "models"), "--device", "cpu", "--workers", "1", "--batches", "2",
         "--concurrency", "2", "4", "--bench-processes", "1", "--duration", "1", "--ceiling-json", str(ceiling),
         "--log-dir", str(logs)]
    )  # fmt: skip
    document = json.loads((logs / "catdog_grpc.json").read_text())
    rows = document["rows"]
    assert [(row["server"], row["concurrency"], row["mode"]) for row in rows] == [
        (server, concurrency, mode)
        for server in ("server", "baseline")
        for concurrency in (2, 4)
        for mode in ("unary", "stream")
    ]
    assert len({row["raw"] for row in rows}) == len(rows), "each run keeps its own raw file"
    assert all(row["images_per_s"] > 0 and row["errors"] == 0 for row in rows)
    ceilings = document["ceilings"]
    assert ceilings["decode_1_process"] > 0
    assert ceilings["decode_all_processes"] > 0
    assert ceilings["model_ceilings"] == pytest.approx({"fp32": 8786.41, "fp16": 11157.05}, abs=0.01)
    assert {row["precision"] for row in rows} == {"fp32"}, "the committed FP16 config runs FP32 on the CPU"
    for row in rows:  # every worker timed each JPEG it decoded: the wait for a thread, wall and CPU time
        wait_ms, wall_ms, cpu_ms = decode_split(row["usage"]["workers"]) or pytest.fail(f"no decode split: {row}")
        assert wait_ms > 0
        assert 0 < cpu_ms <= wall_ms + 0.01
    table = (logs / "catdog_grpc.txt").read_text()
    (to_decode, to_model), *_ = _ratio_cells(table, "server", 2)
    assert float(to_model) == pytest.approx(rows[0]["images_per_s"] / ceilings["model_ceilings"]["fp32"], abs=0.006)
    assert float(to_decode) == pytest.approx(rows[0]["images_per_s"] / ceilings["decode_all_processes"], abs=0.006)


def test_the_precision_column_is_what_the_server_logged(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    ready = "INFO serving.repository: model catdog ready: versions [1] on CUDAExecutionProvider, CPUExecutionProvider"
    log.write_text(f"{ready} in float16\n")
    assert catdog_grpc.served_precision(log) == "fp16"
    log.write_text(f"{ready}\n")
    assert catdog_grpc.served_precision(log) == "fp32"


def test_a_server_measured_twice_keeps_both_runs_raw_files(repo_root: Path, tmp_path: Path) -> None:
    """Alternating A/B runs name a server more than once; the second must not overwrite the first's logs."""
    logs = tmp_path / "logs"
    digits_grpc.main(
        ["--model-repository", str(repo_root / "models"), "--servers", "echo", "echo", "--modes", "unary",
         "--bench-apis", "kserve", "--bench-concurrency", "4", "--bench-processes", "1", "--workers", "1",
         "--duration", "0.5", "--log-dir", str(logs)]
    )  # fmt: skip
    rows = json.loads((logs / "digits_grpc.json").read_text())
    assert [row["raw"] for row in rows] == ["echo.kserve.unary.bench.json", "echo.2.kserve.unary.bench.json"]
    assert [row["run"] for row in rows] == [1, 2]
    assert all((logs / row["raw"]).is_file() for row in rows)
    assert (logs / "echo.server.log").is_file()
    assert (logs / "echo.2.server.log").is_file()


@pytest.mark.parametrize("server", ["server", "echo"])
def test_perf_analyzer_figures_are_read_from_its_report_and_log(repo_root: Path, server: str) -> None:
    """A real H200 run's files: the CSV gives rate and percentiles; the mean comes from the log, because the
    CSV holds it only as parts, and those only where the server reports statistics (the echo server does not)."""
    raw = repo_root / "benchmarks/results/h200/shares/digits"
    result = perf_analyzer_result(
        raw / f"{server}.kserve.unary.c512.perf_analyzer.csv", raw / f"{server}.kserve.unary.c512.perf_analyzer.log"
    )
    expected = {"server": (26888.8, 18.311, 37.52, 18.866), "echo": (42952.2, 11.213, 25.25, 11.809)}[server]
    assert (result.images_per_s, result.p50_ms, result.p99_ms, result.mean_ms) == pytest.approx(expected)


def test_alternated_runs_divide_by_the_echo_run_of_the_same_repeat() -> None:
    """--servers server echo server echo: the second server run is compared with the second echo run."""

    def row(server: str, run: int, rate: float) -> dict[str, object]:
        usage: dict[str, object] = {"server_cores": 1.0, "box_percent": 50.0, "gpu_percent": None, "workers": []}
        return {"server": server, "run": run, "generator": "perf_analyzer", "api": "kserve", "mode": "unary",
                "concurrency": 8, "images_per_s": rate, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "errors": 0,
                "usage": usage, "mean_ms": 1.0}  # fmt: skip

    rows = [row("server", 1, 100.0), row("echo", 1, 200.0), row("server", 2, 300.0), row("echo", 2, 400.0)]
    to_echo = [cells[0] for cells in _ratio_cells(digits_grpc._table(rows), "server", 2)]
    assert to_echo == ["0.50", "0.75"]
