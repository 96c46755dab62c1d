"""ONNX file variants the server might adopt, and the accuracy check each must pass before a speed figure counts.

FP16: weights and compute in float16, the uint8 input and FP32 output kept, so the server and its clients
feed it unchanged: the conversion the server makes at load for a model whose config asks for ``precision``
``fp16`` (``serving.precision``). NHWC: the same FP32 file with the CUDA provider's ``prefer_nhwc`` (other convolution
kernels, so other rounding). A faster model that classifies worse is no win, so its held-out accuracy is
measured on the set the model card used (digits: MNIST's 10,000 test images; catdog: the 1,000 validation
photos):

    python -m benchmarks.onnx_variants accuracy --model-repository models --data-dir ../shared/data --device cuda
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.harness import format_table
from serving.model_config import load_model_spec
from serving.precision import float16_model
from serving.runtime import Device, DeviceUnavailable, ProviderSelector
from training.mnist import load_mnist_split
from training.photos import decode_photo, load_photo_set, resize_center_crop

__all__ = ["held_out", "newest_model"]


def newest_model(model_dir: Path) -> Path:
    """The ``model.onnx`` of the highest version folder: what a request without a version gets."""
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()]
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no version folder with a model.onnx")
    return model_dir / str(max(versions)) / "model.onnx"


def held_out(name: str, data_dir: Path, size: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model card's held-out split as uint8 NHWC images and labels, preprocessed as training evaluated it.

    Args:
        name: ``digits`` or ``catdog``.
        data_dir: the folder holding ``mnist/`` and ``catdog/`` (one zip, or ``train/`` and ``val/``).
        size: the model's input height and width (photos are resized and centre-cropped to it).
        limit: at most this many images, spread evenly over the split (it is sorted by class).
    """
    if name == "digits":
        split = load_mnist_split(data_dir / "mnist", "test")
        images, labels = split.images[:, :, :, None], split.labels
        step = max(1, len(labels) // limit) if limit else 1
        return images[::step][:limit], labels[::step][:limit]
    folder = data_dir / "catdog"
    zips = sorted(folder.glob("*.zip"))
    source = zips[0] if len(zips) == 1 else folder
    photos = load_photo_set(source).splits["val"]
    photos = photos[:: max(1, len(photos) // limit) if limit else 1][:limit]
    images = np.stack([np.asarray(resize_center_crop(decode_photo(photo.data), size)) for photo in photos])
    return images, np.array([photo.label for photo in photos], dtype=np.uint8)


def _card_accuracy(model: Path) -> float:
    """The FP32 figure the model card reports for its held-out split: the same set must reproduce it."""
    card = json.loads((model.parent / "model_card.json").read_text())
    return float(card["accuracy"][card["parity"]["split"]]["accuracy"])


def _accuracy(args: argparse.Namespace) -> None:
    from training.export import onnx_accuracy  # here, so torch stays out of the ceiling's process

    providers = ProviderSelector(Device(args.device))
    rows: list[list[object]] = []
    for name in args.models:
        model_dir = args.model_repository / name
        fp32 = newest_model(model_dir)
        images, labels = held_out(name, args.data_dir, load_model_spec(model_dir).input.height, args.limit)
        sessions = (
            providers.session(fp32, ort.SessionOptions()),
            providers.session(float16_model(fp32), ort.SessionOptions()),
            providers.session(fp32, ort.SessionOptions(), {"prefer_nhwc": "1"}),
        )
        fp32_accuracy, *variants = (onnx_accuracy(session, images, labels) for session in sessions)
        rows.append(
            [name, len(labels), *(f"{v:.4f}" for v in (_card_accuracy(fp32), fp32_accuracy, *variants))]
            + [f"{100 * (accuracy - fp32_accuracy):+.2f}" for accuracy in variants]
        )
    print(f"onnxruntime {ort.__version__}, --device {args.device}")
    headers = ["model", "images", "card fp32", "fp32", "fp16", "nhwc", "fp16-fp32 points", "nhwc-fp32 points"]
    print(format_table(headers, rows))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy = commands.add_parser("accuracy", help="held-out accuracy of each model in FP32, FP16 and NHWC")
    accuracy.add_argument("--model-repository", type=Path, default=Path("models"))
    accuracy.add_argument("--models", nargs="+", default=["digits", "catdog"], choices=["digits", "catdog"])
    accuracy.add_argument("--data-dir", type=Path, required=True, help="the folder holding mnist/ and catdog/")
    accuracy.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    accuracy.add_argument("--limit", type=int, default=None, help="at most N held-out images per model (quick checks)")
    args = parser.parse_args(argv)
    try:
        _accuracy(args)
    except DeviceUnavailable as exc:
        parser.exit(2, f"{exc}\n")


if __name__ == "__main__":
    main()
