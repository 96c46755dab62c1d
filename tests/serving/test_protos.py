"""Our .proto files: the committed code is current, `inference` is wire-compatible with Triton's, all is documented.

Compatibility is checked against the descriptors that ship in tritonclient, the client our users run: every
message, field, enum value and RPC we define must exist there with the same number and type (Triton defines
more, which is fine), and real messages must survive a trip through both.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor, descriptor_pb2, message, message_factory, text_format
from grpc_tools import protoc
from tritonclient.grpc import model_config_pb2 as triton_model_config_pb2
from tritonclient.grpc import service_pb2 as triton_service_pb2

import serving.protos
from serving.protos.classify.v1 import classify_pb2
from serving.protos.inference import grpc_service_pb2, model_config_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOS_DIR = REPO_ROOT / "protos"
INFERENCE_FILES = (grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR)
TRITON_POOL = triton_service_pb2.DESCRIPTOR.pool

# The RPCs of inference.GRPCInferenceService that we serve (docs: shared/PROTOCOL.md).
EXPECTED_RPCS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
}


def _nested_messages(messages: Iterator[descriptor.Descriptor]) -> Iterator[descriptor.Descriptor]:
    """The given messages and every message nested in them (map entries included), depth first."""
    for message_type in messages:
        yield message_type
        yield from _nested_messages(iter(message_type.nested_types))


def _messages_of(file: descriptor.FileDescriptor) -> list[descriptor.Descriptor]:
    """Every message a file defines, nested ones and map entries included."""
    return list(_nested_messages(iter(file.message_types_by_name.values())))


def _enums_of(file: descriptor.FileDescriptor) -> list[descriptor.EnumDescriptor]:
    """Every enum a file defines, nested ones included."""
    nested = [enum for message_type in _messages_of(file) for enum in message_type.enum_types]
    return [*file.enum_types_by_name.values(), *nested]


OUR_MESSAGES = [message_type for file in INFERENCE_FILES for message_type in _messages_of(file)]
OUR_ENUMS = [enum for file in INFERENCE_FILES for enum in _enums_of(file)]


def _full_name(descriptor_or_none: descriptor.Descriptor | descriptor.EnumDescriptor | None) -> str | None:
    """The full name of a field's message or enum type; None for a scalar field."""
    return None if descriptor_or_none is None else descriptor_or_none.full_name


def _field_differences(ours: descriptor.FieldDescriptor, theirs: descriptor.FieldDescriptor) -> list[str]:
    """How a field of ours differs from Triton's field of the same name, as readable lines; empty if it doesn't."""
    aspects = {
        "number": (ours.number, theirs.number),
        "type": (ours.type, theirs.type),
        "repeated": (ours.is_repeated, theirs.is_repeated),
        "presence": (ours.has_presence, theirs.has_presence),
        "oneof": (
            ours.containing_oneof.name if ours.containing_oneof else None,
            theirs.containing_oneof.name if theirs.containing_oneof else None,
        ),
        "message type": (_full_name(ours.message_type), _full_name(theirs.message_type)),
        "enum type": (_full_name(ours.enum_type), _full_name(theirs.enum_type)),
    }
    return [f"{ours.full_name}: {aspect} {a!r} != Triton's {b!r}" for aspect, (a, b) in aspects.items() if a != b]


