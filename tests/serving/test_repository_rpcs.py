"""Loading and unloading models at run time through Triton's repository RPCs (as tritonclient calls them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from serving.protos.classify.v1 import classify_pb2 as pb
from serving.protos.classify.v1 import classify_pb2_grpc
from tests.serving.conftest import ServerProcess, write_repository


def _classify_digit(address: str, version: str = "") -> pb.ClassifyResponse:
    image = pb.Image(raw=pb.RawImage(data=np.zeros(784, np.uint8).tobytes(), shape=[28, 28, 1]))
    with grpc.insecure_channel(address) as channel:
        return classify_pb2_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(model="digits", version=version, images=[image]), timeout=30
        )


def _index(client: triton.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}


def test_unload_then_load_again(start_server: object, tmp_path: Path) -> None:
    """Operators take a model out of service and back without restarting the server."""
    repository = write_repository(tmp_path / "models")
    server: ServerProcess = start_server("--model-repository", str(repository), "--device", "cpu")  # type: ignore[operator]
    client = triton.InferenceServerClient(server.address)

    client.unload_model("digits")
    assert not client.is_model_ready("digits")
    assert _index(client)[("digits", "")] == ("UNAVAILABLE", "unloaded")
    with pytest.raises(grpc.RpcError) as unloaded:
        _classify_digit(server.address)
    assert unloaded.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "model 'digits' is unavailable: unloaded" in (unloaded.value.details() or "")
    assert client.is_model_ready("catdog"), "unloading one model must leave the others serving"

    client.load_model("digits")
    assert client.is_model_ready("digits")
    assert _classify_digit(server.address).version == "1"


def test_load_picks_up_a_new_version(start_server: object, tmp_path: Path) -> None:
    """Dropping version 2 into the folder and loading serves it by default, with version 1 beside it."""
    repository = write_repository(tmp_path / "models")
    server: ServerProcess = start_server("--model-repository", str(repository), "--device", "cpu")  # type: ignore[operator]
    client = triton.InferenceServerClient(server.address)
    shutil.copytree(repository / "digits" / "1", repository / "digits" / "2")

    client.load_model("digits")
    assert client.get_model_metadata("digits").versions == ["1", "2"]
    assert _classify_digit(server.address).version == "2"
    assert _classify_digit(server.address, version="1").version == "1"
    assert {("digits", "1"), ("digits", "2")} <= set(_index(client))


def test_load_errors_name_the_problem(start_server: object, tmp_path: Path) -> None:
    """A failed load says why, and the server keeps serving what it had."""
    repository = write_repository(tmp_path / "models")
    server: ServerProcess = start_server("--model-repository", str(repository), "--device", "cpu")  # type: ignore[operator]
    client = triton.InferenceServerClient(server.address)

    with pytest.raises(InferenceServerException) as missing:
        client.load_model("nope")
    assert "model 'nope' not found in repository" in str(missing.value)

    (repository / "digits" / "config.pbtxt").write_text('platform: "tensorflow_savedmodel"\nmax_batch_size: 8\n')
    with pytest.raises(InferenceServerException) as broken:
        client.load_model("digits")
    assert "failed to load 'digits'" in str(broken.value)
    assert "platform 'tensorflow_savedmodel' is not served" in str(broken.value)
    assert client.is_model_ready("digits"), "a failed reload must keep the loaded version serving"
    assert _classify_digit(server.address).version == "1"
