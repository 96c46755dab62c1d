"""A probe for the decode stage: how fast nvImageCodec decodes the cat/dog validation JPEGs, on the GPU and off.

The workers decode with Pillow on CPU threads (``serving.images``); this measures what a GPU decoder would
offer before anything is built on it. It decodes at full size (the photos are stored about 224 pixels on the
short side), no crop or resize, batches of 8, 64 and 256 for 2 s each after a warm-up batch, one decoder
per backend. Not a project dependency: install it beside onnxruntime-gpu on a GPU node first:

    pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg
    python -m benchmarks.gpu_decode ZIP
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nvidia import nvimgcodec

from benchmarks.photos import validation_photos

_BATCHES = (8, 64, 256)
_SECONDS = 2.0


def _rate(decoder: object, streams: list[object], batch: int) -> float:
    """Images decoded per second, whole passes over ``streams`` in batches of ``batch``."""
    decode = decoder.decode  # type: ignore[attr-defined]
    decode(streams[:batch])  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < _SECONDS:
        for first in range(0, len(streams), batch):
            done += sum(image is not None for image in decode(streams[first : first + batch]))
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="the cat/dog photo zip (its val/ JPEGs are decoded)")
    args = parser.parse_args()
    photos = list(validation_photos(args.photos).values())
    print("photos", len(photos), "mean bytes", sum(map(len, photos)) // len(photos))
    backends = {
        "gpu": nvimgcodec.GPU_ONLY,  # CUDA kernels
        "hw": nvimgcodec.HW_GPU_ONLY,  # the GPU's JPEG decode engine
        "hybrid": nvimgcodec.HYBRID_CPU_GPU,
        "cpu": nvimgcodec.CPU_ONLY,
    }
    for name, kind in backends.items():
        try:
            decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(kind)])
        except Exception as exc:  # a backend this GPU or build lacks
            print(name, "unavailable:", exc)
            continue
        streams = [nvimgcodec.CodeStream(photo) for photo in photos]
        for batch in _BATCHES:
            print(f"{name} batch {batch}: {_rate(decoder, streams, batch):,.0f} images/s")


if __name__ == "__main__":
    main()
