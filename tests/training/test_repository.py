"""config.pbtxt must be valid Triton ModelConfig text, and a model version lands where Triton looks for it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from training.repository import Batching, ServingConfig, file_sha256, render_config, write_model_version
from training.tasks import TASKS

CUSTOM = ServingConfig(
    name="custom",
    input_dims=(32, 32, 3),
    labels=tuple("abcde"),
    batching=Batching(
        max_batch_size=64,
        max_queue_delay_microseconds=500,
        max_queue_size=100,
        preferred_batch_sizes=(8, 16),
        instance_count=2,
    ),
    input_name="pixels",
    output_name="scores",
    gpu_fp16=True,
)
CONFIGS = [TASKS["digits"].serving, TASKS["catdog"].serving, CUSTOM]


def parse_model_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse with Triton's own schema; text_format.Parse rejects unknown fields, so this is strict."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("config", CONFIGS, ids=[config.name for config in CONFIGS])
def test_render_config_matches_triton_schema(config: ServingConfig) -> None:
    """Every field we render must mean to Triton what the ServingConfig says, or Triton would serve it differently."""
    parsed = parse_model_config(render_config(config))
    assert parsed.name == config.name
    assert parsed.platform == "onnxruntime_onnx"
    assert parsed.max_batch_size == config.batching.max_batch_size

    assert len(parsed.input) == 1
    (model_input,) = parsed.input
    assert model_input.name == config.input_name
    assert model_input.data_type == model_config_pb2.TYPE_UINT8
    assert model_input.format == model_config_pb2.ModelInput.FORMAT_NHWC
    assert list(model_input.dims) == list(config.input_dims)

    assert len(parsed.output) == 1
    (model_output,) = parsed.output
    assert model_output.name == config.output_name
    assert model_output.data_type == model_config_pb2.TYPE_FP32
    assert list(model_output.dims) == [len(config.labels)]
    assert model_output.label_filename == "labels.txt"

    assert parsed.HasField("dynamic_batching")
    batching = parsed.dynamic_batching
    assert batching.max_queue_delay_microseconds == config.batching.max_queue_delay_microseconds
    assert batching.default_queue_policy.max_queue_size == config.batching.max_queue_size
    assert list(batching.preferred_batch_size) == list(config.batching.preferred_batch_sizes)

    assert len(parsed.instance_group) == 1
    assert parsed.instance_group[0].count == config.batching.instance_count
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    precision = {"precision": "fp16"} if config.gpu_fp16 else {}
    assert {key: value.string_value for key, value in parsed.parameters.items()} == precision


def test_task_serving_configs_agree_with_tasks() -> None:
    """The serving contract must describe the model each task trains: same dims, same number of labels."""
    for name, task in TASKS.items():
        assert task.serving.name == name
        assert task.serving.input_dims == task.input_dims
        assert task.serving.labels == task.labels
        assert task.serving.batching.max_batch_size > 0


def test_strict_parse_would_catch_a_typo() -> None:
    """Guards the guard: a misspelt field must fail the parse, or the schema tests above prove nothing."""
    with pytest.raises(text_format.ParseError):
        parse_model_config(render_config(CUSTOM).replace("max_queue_size", "max_queue_length"))


def test_write_model_version_installs_four_files(tmp_path: Path) -> None:
    """Triton's layout: config and labels beside the version folder, model and card inside it."""
    onnx_file = tmp_path / "exported.onnx"
    onnx_file.write_bytes(b"not really onnx, just bytes to copy")
    card = {"name": "custom", "onnx": {"sha256": file_sha256(onnx_file)}}
    repository = tmp_path / "models"

    model_dir = write_model_version(repository, CUSTOM, onnx_file, card)

    assert model_dir == repository / "custom"
    files = sorted(path.relative_to(model_dir).as_posix() for path in model_dir.rglob("*") if path.is_file())
    assert files == ["1/model.onnx", "1/model_card.json", "config.pbtxt", "labels.txt"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert json.loads((model_dir / "1" / "model_card.json").read_text()) == card
    assert (model_dir / "config.pbtxt").read_text() == render_config(CUSTOM)
    assert (model_dir / "labels.txt").read_text() == "a\nb\nc\nd\ne\n"


def test_write_model_version_adds_versions_side_by_side(tmp_path: Path) -> None:
    """Writing version 2 keeps version 1, so the server can hold both and default to the newest."""
    onnx_file = tmp_path / "exported.onnx"
    repository = tmp_path / "models"
    for version in (1, 2):
        onnx_file.write_bytes(f"model {version}".encode())
        write_model_version(repository, CUSTOM, onnx_file, {"version": version}, version=version)
    model_dir = repository / "custom"
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"model 1"
    assert (model_dir / "2" / "model.onnx").read_bytes() == b"model 2"
    assert json.loads((model_dir / "2" / "model_card.json").read_text()) == {"version": 2}


def test_file_sha256(tmp_path: Path) -> None:
    """Cards record sha256 of data and model files; it must be the standard digest of the whole file."""
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000  # over one 1 MiB read chunk
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
