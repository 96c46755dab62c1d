"""``classify-train``: train a model on the GPU (or CPU), export it to ONNX and install it in a model repository."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import platform
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from training.export import export_and_install
from training.loop import fit
from training.mnist import DataFileError
from training.repository import file_sha256
from training.tasks import TASKS, Task, TaskData

__all__ = ["main"]

_DRY_RUN_STEPS = 3
_DEFAULT_DATA_DIR = Path("../shared/data")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="classify-train",
        description="Train a classifier, export it to ONNX and write it into a Triton-compatible model repository.",
    )
    parser.add_argument("task", choices=sorted(TASKS), help="which model to train")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=_DEFAULT_DATA_DIR,
        help="folder with mnist/ (the four IDX .gz files) and catdog/ (a zip, or train/ and val/ "
        "folders of cat/ and dog/ photos) (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("models"),
        help="model repository to write <task>/ into (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=_positive_int, help="epochs to train (default: the task's recipe)")
    parser.add_argument(
        "--batch-size", type=_positive_int, help="images per training step (default: the task's recipe)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: the GPU with mixed precision if there is one, else the CPU (default: auto)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=Path("checkpoints"),
        help="where <task>.pt is rewritten after every epoch (default: %(default)s)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"train {_DRY_RUN_STEPS} steps on a tiny subset and export to a temporary repository",
    )
    return parser


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("classify-train: --device cuda, but PyTorch sees no CUDA GPU (use --device auto or cpu)")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _data_card(data: TaskData, data_dir: Path) -> dict[str, Any]:
    files = [
        {
            "path": path.relative_to(data_dir).as_posix(),
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        for path in data.files
    ]
    splits = {split: len(labels) for split, (_, labels) in data.eval_splits.items()}
    return {"files": files, "images": splits, "skipped": [{"file": f, "reason": r} for f, r in data.skipped]}


def train(task: Task, args: argparse.Namespace) -> Path:
    """Train, export and install one model; returns the model's folder in the repository."""
    device = _device(args.device)
    generator = _seed_everything(args.seed)
    started = time.perf_counter()
    data = task.load(args.data_dir, args.dry_run)
    data_seconds = time.perf_counter() - started
    recipe = dataclasses.replace(
        task.recipe,
        epochs=1 if args.dry_run else args.epochs or task.recipe.epochs,
        batch_size=args.batch_size or (8 if args.dry_run else task.recipe.batch_size),
    )
    model = task.build_classifier().to(device)
    batches = data.train_batches(recipe.batch_size, device, generator)
    checkpoint = args.checkpoint_dir / f"{task.name}{'-dry-run' if args.dry_run else ''}.pt"
    history = fit(
        task,
        model,
        batches,
        data.eval_splits["train"],
        data.eval_splits[task.test_split],
        recipe,
        device,
        checkpoint,
        args.seed,
        max_steps=_DRY_RUN_STEPS if args.dry_run else None,
    )
    train_seconds = time.perf_counter() - started - data_seconds
    repository = Path(tempfile.mkdtemp(prefix="classify-dry-run-")) if args.dry_run else args.output
    card = {
        "name": task.name,
        "version": 1,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "labels": list(task.labels),
        "input": {
            "name": task.serving.input_name,
            "dtype": "uint8",
            "layout": "NHWC",
            "dims": list(task.input_dims),
            "normalization": {"mean": task.normalize[0], "std": task.normalize[1]},
        },
        "data": _data_card(data, args.data_dir),
        "training": {
            "dry_run": args.dry_run,
            "seed": args.seed,
            "recipe": dataclasses.asdict(recipe),
            "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "mixed_precision": "bfloat16" if device.type == "cuda" else None,
            "data_load_seconds": round(data_seconds, 1),
            "wall_time_seconds": round(train_seconds, 1),  # the training loop alone, probe and evaluations included
            "history": [dataclasses.asdict(h) for h in history],
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
        },
    }
    return export_and_install(task, model, data.eval_splits, repository, card)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model_dir = train(TASKS[args.task], args)
    except DataFileError as exc:
        print(f"classify-train: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
