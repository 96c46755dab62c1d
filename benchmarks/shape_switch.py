"""What a change of batch size costs one ONNX Runtime session, and what a session per bucket saves.

Three ways to run the same stream of batches whose sizes change from one run to the next (as a dynamic
batcher's do under uneven load): the sizes in a fixed order on one session; the same sizes on one session
per size (the server's runtime); and for scale, one size repeated on one session.

    python -m benchmarks.shape_switch --device cuda
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.harness import format_table
from serving.model_config import load_model_spec
from serving.runtime import Device, ModelRuntime, ProviderSelector


def _run_session(session: ort.InferenceSession, input_name: str, output_name: str, images: np.ndarray) -> object:
    return session.run([output_name], {input_name: images})


def _per_run_ms(run: object, batches: list[np.ndarray], rounds: int) -> float:
    assert callable(run)
    for images in batches:
        run(images)
    started = time.perf_counter()
    for _ in range(rounds):
        for images in batches:
            run(images)
    return (time.perf_counter() - started) * 1e3 / (rounds * len(batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs="+", default=["digits", "catdog"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 2, 16, 4, 32])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for name in args.models:
        spec = load_model_spec(args.model_repository / name)
        path = args.model_repository / name / "1" / "model.onnx"
        sizes = [size for size in args.sizes if size <= spec.max_batch_size]
        batches = [np.zeros((size, *spec.input.shape), np.uint8) for size in sizes]
        selector = ProviderSelector(Device(args.device))
        per_bucket = ModelRuntime(path, 1, spec.max_batch_size, selector)
        one_session = ModelRuntime(path, 1, max(sizes), selector)
        shared = next(iter(one_session.instances[0].values()))  # every size on this one session
        on_one_session = functools.partial(_run_session, shared, one_session.input.name, one_session.output.name)

        same = [batches[sizes.index(max(sizes))]] * len(sizes)
        for label, run, stream in (
            ("one session, one size", on_one_session, same),
            ("one session, sizes changing", on_one_session, batches),
            ("session per bucket, sizes changing", per_bucket.runners[0], batches),
        ):
            rounds = 1 if label == "one session, sizes changing" else args.rounds
            rows.append([name, label, _per_run_ms(run, stream, rounds)])
    print(f"device {args.device}; sizes in turn: {args.sizes}")
    print(format_table(["model", "how", "ms per run"], rows))


if __name__ == "__main__":
    main()
