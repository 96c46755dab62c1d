"""What grpcurl and load balancers see on the session server: server reflection and grpc.health.v1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.serving.conftest import ServerProcess

API_SERVICES = ("classify.v1.Classifier", "inference.GRPCInferenceService")
RPC_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    """One plaintext channel to the session server for the module."""
    with grpc.insecure_channel(server.address) as connected:
        yield connected


@pytest.fixture(scope="module")
def reflection_db(channel: grpc.Channel) -> Any:
    """grpcio-reflection's client: descriptors fetched from the server on demand, as grpcurl fetches them."""
    return ProtoReflectionDescriptorDatabase(channel)


@pytest.fixture(scope="module")
def reflected_pool(reflection_db: Any) -> Any:
    """A descriptor pool that knows only what the server tells it: no generated code of ours is consulted."""
    return DescriptorPool(reflection_db)


# --- reflection --------------------------------------------------------------------------------------------------


def test_reflection_lists_every_service(reflection_db: Any) -> None:
    """``grpcurl list``: a user finds both APIs, health and reflection itself without a .proto file at hand."""
    services = set(reflection_db.get_services())
    assert {*API_SERVICES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_reflection_describes_classify_and_its_request(reflected_pool: Any) -> None:
    """``grpcurl describe``: building a Classify call by hand needs the method and the request's fields."""
    method = reflected_pool.FindServiceByName("classify.v1.Classifier").FindMethodByName("Classify")
    assert method.input_type.full_name == "classify.v1.ClassifyRequest"
    assert method.output_type.full_name == "classify.v1.ClassifyResponse"
    assert [field.name for field in method.input_type.fields] == ["model", "version", "images", "top_k", "request_id"]
    images = method.input_type.fields_by_name["images"]
    assert images.message_type.full_name == "classify.v1.Image"


def test_reflection_describes_the_kserve_infer_request(reflected_pool: Any) -> None:
    """Triton's own tools and grpcurl resolve ``inference.*`` from the server: our pool, not tritonclient's."""
    service = reflected_pool.FindServiceByName("inference.GRPCInferenceService")
    assert {"ServerLive", "ServerReady", "ModelReady", "ModelMetadata", "ModelInfer"} <= {
        method.name for method in service.methods
    }
    assert service.FindMethodByName("ModelInfer").input_type.full_name == "inference.ModelInferRequest"
    request = reflected_pool.FindMessageTypeByName("inference.ModelInferRequest")
    assert [field.name for field in request.fields] == [
        "model_name", "model_version", "id", "parameters", "inputs", "outputs", "raw_input_contents"
    ]  # fmt: skip
    tensor = request.fields_by_name["inputs"].message_type
    assert tensor.full_name == "inference.ModelInferRequest.InferInputTensor"
    assert {"name", "datatype", "shape"} <= {field.name for field in tensor.fields}


def test_reflection_describes_health(reflected_pool: Any) -> None:
    """The health service's own file is served too (``grpcurl describe grpc.health.v1.Health`` must not fail)."""
    service = reflected_pool.FindServiceByName("grpc.health.v1.Health")
    assert {method.name for method in service.methods} >= {"Check", "Watch"}


def test_reflection_reports_an_unknown_symbol_as_missing(reflected_pool: Any) -> None:
    """A typo in ``grpcurl describe`` is a clear "not found", not a hang or a crash of the reflection stream."""
    with pytest.raises(KeyError):
        reflected_pool.FindServiceByName("classify.v1.NoSuchService")


# --- health ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", *API_SERVICES])
def test_health_check_is_serving(channel: grpc.Channel, service: str) -> None:
    """Load balancers and Kubernetes ask for the whole server ("") or for one API by its full name."""
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    """The health protocol's answer for a name the server does not know: NOT_FOUND, not a false SERVING."""
    with pytest.raises(grpc.RpcError) as unknown:
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="classify.v1.NoSuchService"), timeout=RPC_TIMEOUT
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_starts_with_serving(channel: grpc.Channel) -> None:
    """A watcher (Envoy, a client-side balancer) gets the current status at once, without waiting for a change."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        watch.cancel()
