"""Cat/dog from JPEG bytes, end to end over classify.v1: the server against its two limits and the baseline.

The photos are the 1,000 validation photos, sent as the JPEG files they are; the server decodes, crops and
batches them. Two ceilings bound the server:
- decode: ``serving.images.decode_image`` on every core at once, in-process (what the CPU can prepare);
- model: in-process ONNX Runtime at the precision the server ran (the ``precision`` column, from the
  server's log), from ``benchmarks.ceiling --json``.
The baseline is the same server with batching off (max batch 1, no delay) and one worker. ``srv cores``,
``box cpu%`` and ``gpu%`` cover the seconds ``classify bench`` measured (``usage.window_s``), not its
start-up, warm-up and exit; the columns from the workers' /metrics cover the whole run. ``in srv``: the
part of the client's mean latency spent inside the workers' handlers, from their /metrics; ``eng wait``,
``eng run``, ``eng infer`` and ``run imgs`` (with ``--workers N``): per batch a worker sent to the engine, its
wait there for the model instance, the time of the joined run that answered it (a batch split over two runs:
the later to end), the model's own part of that run (the rest is the engine joining inputs and splitting outputs)
and its images, and ``inst0`` the part of those batches run by the model's instance 0 (the engine's one
queue takes an idle instance 0 first, so a high share below full load means batches did not wait);
``dec wait``, ``dec ms`` and ``dec cpu``: per encoded image, its wait for a decode thread (behind other
images, its own request's included), the decode's wall time and its thread's CPU time in it (wall well above
CPU: the thread waited for its worker's GIL or a core).

    python -m benchmarks.catdog_grpc --photos data/catdog/cats_and_dogs_filtered_s224_q80.zip --workers 8 \\
        --ceiling-json ceiling.json --log-dir /tmp/catdog
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from benchmarks.harness import (
    classify_bench,
    environment,
    format_table,
    sample_usage,
    start_named_server,
)
from benchmarks.photos import CATDOG_INPUT, validation_photos
from benchmarks.worker_metrics import decode_split, engine_split, first_instance_share, idle_workers, inside_server
from serving.images import decode_image

MODEL = "catdog"


def extract_validation_photos(photos: Path, target: Path) -> Path:
    """The ``val/{cat,dog}`` JPEG files of the photo zip, unpacked as they are (not re-encoded)."""
    for name, data in validation_photos(photos).items():
        (target / name).write_bytes(data)
    return target


def _decode_for(folder: Path, seconds: float) -> int:
    """Decode the folder's photos in turn for ``seconds``; returns how many were decoded."""
    photos = [path.read_bytes() for path in sorted(folder.iterdir())]
    done = 0
    give_up = time.perf_counter() + seconds
    while time.perf_counter() < give_up:
        decode_image(photos[done % len(photos)], CATDOG_INPUT)
        done += 1
    return done


def decode_ceiling(folder: Path, processes: int, seconds: float) -> float:
    """Images/s decoded by ``processes`` processes at once."""
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_decode_for, [folder] * processes, [0.2] * processes))  # start and import everywhere first
        counts = list(pool.map(_decode_for, [folder] * processes, [seconds] * processes))
    return sum(counts) / seconds


def model_ceilings(path: Path | None) -> dict[str, float]:
    """The best in-process images/s for catdog per precision (``fp32``, ``fp16``), from ``benchmarks.ceiling``:
    the ``server`` variant at the precision it ran (what the server runs), the ``fp32`` or ``fp16`` variant at
    the other, at whichever instance count (``--instances``) the file measured did best. Rows from before the
    ``fp16`` field ran float16 only in the ``fp16`` variant."""
    best: dict[tuple[str, str], float] = {}
    for row in json.loads(path.read_text())["rows"] if path else []:
        if row["model"] == MODEL and row["variant"] in ("server", "fp32", "fp16"):
            key = (row["variant"], "fp16" if row.get("fp16", row["variant"] == "fp16") else "fp32")
            best[key] = max(best.get(key, 0.0), row["images_per_s"])
    ceilings = {precision: rate for (variant, precision), rate in best.items() if variant != "server"}
    return ceilings | {precision: rate for (variant, precision), rate in best.items() if variant == "server"}


def served_precision(log: Path) -> str:
    """``fp16`` where the server's log says the model is ready in float16, else ``fp32``."""
    ready = [line for line in log.read_text().splitlines() if f"model {MODEL} ready:" in line]
    return "fp16" if ready and ready[-1].endswith(" in float16") else "fp32"