def test_generated_code_is_current() -> None:
    """serving/protos/ is exactly what protos/generate.py writes from protos/ (it generates into a temp dir)."""
    result = subprocess.run(
        [sys.executable, str(PROTOS_DIR / "generate.py"), "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (
        f"serving/protos/ is not what protos/ generates; regenerate with `python protos/generate.py`:\n"
        f"{result.stdout}{result.stderr}"
    )


def test_pyproject_pins_the_generator() -> None:
    """The test extra installs the one grpcio-tools that protos/generate.py accepts."""
    spec = importlib.util.spec_from_file_location("protos_generate", PROTOS_DIR / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    test_requirements = pyproject["project"]["optional-dependencies"]["test"]
    assert f"grpcio-tools=={generate.GRPCIO_TOOLS_VERSION}" in test_requirements


def test_our_messages_live_apart_from_tritonclients() -> None:
    """Both define `inference.*`; separate pools let them load in one process (this module imports both)."""
    for module in (grpc_service_pb2, model_config_pb2, classify_pb2):
        assert module.DESCRIPTOR.pool is serving.protos.DESCRIPTOR_POOL
    assert TRITON_POOL is not serving.protos.DESCRIPTOR_POOL
    assert grpc_service_pb2.ModelInferRequest.__module__ == "serving.protos.inference.grpc_service_pb2"


@pytest.mark.parametrize("ours", OUR_MESSAGES, ids=lambda message_type: message_type.full_name)
def test_message_matches_triton(ours: descriptor.Descriptor) -> None:
    """Each of our `inference` messages exists in Triton's schema; each of our fields equals Triton's."""
    theirs = TRITON_POOL.FindMessageTypeByName(ours.full_name)
    assert ours.GetOptions().map_entry == theirs.GetOptions().map_entry
    problems = []
    for field in ours.fields:
        their_field = theirs.fields_by_name.get(field.name)
        if their_field is None:
            problems.append(f"{field.full_name}: Triton has no such field")
        else:
            problems.extend(_field_differences(field, their_field))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("ours", OUR_ENUMS, ids=lambda enum: enum.full_name)
def test_enum_matches_triton(ours: descriptor.EnumDescriptor) -> None:
    """Each of our enums exists in Triton's schema, with the same number for every value we define."""
    theirs = TRITON_POOL.FindEnumTypeByName(ours.full_name)
    their_numbers = {value.name: value.number for value in theirs.values}
    our_numbers = {value.name: value.number for value in ours.values}
    assert our_numbers == {name: their_numbers.get(name) for name in our_numbers}


def test_service_matches_triton() -> None:
    """Our RPCs are Triton's, with the same request and response types and streaming."""
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = TRITON_POOL.FindServiceByName(ours.full_name)
    assert {method.name for method in ours.methods} == EXPECTED_RPCS
    for method in ours.methods:
        their_method = theirs.methods_by_name[method.name]
        assert (
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        ) == (
            their_method.input_type.full_name,
            their_method.output_type.full_name,
            their_method.client_streaming,
            their_method.server_streaming,
        ), method.full_name


def _scalar(field: descriptor.FieldDescriptor) -> object:
    """A value for a non-message field that differs from its default and tells fields apart."""
    kinds = descriptor.FieldDescriptor
    if field.type == kinds.TYPE_STRING:
        return f"{field.name}-value"
    if field.type == kinds.TYPE_BYTES:
        return b"\x00\xff" + field.name.encode()
    if field.type == kinds.TYPE_BOOL:
        return True
    if field.type in (kinds.TYPE_FLOAT, kinds.TYPE_DOUBLE):
        return field.number + 0.5
    if field.type == kinds.TYPE_ENUM:
        assert field.enum_type is not None
        return field.enum_type.values[-1].number
    if field.cpp_type in (kinds.CPPTYPE_INT32, kinds.CPPTYPE_INT64):
        return -field.number  # negative: a signed field decoded as unsigned would show
    return field.number + 1_000


def _fill(target: message.Message, message_type: descriptor.Descriptor, oneof_choice: int, depth: int = 0) -> None:
    """Sets every field of `target`, recursively; in each oneof only member `oneof_choice` (modulo its size)."""
    for field in message_type.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.fields[oneof_choice % len(oneof.fields)] is not field:
            continue
        value = getattr(target, field.name)
        field_type = field.message_type
        if field_type is not None and field_type.GetOptions().map_entry:
            key_field, value_field = field_type.fields_by_name["key"], field_type.fields_by_name["value"]
            key = _scalar(key_field)
            if value_field.message_type is not None:
                _fill(value[key], value_field.message_type, oneof_choice, depth + 1)
            else:
                value[key] = _scalar(value_field)
        elif field_type is not None and field.is_repeated:
            _fill(value.add(), field_type, oneof_choice, depth + 1)
        elif field_type is not None:
            value.SetInParent()  # marks even an empty message (e.g. ModelVersionPolicy.All) as set
            if depth < 8:
                _fill(value, field_type, oneof_choice, depth + 1)
        elif field.is_repeated:
            value.append(_scalar(field))
        else:
            setattr(target, field.name, _scalar(field))


ROUND_TRIP_MESSAGES = [message_type for message_type in OUR_MESSAGES if not message_type.GetOptions().map_entry]


@pytest.mark.parametrize("ours", ROUND_TRIP_MESSAGES, ids=lambda message_type: message_type.full_name)
def test_message_survives_triton(ours: descriptor.Descriptor) -> None:
    """A message of ours with every field set reads back the same after Triton's type parsed and re-wrote it."""
    our_class = message_factory.GetMessageClass(ours)
    their_class = message_factory.GetMessageClass(TRITON_POOL.FindMessageTypeByName(ours.full_name))
    widest_oneof = max((len(oneof.fields) for oneof in ours.oneofs), default=1)
    for oneof_choice in range(widest_oneof):
        original = our_class()
        _fill(original, ours, oneof_choice)
        theirs = their_class.FromString(original.SerializeToString())
        theirs.DiscardUnknownFields()  # a field Triton read under another number would be lost here
        assert our_class.FromString(theirs.SerializeToString()) == original
        assert text_format.MessageToString(theirs) == text_format.MessageToString(original)


def _tritonclient_infer_request() -> triton_service_pb2.ModelInferRequest:
    """A request as tritonclient and perf_analyzer send it: raw input bytes, parameters of every kind."""
    request = triton_service_pb2.ModelInferRequest(
        model_name="digits", model_version="1", id="request-7", raw_input_contents=[bytes(range(8))]
    )
    request.parameters["triton_enable_empty_final_response"].bool_param = False
    request.parameters["timeout"].int64_param = 250_000
    request.parameters["priority"].uint64_param = 1
    request.parameters["sequence_id"].string_param = "s"
    request.parameters["threshold"].double_param = 0.25
    image = request.inputs.add(name="image", datatype="UINT8", shape=[2, 2, 2, 1])
    image.parameters["binary_data_size"].int64_param = 8
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    return request


def test_tritonclient_infer_request_parses_as_ours() -> None:
    """Our ModelInferRequest reads everything a tritonclient request carries, and writes it back unchanged."""
    theirs = _tritonclient_infer_request()
    ours = grpc_service_pb2.ModelInferRequest.FromString(theirs.SerializeToString())
    ours.DiscardUnknownFields()
    assert (ours.model_name, ours.model_version, ours.id) == ("digits", "1", "request-7")
    assert ours.parameters["timeout"].WhichOneof("parameter_choice") == "int64_param"
    assert ours.parameters["priority"].uint64_param == 1
    assert list(ours.inputs[0].shape) == [2, 2, 2, 1]
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    assert ours.raw_input_contents[0] == bytes(range(8))
    assert triton_service_pb2.ModelInferRequest.FromString(ours.SerializeToString()) == theirs


def test_our_infer_response_parses_as_tritonclients() -> None:
    """What our server sends (raw output bytes, echoed id) is what tritonclient reads."""
    ours = grpc_service_pb2.ModelInferResponse(
        model_name="digits", model_version="1", id="request-7", raw_output_contents=[b"\x00" * 40]
    )
    ours.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
    stream_message = grpc_service_pb2.ModelStreamInferResponse(infer_response=ours)
    theirs = triton_service_pb2.ModelStreamInferResponse.FromString(stream_message.SerializeToString())
    theirs.DiscardUnknownFields()
    assert theirs.error_message == ""
    assert theirs.infer_response.id == "request-7"
    assert list(theirs.infer_response.outputs[0].shape) == [1, 10]
    assert grpc_service_pb2.ModelStreamInferResponse.FromString(theirs.SerializeToString()) == stream_message


CONFIG_FILES = sorted({*REPO_ROOT.glob("models/*/config.pbtxt"), REPO_ROOT / "models" / "digits" / "config.pbtxt"})


@pytest.mark.parametrize("config_file", CONFIG_FILES, ids=lambda path: path.parent.name)
def test_committed_model_config_parses_strictly_and_identically(config_file: Path) -> None:
    """Our schema reads the committed config.pbtxt files (no unknown field) to the same bytes as Triton's."""
    text = config_file.read_text(encoding="utf-8")
    ours = text_format.Parse(text, model_config_pb2.ModelConfig())
    theirs = text_format.Parse(text, triton_model_config_pb2.ModelConfig())
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    response = grpc_service_pb2.ModelConfigResponse(config=ours)
    their_response = triton_service_pb2.ModelConfigResponse.FromString(response.SerializeToString())
    assert their_response.config == theirs


def _undocumented(proto_file: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    """Declarations (messages, fields, oneofs, enums, values, services, RPCs) without a leading comment."""
    comments = {
        tuple(location.path): location.leading_comments.strip() for location in proto_file.source_code_info.location
    }

    def check(path: tuple[int, ...], name: str) -> Iterator[str]:
        if not comments.get(path):
            yield name

    def enum(enum_type: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str) -> Iterator[str]:
        name = f"{prefix}{enum_type.name}"
        yield from check(path, f"enum {name}")
        for index, value in enumerate(enum_type.value):
            yield from check((*path, 2, index), f"enum value {name}.{value.name}")

    def message_type(node: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str) -> Iterator[str]:
        name = f"{prefix}{node.name}"
        if node.options.map_entry:  # written as `map<K, V>`: the field's comment documents it
            return
        yield from check(path, f"message {name}")
        for index, field in enumerate(node.field):
            yield from check((*path, 2, index), f"field {name}.{field.name}")
        synthetic = {field.oneof_index for field in node.field if field.proto3_optional}  # `optional` fields' own
        for index, oneof in enumerate(node.oneof_decl):
            if index not in synthetic:
                yield from check((*path, 8, index), f"oneof {name}.{oneof.name}")
        for index, nested in enumerate(node.nested_type):
            yield from message_type(nested, (*path, 3, index), f"{name}.")
        for index, nested_enum in enumerate(node.enum_type):
            yield from enum(nested_enum, (*path, 4, index), f"{name}.")

    package = f"{proto_file.package}."
    for index, node in enumerate(proto_file.message_type):
        yield from message_type(node, (4, index), package)
    for index, enum_type in enumerate(proto_file.enum_type):
        yield from enum(enum_type, (5, index), package)
    for index, service in enumerate(proto_file.service):
        yield from check((6, index), f"service {package}{service.name}")
        for method_index, method in enumerate(service.method):
            yield from check((6, index, 2, method_index), f"rpc {package}{service.name}.{method.name}")


PROTO_FILES = sorted(path.relative_to(PROTOS_DIR).as_posix() for path in PROTOS_DIR.rglob("*.proto"))


@pytest.mark.parametrize("proto", PROTO_FILES)
def test_every_declaration_is_documented(proto: str, tmp_path: Path) -> None:
    """Clients in other languages read the .proto files: every message, field and RPC says what it is."""
    descriptor_set = tmp_path / "descriptors.pb"
    well_known_types = Path(protoc.__file__).resolve().parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTOS_DIR}",
            f"--proto_path={well_known_types}",
            "--include_source_info",
            f"--descriptor_set_out={descriptor_set}",
            proto,
        ]
    )
    assert status == 0, f"protoc failed on {proto}"
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    [proto_file] = [file for file in files.file if file.name == proto]
    assert proto_file.message_type, f"{proto}: nothing declared?"
    missing = list(_undocumented(proto_file))
    assert not missing, f"{proto}: no `//` comment right above:\n" + "\n".join(missing)
