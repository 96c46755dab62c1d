"""What a model's config asks of the GPU, apart from the runtime that acts on it.

Kept free of ONNX Runtime so that reading a config (``serving.model_config``) does not load it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["NO_GPU_OPTIONS", "GpuOptions"]


@dataclass(frozen=True)
class GpuOptions:
    """How a model's config asks it to run on CUDA (its ``parameters``); the CPU runs the file as it is."""

    cuda: tuple[tuple[str, str], ...] = ()  # CUDA provider options, over the process-wide ones
    fp16: bool = False  # converted to float16 at load (``serving.precision``)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GpuOptions:
        """From ``dataclasses.asdict`` sent as JSON, which turned the option pairs into lists."""
        return cls(tuple((key, value) for key, value in data["cuda"]), data["fp16"])


NO_GPU_OPTIONS = GpuOptions()  # a config without any: the process-wide CUDA options, FP32