def _ratio(rate: float, ceiling: float | None) -> float | None:
    return rate / ceiling if ceiling else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True, help="the cats/dogs photo zip")
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["server", "baseline"],
        help="server (the committed config), baseline (no batching, one worker), with changes after colons: "
        ":i2 (2 instances), :fp16 or :fp32 (precision on the GPU), :d0 (no queue delay), :nhwc or :nchw "
        "(prefer_nhwc on, off), :t2 (2 decode threads per worker)",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="images per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[128], help="requests in flight, in all")
    parser.add_argument("--bench-processes", type=int, default=4)
    parser.add_argument(
        "--bench-channels",
        type=int,
        default=4,
        help="connections per load process (workers share the port by connection: too few leave some idle)",
    )
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--ceiling-json", type=Path, help="benchmarks.ceiling --json output, for the model ceiling")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="catdog-grpc-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"environment": environment(), "workers": args.workers, "log_dir": str(args.log_dir)}))
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        (scratch / "photos").mkdir()
        photos = extract_validation_photos(args.photos, (scratch / "photos").resolve())
        cores = os.cpu_count() or 1
        decode_one, decode_all = decode_ceiling(photos, 1, 3.0), decode_ceiling(photos, cores, 3.0)
        print(json.dumps({"decode_1_process": decode_one, f"decode_{cores}_processes": decode_all}), flush=True)
        ceilings = model_ceilings(args.ceiling_json)
        for name in args.servers:
            server = start_named_server(
                name, args.model_repository, scratch, MODEL, args.device, args.workers, args.log_dir
            )
            precision = served_precision(server.log)
            try:
                for concurrency, batch, stream in itertools.product(args.concurrency, args.batches, (False, True)):
                    mode = "stream" if stream else "unary"
                    bench = ["--api", "classify", "--images", str(photos), "--batch", str(batch)]
                    bench += ["--concurrency", str(concurrency), "--processes", str(args.bench_processes)]
                    bench += ["--channels", str(args.bench_channels)]
                    bench += ["--stream"] if stream else []
                    tag = f"{server.tag}.b{batch}.c{concurrency}.{mode}"
                    with sample_usage(server) as probe:
                        address = f"127.0.0.1:{server.port}"
                        result = classify_bench(address, MODEL, bench, args.log_dir, tag, args.duration)
                    result.usage = probe.over(result.window)
                    row = {"server": name, "precision": precision, "batch": batch, "concurrency": concurrency}
                    rows.append(row | {"mode": mode} | asdict(result))
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                server.stop()
    summary = {"decode_1_process": decode_one, "decode_all_processes": decode_all, "model_ceilings": ceilings}
    (args.log_dir / "catdog_grpc.json").write_text(json.dumps({"ceilings": summary, "rows": rows}, indent=1))
    table = format_table(
        ["server", "precision", "batch", "conc", "mode", "images/s", "p50 ms", "p90 ms", "p99 ms", "errors",
         "srv cores", "box cpu%", "gpu%", "idle wkrs", "in srv", "eng wait", "eng run", "eng infer", "run imgs",
         "inst0", "dec wait", "dec ms", "dec cpu", "/decode", "/model"],
        [
            [row["server"], row["precision"], row["batch"], row["concurrency"], row["mode"], row["images_per_s"],
             row["p50_ms"], row["p90_ms"], row["p99_ms"],
             row["errors"], row["usage"]["server_cores"], row["usage"]["box_percent"],  # type: ignore[index]
             row["usage"]["gpu_percent"], idle_workers(row["usage"]["workers"]),  # type: ignore[index]
             inside_server(row["usage"]["workers"], row["mean_ms"]),  # type: ignore[index,arg-type]
             *(engine_split(row["usage"]["workers"]) or (None,) * 4),  # type: ignore[index]
             first_instance_share(row["usage"]["workers"]),  # type: ignore[index]
             *(decode_split(row["usage"]["workers"]) or (None,) * 3),  # type: ignore[index]
             float(row["images_per_s"]) / decode_all,  # type: ignore[arg-type]
             _ratio(float(row["images_per_s"]), ceilings.get(str(row["precision"])))]  # type: ignore[arg-type]
            for row in rows
        ],
    )  # fmt: skip
    header = (
        f"decode ceiling: {decode_one:,.0f} images/s on 1 process, {decode_all:,.0f} on {cores}; "
        "model ceiling: " + (", ".join(f"{p} {rate:,.0f}" for p, rate in sorted(ceilings.items())) or "-") + " images/s"
    )
    (args.log_dir / "catdog_grpc.txt").write_text(header + "\n" + table + "\n")
    print(header)
    print(table)


if __name__ == "__main__":
    main()
