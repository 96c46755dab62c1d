"""A model's ``parameters`` that this server reads: CUDA provider options, checked, carried to the engine."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from serving.engine import ModelKey
from serving.gpu_options import GpuOptions
from serving.model_config import ConfigError, load_model_spec
from serving.runtime import Device, ModelRuntime, ProviderSelector
from tests.serving.conftest import REPO_ROOT, digits_with_parameters


@pytest.mark.parametrize(("value", "option"), [("1", "1"), ("true", "1"), (" On ", "1"), ("0", "0"), ("false", "0")])
def test_prefer_nhwc_becomes_a_cuda_provider_option(tmp_path: Path, value: str, option: str) -> None:
    spec = load_model_spec(digits_with_parameters(tmp_path, {"prefer_nhwc": value}))
    assert spec.gpu.cuda == (("prefer_nhwc", option),)


def test_a_switch_that_is_neither_on_nor_off_names_the_parameter_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"parameter 'prefer_nhwc' is 'yes please'; use \"1\" or \"0\""):
        load_model_spec(digits_with_parameters(tmp_path, {"prefer_nhwc": "yes please"}))


def test_parameters_for_other_servers_are_logged_and_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="serving.model_config"):
        spec = load_model_spec(digits_with_parameters(tmp_path, {"cudnn_conv_use_max_workspace": "1"}))
    assert spec.gpu.cuda == ()
    assert "parameter 'cudnn_conv_use_max_workspace' is not used by this server" in caplog.text


def test_the_engine_key_keeps_its_options_through_json() -> None:
    key = ModelKey("/m/model.onnx", 1, 8, False, 123, GpuOptions((("prefer_nhwc", "1"),)))
    assert ModelKey.from_json(json.loads(json.dumps(dataclasses.asdict(key)))) == key


def test_cuda_options_leave_a_cpu_runtime_answering_as_before(tmp_path: Path) -> None:
    """On the CPU the CUDA options have nothing to change: the same file gives the same probabilities."""
    path = REPO_ROOT / "models" / "digits" / "1" / "model.onnx"
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    plain = ModelRuntime(path, 1, 4, ProviderSelector(Device.CPU))
    with_options = ModelRuntime(path, 1, 4, ProviderSelector(Device.CPU), GpuOptions((("prefer_nhwc", "1"),)))
    np.testing.assert_array_equal(plain.runners[0](images), with_options.runners[0](images))
