"""The in-process ONNX Runtime ceiling: the limit that each server figure is divided by.

For every model and every batch bucket the server runs, random uint8 NHWC batches (what the server feeds)
go through ONNX Runtime in this process, numpy in and numpy out, for about ``--seconds`` after a warm-up
(batches above 16 for proportionally less, and never fewer than 20 runs).
Each variant is one lever the server might adopt, measured the same way against ``server``, which is exactly
what the server runs today (a ``ModelRuntime`` and its runner, at the precision the model's config asks for):

- ``fp32`` and ``fp16``: the server's runtime with the model in float32, or converted to float16 at load
  (``serving.precision``: uint8 in and FP32 out as before; accuracy: ``python -m benchmarks.onnx_variants
  accuracy``). float16 is a GPU lever, so on the CPU ``fp16`` is skipped;
- ``iobinding``: per bucket, an input preallocated on the session's device and updated in place, and a
  preallocated host output, bound once: the cost of ONNX Runtime's per-run allocation and numpy conversion.
  The host output is plain memory: ONNX Runtime 1.31 names no ``cuda_pinned`` device, and reaches pinned
  memory only through the CUDA plugin EP's memory info, which this package does not register by itself;
- ``cudagraph``: inputs and outputs on the GPU, one captured CUDA graph per bucket (CUDA only);
- ``nhwc``: the CUDA provider's ``prefer_nhwc`` (CUDA only);
- ``heuristic``: cuDNN's heuristic algorithm choice instead of the server's exhaustive search (CUDA only);
- ``pinned``: the server's runtime fed from page-locked host memory (``serving.page_locked``), as the
  engine's shared memory would be if registered with CUDA (CUDA only).

The ``diff`` column is the largest probability difference from the first variant run, on the same batch:
a variant that runs fast because it computes something else shows there.

``--instances N [M ...]`` opens N (then M, ...) instances of each variant the server could run that way
(not ``iobinding`` nor ``cudagraph``, bound to one session) and keeps all of them busy at once, one thread
each, as the engine does with a model's instances: the in-process limit for a server configured with N.

    python -m benchmarks.ceiling --device cuda --json /tmp/ceiling.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.harness import environment, format_table
from benchmarks.onnx_variants import newest_model
from serving.gpu_options import GpuOptions
from serving.model_config import ModelSpec, load_model_spec
from serving.page_locked import page_locked
from serving.runtime import Device, DeviceUnavailable, ModelRuntime, ProviderSelector, batch_buckets

__all__ = ["VARIANTS", "Row", "main"]

Infer = Callable[[np.ndarray], np.ndarray]

_CUDA_ONLY = {
    "cudagraph": "CUDA graphs are a CUDA provider feature",
    "nhwc": "prefer_nhwc is a CUDA provider option",
    "heuristic": "cudnn_conv_algo_search is a CUDA provider option",
    "fp16": "float16 is a GPU lever: the server runs the CPU in float32",
    "pinned": "page-locked host memory speeds copies to a GPU",
}
VARIANTS = ("server", "fp32", "iobinding", *_CUDA_ONLY)
_WARM_UP_RUNS = 5  # ONNX Runtime captures a CUDA graph only after a graph id's first few runs
_MIN_RUNS = 20  # per row, however long each run takes, so p99 is not just the slowest of a handful
_FULL_TIME_BATCH = 16  # larger batches are timed for --seconds * 16 / batch: their runs are long and steady
_ONE_SESSION = ("iobinding", "cudagraph")  # bound to instance 0's sessions: no --instances


@dataclass(frozen=True)
class Row:
    """One (model, variant, batch) measurement; latencies are per batch."""

    model: str
    variant: str
    batch: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    runs: int
    max_abs_diff: float | None  # against the first variant run on the same batch; None for that one
    providers: list[str]
    fp16: bool  # the model ran in float16
    instances: int = 1  # run at once, one thread each


@dataclass(frozen=True)
class _Built:
    """A variant ready to time: its sessions and, per bucket, one inference function per instance."""

    runtime: ModelRuntime
    infer: dict[int, list[Infer]]


def _runtime(
    path: Path, spec: ModelSpec, device: Device, fp16: bool | None = None, instances: int = 1, **cuda: str
) -> ModelRuntime:
    """``instances`` opened exactly as the server opens them, with ``cuda`` options over the server's own and
    ``fp16`` over the model's precision."""
    precision = spec.gpu.fp16 if fp16 is None else fp16
    options = {**dict(spec.gpu.cuda), **cuda}  # the variant's over the model's, over the process's
    gpu = GpuOptions(tuple(options.items()), precision)
    return ModelRuntime(path, instances, spec.max_batch_size, ProviderSelector(device), gpu)


