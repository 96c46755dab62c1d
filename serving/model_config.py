"""Read a model folder's ``config.pbtxt`` and ``labels.txt`` into a typed spec the server can act on.

The text is parsed with our subset of Triton's ModelConfig schema: a field we do not know is logged and
skipped (the folder still loads in Triton, which knows it), everything we rely on is checked here, so a
broken folder is reported with its reason at load time instead of failing requests later.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from google.protobuf import text_format

from serving.batching import BatchPolicy
from serving.gpu_options import NO_GPU_OPTIONS, GpuOptions
from serving.images import InputSpec, resize_for
from serving.protos.inference import model_config_pb2 as mc

__all__ = ["ConfigError", "ModelSpec", "VersionPolicy", "load_model_spec"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_PLATFORMS = {"onnxruntime_onnx"}
_BACKENDS = {"onnxruntime"}
_CUDA_PARAMETERS = ("prefer_nhwc",)  # model parameters passed as the CUDA provider option of the same name
_PRECISION = "precision"  # "fp16": the model runs in float16 on the GPU (serving.precision)
_PARAMETERS = (*_CUDA_PARAMETERS, _PRECISION)
_SWITCH = {"1": "1", "true": "1", "on": "1", "0": "0", "false": "0", "off": "0"}
_PRECISIONS = {"fp32": False, "fp16": True}


class ConfigError(ValueError):
    """A model folder cannot be served; the message says which file and what is wrong."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which numbered version folders to serve: the newest ``latest`` ones, ``specific`` ones, or all."""

    latest: int | None = None
    specific: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.latest is not None:
            return ordered[-self.latest :]
        if self.specific:
            return [v for v in ordered if v in self.specific]
        return ordered


@dataclass(frozen=True)
class ModelSpec:
    """What the server needs to know about a model, checked; ``config`` is returned by the ModelConfig RPC."""

    name: str
    input_name: str
    input: InputSpec
    output_name: str
    labels: tuple[str, ...]
    max_batch_size: int
    batching: BatchPolicy
    default_timeout: float | None  # seconds; the queue policy's default_timeout_microseconds
    instance_count: int
    cpu_only: bool  # every instance group asks for KIND_CPU
    versions: VersionPolicy
    config: mc.ModelConfig
    gpu: GpuOptions = NO_GPU_OPTIONS  # from ``parameters``: CUDA provider options, and ``precision`` ``fp16``


