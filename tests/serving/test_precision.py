"""``precision: fp16``: the model converted to float16 at load for the GPU; the CPU runs the FP32 file as it is."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry

from serving import runtime
from serving.engine import ModelKey, _Engine
from serving.gpu_options import GpuOptions
from serving.metrics import Metrics
from serving.model_config import ConfigError, load_model_spec
from serving.precision import float16_model
from serving.repository import ModelRepository
from serving.runtime import Device, ModelRuntime, ProviderSelector
from tests.serving.conftest import REPO_ROOT, digits_with_parameters

DIGITS = REPO_ROOT / "models" / "digits" / "1" / "model.onnx"


@pytest.fixture
def cpu_as_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path on a machine without one: the CPU provider stands in for CUDA (CUDA's own run of the same
    path is tests/serving/test_gpu.py)."""
    monkeypatch.setattr(runtime, "_CUDA", "CPUExecutionProvider")


def test_the_conversion_keeps_the_served_input_and_output_types() -> None:
    """Clients send uint8 and read FP32, so only the weights and the compute inside change."""
    model = onnx.load_from_string(float16_model(DIGITS))
    ((image,), (probabilities,)) = model.graph.input, model.graph.output
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert probabilities.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weight_types = {initializer.data_type for initializer in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in weight_types
    assert onnx.TensorProto.FLOAT not in weight_types


def test_the_converted_model_classifies_as_the_fp32_file_does() -> None:
    """Random pixels are enough to catch a broken conversion: the same images get the same probabilities
    within float16's rounding, and nearly always the same class."""
    images = np.random.default_rng(3).integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
    fp32 = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(float16_model(DIGITS), providers=["CPUExecutionProvider"])
    expected = fp32.run(None, {"image": images})[0]
    converted = fp16.run(None, {"image": images})[0]
    assert converted.dtype == np.float32
    np.testing.assert_allclose(converted, expected, atol=1e-2)
    assert (converted.argmax(1) == expected.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize(("value", "fp16"), [("fp16", True), (" FP16 ", True), ("fp32", False)])
def test_the_precision_parameter_is_read(tmp_path: Path, value: str, fp16: bool) -> None:
    assert load_model_spec(digits_with_parameters(tmp_path, {"precision": value})).gpu.fp16 is fp16


def test_a_precision_that_is_not_offered_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"parameter 'precision' is 'int8'; use \"fp32\" or \"fp16\""):
        load_model_spec(digits_with_parameters(tmp_path, {"precision": "int8"}))


def test_the_cpu_runs_the_fp32_file_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """float16 is slower on the CPU: a model configured for FP16 answers there exactly as the FP32 file does."""
    images = np.random.default_rng(4).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    plain = ModelRuntime(DIGITS, 1, 4, ProviderSelector(Device.CPU))
    with caplog.at_level(logging.INFO, logger="serving.runtime"):
        configured = ModelRuntime(DIGITS, 1, 4, ProviderSelector(Device.CPU), GpuOptions(fp16=True))
    assert configured.fp16 is False
    np.testing.assert_array_equal(configured.runners[0](images), plain.runners[0](images))
    assert "precision fp16 is for the GPU; the CPU runs the file in FP32" in caplog.text


@pytest.mark.filterwarnings("ignore:Duplicate provider")
@pytest.mark.usefixtures("cpu_as_gpu")
def test_on_the_gpu_path_every_bucket_runs_the_conversion() -> None:
    images = np.random.default_rng(6).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    converted = ModelRuntime(DIGITS, 2, 8, ProviderSelector(Device.CPU), GpuOptions(fp16=True))
    plain = ModelRuntime(DIGITS, 1, 8, ProviderSelector(Device.CPU))
    assert converted.fp16
    assert not plain.fp16
    assert all(len(set(map(id, sessions.values()))) == len(converted.buckets) for sessions in converted.instances)
    outputs = converted.runners[1](images)
    np.testing.assert_allclose(outputs, plain.runners[0](images), atol=1e-2)
    assert not np.array_equal(outputs, plain.runners[0](images)), "float16 rounds differently from float32"


@pytest.mark.filterwarnings("ignore:Duplicate provider")
@pytest.mark.usefixtures("cpu_as_gpu")
def test_the_engine_loads_a_key_in_the_precision_it_names() -> None:
    engine = _Engine(Device.CPU)
    for fp16 in (True, False):
        key = ModelKey(str(DIGITS), 1, 4, False, DIGITS.stat().st_mtime_ns, GpuOptions(fp16=fp16))
        assert engine.acquire(key).runtime.fp16 is fp16


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:Duplicate provider")
@pytest.mark.usefixtures("cpu_as_gpu")
async def test_a_repository_serves_the_precision_its_config_asks_for_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = digits_with_parameters(tmp_path, {"precision": "fp16"}).parent
    repository = ModelRepository(root, ProviderSelector(Device.CPU), Metrics(CollectorRegistry()))
    with caplog.at_level(logging.INFO, logger="serving.repository"):
        await repository.load("digits")
    try:
        assert repository.get("digits").runtime.fp16
        assert "model digits ready: versions [1] on CPUExecutionProvider in float16" in caplog.text
    finally:
        await repository.close()


def test_the_engine_key_keeps_the_precision_through_json() -> None:
    key = ModelKey("/m/model.onnx", 1, 8, False, 123, GpuOptions((("prefer_nhwc", "1"),), fp16=True))
    assert ModelKey.from_json(json.loads(json.dumps(dataclasses.asdict(key)))) == key
