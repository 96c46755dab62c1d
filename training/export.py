"""Export a trained classifier to ONNX, check it against PyTorch, measure it, and install it in the repository."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from training.loop import predict
from training.repository import file_sha256, write_model_version
from training.tasks import Task

__all__ = ["OPSET", "PARITY_TOLERANCE", "export_onnx", "onnx_accuracy", "onnx_predict", "parity"]

OPSET = 18
PARITY_TOLERANCE = 1e-4  # max abs difference on probabilities, ONNX Runtime vs PyTorch


class _WithSoftmax(nn.Module):
    """The served graph: uint8 NHWC pixels in, FP32 probabilities out."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(image).float(), dim=1)


def export_onnx(task: Task, classifier: nn.Module, path: Path) -> None:
    """Trace to ONNX (opset 18, dynamic batch), then run the full ``onnx.checker``."""
    graph = _WithSoftmax(classifier).cpu().eval()
    example = torch.zeros(2, *task.input_dims, dtype=torch.uint8)  # batch 2: a batch of 1 would specialise
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(
        graph,
        (example,),
        str(path),
        input_names=[task.serving.input_name],
        output_names=[task.serving.output_name],
        dynamic_shapes={"image": {0: batch}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_predict(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Probabilities from ONNX Runtime for uint8 NHWC images."""
    input_name = session.get_inputs()[0].name
    chunks = [
        session.run(None, {input_name: np.ascontiguousarray(images[start : start + batch_size])})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks)


def onnx_accuracy(session: ort.InferenceSession, images: np.ndarray, labels: np.ndarray) -> float:
    return float((onnx_predict(session, images).argmax(1) == labels).mean())


def parity(session: ort.InferenceSession, classifier: nn.Module, images: np.ndarray) -> float:
    """Max abs difference between ONNX Runtime's and PyTorch's (FP32, CPU) probabilities on real images."""
    reference = predict(classifier.cpu(), images, torch.device("cpu"))
    return float(np.abs(onnx_predict(session, images) - reference).max())


def export_and_install(
    task: Task,
    classifier: nn.Module,
    eval_splits: dict[str, tuple[np.ndarray, np.ndarray]],
    repository: Path,
    card: dict[str, Any],
    parity_images: int = 256,
) -> Path:
    """Export, check parity, measure accuracy per split on the ONNX file itself, and install the version.

    Raises:
        RuntimeError: ONNX Runtime's probabilities differ from PyTorch's by more than ``PARITY_TOLERANCE``.
    """
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        export_onnx(task, classifier, onnx_path)
        session = _session(onnx_path)
        held_out = eval_splits[task.test_split][0][:parity_images]
        max_diff = parity(session, classifier, held_out)
        if max_diff > PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX/PyTorch parity failed: max abs difference {max_diff:.2e} > {PARITY_TOLERANCE}")
        card = {
            **card,
            "accuracy": {
                split: {"accuracy": onnx_accuracy(session, images, labels), "images": len(labels)}
                for split, (images, labels) in eval_splits.items()
            },
            "accuracy_measured_with": f"onnxruntime {ort.__version__} CPUExecutionProvider on model.onnx",
            "parity": {
                "max_abs_diff": max_diff,
                "tolerance": PARITY_TOLERANCE,
                "images": len(held_out),
                "split": task.test_split,
            },
            "onnx": {"opset": OPSET, "sha256": file_sha256(onnx_path), "bytes": onnx_path.stat().st_size},
        }
        return write_model_version(repository, task.serving, onnx_path, card)