def _parse(path: Path) -> mc.ModelConfig:
    text = path.read_text()
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        if "has no field named" not in str(exc) and "has no value named" not in str(exc):
            raise ConfigError(f"{path}: {exc}") from None
        _log.warning("%s: %s; fields this server does not know are ignored", path, exc)
    try:
        return text_format.Parse(text, mc.ModelConfig(), allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _input(config: mc.ModelConfig, path: Path) -> tuple[str, InputSpec]:
    if len(config.input) != 1:
        raise ConfigError(f"{path}: expected exactly one input (an image), found {len(config.input)}")
    (tensor,) = config.input
    if tensor.data_type != mc.TYPE_UINT8:
        raise ConfigError(f"{path}: input {tensor.name!r} must be TYPE_UINT8 raw pixels")
    if tensor.format not in (mc.ModelInput.FORMAT_NHWC, mc.ModelInput.FORMAT_NONE) or len(tensor.dims) != 3:
        raise ConfigError(f"{path}: input {tensor.name!r} must be NHWC with dims [height, width, channels]")
    height, width, channels = tensor.dims
    if channels not in (1, 3) or height < 1 or width < 1:
        raise ConfigError(f"{path}: input dims {list(tensor.dims)}: channels must be 1 or 3, sizes positive")
    return tensor.name, InputSpec(height=height, width=width, channels=channels, resize=resize_for(channels))


def _output_and_labels(config: mc.ModelConfig, model_dir: Path, path: Path) -> tuple[str, tuple[str, ...]]:
    if len(config.output) != 1:
        raise ConfigError(f"{path}: expected exactly one output (class probabilities), found {len(config.output)}")
    (tensor,) = config.output
    if tensor.data_type != mc.TYPE_FP32 or len(tensor.dims) != 1:
        raise ConfigError(f"{path}: output {tensor.name!r} must be TYPE_FP32 with dims [classes]")
    if not tensor.label_filename:
        raise ConfigError(f"{path}: output {tensor.name!r} needs a label_filename")
    label_path = model_dir / tensor.label_filename
    try:
        labels = tuple(line.strip() for line in label_path.read_text().splitlines() if line.strip())
    except OSError as exc:
        raise ConfigError(f"{label_path}: cannot read labels ({exc.strerror})") from None
    if len(labels) != tensor.dims[0]:
        raise ConfigError(f"{label_path}: {len(labels)} labels for an output of {tensor.dims[0]} classes")
    return tensor.name, labels


def _versions(config: mc.ModelConfig) -> VersionPolicy:
    choice = config.version_policy.WhichOneof("policy_choice")
    if choice == "latest":
        return VersionPolicy(latest=max(1, config.version_policy.latest.num_versions))
    if choice == "specific":
        return VersionPolicy(specific=tuple(config.version_policy.specific.versions))
    return VersionPolicy()  # "all", and our default: every version folder side by side


def _log_unused_parameters(config: mc.ModelConfig, path: Path) -> None:
    """Parameters for other servers (NVIDIA Triton's backend settings) are left to the servers that read them."""
    for key in sorted(set(config.parameters) - set(_PARAMETERS)):
        _log.info("%s: parameter %r is not used by this server (it reads %s)", path, key, ", ".join(_PARAMETERS))


def _parameter(config: mc.ModelConfig, path: Path, key: str, values: Mapping[str, _T], choices: str) -> _T | None:
    """The model's ``key`` parameter read through ``values`` (case and spaces aside); None where it is not set.

    Raises:
        ConfigError: it is set to none of them; the message names the ``choices``.
    """
    if key not in config.parameters:
        return None
    text = config.parameters[key].string_value
    if text.strip().lower() not in values:
        raise ConfigError(f"{path}: parameter {key!r} is {text!r}; use {choices}")
    return values[text.strip().lower()]


def _cuda_options(config: mc.ModelConfig, path: Path) -> tuple[tuple[str, str], ...]:
    """The ``parameters`` this server passes to ONNX Runtime's CUDA provider."""
    switches = ((key, _parameter(config, path, key, _SWITCH, '"1" or "0"')) for key in _CUDA_PARAMETERS)
    return tuple((key, value) for key, value in switches if value is not None)


def _fp16(config: mc.ModelConfig, path: Path) -> bool:
    """Whether the model asks to run in float16 on the GPU."""
    return bool(_parameter(config, path, _PRECISION, _PRECISIONS, '"fp32" or "fp16"'))


def load_model_spec(model_dir: Path) -> ModelSpec:
    """Parse and check ``<model_dir>/config.pbtxt`` and its label file.

    Raises:
        ConfigError: the folder cannot be served; the message names the file and the problem.
    """
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise ConfigError(f"{path}: missing")
    config = _parse(path)
    if config.name and config.name != model_dir.name:
        raise ConfigError(f"{path}: name {config.name!r} differs from its folder {model_dir.name!r}")
    config.name = model_dir.name
    if config.platform not in _PLATFORMS and config.backend not in _BACKENDS:
        raise ConfigError(f"{path}: platform {config.platform!r} is not served; use onnxruntime_onnx")
    if config.max_batch_size < 1:
        raise ConfigError(f"{path}: max_batch_size must be at least 1 (images are served in batches)")
    input_name, input_spec = _input(config, path)
    output_name, labels = _output_and_labels(config, model_dir, path)
    dynamic = config.dynamic_batching
    queue = dynamic.default_queue_policy
    instance_count = sum(max(1, group.count) for group in config.instance_group) or 1
    _log_unused_parameters(config, path)
    return ModelSpec(
        name=model_dir.name,
        input_name=input_name,
        input=input_spec,
        output_name=output_name,
        labels=labels,
        max_batch_size=config.max_batch_size,
        batching=BatchPolicy(
            max_batch_size=config.max_batch_size,
            max_queue_delay=dynamic.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=tuple(size for size in dynamic.preferred_batch_size if size <= config.max_batch_size),
            max_queue_size=queue.max_queue_size,
        ),
        default_timeout=queue.default_timeout_microseconds / 1e6 or None,
        instance_count=instance_count,
        cpu_only=bool(config.instance_group)
        and all(group.kind == mc.ModelInstanceGroup.KIND_CPU for group in config.instance_group),
        versions=_versions(config),
        config=config,
        gpu=GpuOptions(_cuda_options(config, path), _fp16(config, path)),
    )