def _as_served(runtime: ModelRuntime, buckets: Sequence[int]) -> _Built:
    return _Built(runtime, {bucket: list(runtime.runners) for bucket in buckets})


def _bound(runtime: ModelRuntime, buckets: Sequence[int], input_on: str, output_on: str, graphs: bool) -> _Built:
    """One IO binding per bucket, on the server's session for that bucket, over an input and an output
    preallocated on ``input_on`` and ``output_on``.

    For the CUDA provider the input must live on the GPU: ONNX Runtime copies a bound host input to the GPU
    when it is bound, not when it runs, so a host buffer updated in place would feed it a stale batch. With
    ``graphs``, each bucket runs under its own ``gpu_graph_id``, so a session that serves several buckets
    keeps one CUDA graph per bucket, each replayed against the fixed addresses bound here.
    """
    infer: dict[int, list[Infer]] = {}
    for graph_id, bucket in enumerate(buckets):
        session = runtime.instances[0][bucket]
        input_shape, output_shape = (bucket, *runtime.input.shape[1:]), (bucket, *runtime.output.shape[1:])
        images = ort.OrtValue.ortvalue_from_shape_and_type(input_shape, runtime.input.dtype, input_on, 0)
        scores = ort.OrtValue.ortvalue_from_shape_and_type(output_shape, runtime.output.dtype, output_on, 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(runtime.input.name, images)
        binding.bind_ortvalue_output(runtime.output.name, scores)
        run_options = ort.RunOptions()
        if graphs:
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        infer[bucket] = [_bound_run(session, binding, run_options, images, scores)]
    return _Built(runtime, infer)


def _bound_run(session: ort.InferenceSession, binding: Any, run_options: Any, images: Any, scores: Any) -> Infer:
    def run(batch: np.ndarray) -> np.ndarray:
        images.update_inplace(batch)  # host to GPU for the CUDA provider, a memcpy for the CPU one
        session.run_with_iobinding(binding, run_options)
        result: np.ndarray = scores.numpy()
        return result

    return run


def _build(variant: str, path: Path, spec: ModelSpec, device: Device, buckets: Sequence[int], instances: int) -> _Built:
    """Open the sessions of one variant; see the module docstring for what each one changes."""
    if variant in ("server", "fp32", "fp16", "pinned"):
        precision = {"fp32": False, "fp16": True}.get(variant)
        return _as_served(_runtime(path, spec, device, precision, instances), buckets)
    if variant == "iobinding":
        return _bound(_runtime(path, spec, device), buckets, device.value, "cpu", graphs=False)
    if variant == "cudagraph":
        return _bound(_runtime(path, spec, device, enable_cuda_graph="1"), buckets, "cuda", "cuda", graphs=True)
    if variant == "nhwc":
        return _as_served(_runtime(path, spec, device, instances=instances, prefer_nhwc="1"), buckets)
    heuristic = _runtime(path, spec, device, instances=instances, cudnn_conv_algo_search="HEURISTIC")
    return _as_served(heuristic, buckets)


def _host_memory(variant: str, batch: np.ndarray) -> AbstractContextManager[object]:
    """Where the timed runs read their batch from: page-locked memory for ``pinned``, else as it is."""
    return page_locked(batch) if variant == "pinned" else nullcontext()


def _time(infers: Sequence[Infer], batch: np.ndarray, seconds: float) -> tuple[list[int], int]:
    """Per-run latencies (ns) of every instance, each kept busy on its own thread, and the wall time from the
    start until the last one stops, after the warm-up runs."""
    for infer in infers:
        for _ in range(_WARM_UP_RUNS):
            infer(batch)
    latencies: list[list[int]] = [[] for _ in infers]
    ends = [0] * len(infers)
    start = time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)

    def keep_busy(index: int) -> None:
        mine, now = latencies[index], time.perf_counter_ns()
        while len(mine) < _MIN_RUNS or now < deadline:
            infers[index](batch)
            mine.append(time.perf_counter_ns() - now)
            now += mine[-1]
        ends[index] = now

    threads = [threading.Thread(target=keep_busy, args=(index,)) for index in range(len(infers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [latency for mine in latencies for latency in mine], max(ends) - start


def _measure_model(name: str, args: argparse.Namespace, device: Device, variants: Sequence[str]) -> list[Row]:
    model_dir = args.model_repository / name
    spec = load_model_spec(model_dir)
    buckets = [b for b in batch_buckets(spec.max_batch_size) if args.max_batch is None or b <= args.max_batch]
    shape = (spec.input.height, spec.input.width, spec.input.channels)
    rng = np.random.default_rng(0)
    batches = {bucket: rng.integers(0, 256, (bucket, *shape), dtype=np.uint8) for bucket in buckets}
    references: dict[int, np.ndarray] = {}
    rows: list[Row] = []
    # Each variant at each instance count; the one-session variants once, at one.
    plan = {
        (variant, 1 if variant in _ONE_SESSION else count): None for variant in variants for count in args.instances
    }
    for variant, instances in plan:
        built = _build(variant, newest_model(model_dir), spec, device, buckets, instances)
        for bucket in buckets:
            batch = batches[bucket]
            scores = built.infer[bucket][0](batch).copy()
            reference = references.setdefault(bucket, scores)
            seconds = args.seconds * min(1.0, _FULL_TIME_BATCH / bucket)
            with _host_memory(variant, batch):
                latencies, wall_ns = _time(built.infer[bucket], batch, seconds)
            rows.append(
                Row(
                    model=name,
                    variant=variant,
                    batch=bucket,
                    images_per_s=bucket * len(latencies) / (wall_ns / 1e9),
                    p50_ms=float(np.percentile(latencies, 50)) / 1e6,
                    p99_ms=float(np.percentile(latencies, 99)) / 1e6,
                    runs=len(latencies),
                    max_abs_diff=None if scores is reference else float(np.abs(scores - reference).max()),
                    providers=built.runtime.providers,
                    fp16=built.runtime.fp16,
                    instances=instances,
                )
            )
            print(json.dumps(asdict(rows[-1])), flush=True)
        built.runtime.close()  # free this variant's GPU memory before the next one opens its sessions
    return rows


def _table(rows: Sequence[Row]) -> str:
    headers = ["model", "variant", "inst", "batch", "images/s", "p50 ms", "p99 ms", "runs", "diff"]
    cells = [
        [r.model, r.variant, r.instances, r.batch, r.images_per_s, f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}", r.runs,
         _diff(r)]
        for r in rows
    ]  # fmt: skip
    return format_table(headers, cells)


def _diff(row: Row) -> str | None:
    return None if row.max_abs_diff is None else f"{row.max_abs_diff:.1e}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs="+", default=["digits", "catdog"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="timed seconds per row, less above batch 16 (at least 20 runs)"
    )
    parser.add_argument("--max-batch", type=int, default=None, help="only buckets up to this size (quick checks)")
    parser.add_argument(
        "--instances",
        type=int,
        nargs="+",
        default=[1],
        help="instance counts, each kept busy at once, one thread per instance (not iobinding, cudagraph)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    args = parser.parse_args(argv)
    device = Device(args.device)
    variants = list(args.variants)
    if device is Device.CPU:
        for variant in [v for v in variants if v in _CUDA_ONLY]:
            print(f"skipping {variant} on the CPU: {_CUDA_ONLY[variant]}")
            variants.remove(variant)
    rows: list[Row] = []
    try:
        for name in args.models:
            rows += _measure_model(name, args, device, variants)
    except DeviceUnavailable as exc:
        parser.exit(2, f"{exc}\n")
    providers = [list(names) for names in sorted({tuple(row.providers) for row in rows})]
    header = f"onnxruntime {ort.__version__}, --device {args.device}, providers {' / '.join(map(str, providers))}"
    if args.json:
        summary = {"onnxruntime": ort.__version__, "device": args.device, "providers": providers}
        document = summary | {"seconds": args.seconds, "environment": environment()}
        document["rows"] = [asdict(row) for row in rows]
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    print(header)
    print(f"diff: max |p - p_ref| against {variants[0]} on the same batch" if variants else "no variant to run")
    print(_table(rows))


if __name__ == "__main__":
    main()
