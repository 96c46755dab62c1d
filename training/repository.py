"""Write one model version into a Triton-compatible model repository: config.pbtxt, labels.txt, model and card."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Batching", "ServingConfig", "file_sha256", "render_config", "write_model_version"]


@dataclass(frozen=True)
class Batching:
    """Dynamic batching and instance defaults, rendered into ``config.pbtxt`` (tuned by the serving benchmarks)."""

    max_batch_size: int
    max_queue_delay_microseconds: int
    max_queue_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    instance_count: int = 1


@dataclass(frozen=True)
class ServingConfig:
    """What the server (or NVIDIA Triton) needs to serve a model: the content of ``config.pbtxt`` and labels."""

    name: str
    input_dims: tuple[int, int, int]  # H, W, C without the batch dimension
    labels: tuple[str, ...]
    batching: Batching
    input_name: str = "image"
    output_name: str = "probabilities"
    gpu_fp16: bool = False  # our server runs the model in float16 on the GPU (Triton ignores the parameter)


def _dims(values: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def render_config(config: ServingConfig) -> str:
    """Render Triton's ModelConfig text format; KIND_AUTO lets Triton and our server pick GPU or CPU."""
    batching = config.batching
    preferred = (
        f"  preferred_batch_size: {_dims(batching.preferred_batch_sizes)}\n" if batching.preferred_batch_sizes else ""
    )
    return (
        f'name: "{config.name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {batching.max_batch_size}\n"
        "input [\n  {\n"
        f'    name: "{config.input_name}"\n'
        "    data_type: TYPE_UINT8\n"
        "    format: FORMAT_NHWC\n"
        f"    dims: {_dims(config.input_dims)}\n"
        "  }\n]\n"
        "output [\n  {\n"
        f'    name: "{config.output_name}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {len(config.labels)} ]\n"
        '    label_filename: "labels.txt"\n'
        "  }\n]\n"
        "dynamic_batching {\n"
        f"{preferred}"
        f"  max_queue_delay_microseconds: {batching.max_queue_delay_microseconds}\n"
        f"  default_queue_policy {{ max_queue_size: {batching.max_queue_size} }}\n"
        "}\n"
        f"instance_group [ {{ count: {batching.instance_count} kind: KIND_AUTO }} ]\n"
        + ('parameters { key: "precision" value: { string_value: "fp16" } }\n' if config.gpu_fp16 else "")
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_model_version(
    repository: Path,
    config: ServingConfig,
    onnx_file: Path,
    card: dict[str, Any],
    version: int = 1,
) -> Path:
    """Install ``onnx_file`` as ``<repository>/<name>/<version>/model.onnx`` with its config, labels and card.

    Returns:
        The model's folder, ``<repository>/<name>``.
    """
    model_dir = repository / config.name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, version_dir / "model.onnx")
    (model_dir / "config.pbtxt").write_text(render_config(config))
    (model_dir / "labels.txt").write_text("".join(f"{label}\n" for label in config.labels))
    (version_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return model_dir
