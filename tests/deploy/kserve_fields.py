"""Check an InferenceService against KServe's own field list, offline.

kserve_v1beta1_fields.json (written by generate_kserve_fields.py from the KServe SDK's generated models) gives,
for each KServe type, its JSON keys and their types. The walk fails on a key the type lacks and on a value of
the wrong type. Kubernetes types inside (containers, probes, resources, metadata) are checked against the
strict Kubernetes JSON schemas that kubernetes-validate bundles, so a misspelled container field fails too.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema

__all__ = ["FIELDS_FILE", "KServeFields", "kubernetes_definition", "kubernetes_definitions", "type_names"]

FIELDS_FILE = Path(__file__).with_name("kserve_v1beta1_fields.json")
_LIST = re.compile(r"list\[(.+)\]")
_DICT = re.compile(r"dict\(str, (.+)\)")
_VERSIONED = re.compile(r"V(\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)")  # V1Container, V1beta1Foo
_QUALIFIED = re.compile(r"K8sIoApi([A-Z][a-z]+)V(\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)")  # K8sIoApiAppsV1X
_QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
# Names the SDK gives resource quantities (KServe's MetricQuantity is a Quantity in its Go API).
_ALIASES = {"ResourceQuantity": _QUANTITY, "V1beta1MetricQuantity": _QUANTITY}
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    # YAML reads an unquoted timestamp as a datetime; quoted, it stays a string. Both are valid.
    "datetime": (str, datetime.datetime),
    "date": (str, datetime.date),
}


def type_names(openapi_type: str) -> list[str]:
    """The type names inside the SDK's ``list[...]`` and ``dict(str, ...)`` wrappers (``list[V1Container]``)."""
    match = _LIST.fullmatch(openapi_type) or _DICT.fullmatch(openapi_type)
    return type_names(match.group(1)) if match else [openapi_type]


@cache
def kubernetes_definitions(version: str) -> dict[str, Any]:
    """kubernetes-validate's strict ``_definitions.json`` for one Kubernetes version (``1.37.0``)."""
    path = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict" / "_definitions.json"
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def kubernetes_definition(sdk_name: str, definitions: dict[str, Any]) -> str | None:
    """The Kubernetes definition an SDK class name stands for (``V1Container``: ``io.k8s.api.core.v1.Container``)."""
    known = definitions["$defs"]
    if sdk_name in _ALIASES:
        return _ALIASES[sdk_name]
    if match := _QUALIFIED.fullmatch(sdk_name):
        group, version, kind = match.groups()
        name = f"io.k8s.api.{group.lower()}.v{version}.{kind}"
        return name if name in known else None
    if match := _VERSIONED.fullmatch(sdk_name):
        version, kind = match.groups()
        candidates = [each for each in known if each.startswith("io.k8s.") and each.endswith(f".v{version}.{kind}")]
        core = f"io.k8s.api.core.v{version}.{kind}"
        if len(candidates) == 1:
            return candidates[0]
        return core if core in candidates else None
    return None


@dataclass
class KServeFields:
    """The field list of one KServe API version, and the Kubernetes schemas its Kubernetes types are checked with."""

    api_version: str
    kind: str
    root: str
    types: dict[str, dict[str, str]]
    definitions: dict[str, Any]
    _validators: dict[str, jsonschema.protocols.Validator] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, kubernetes_version: str, path: Path = FIELDS_FILE) -> KServeFields:
        document = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            api_version=document["api_version"],
            kind=document["kind"],
            root=document["root"],
            types=document["types"],
            definitions=kubernetes_definitions(kubernetes_version),
        )

    def unresolved_types(self) -> set[str]:
        """Type names the field list uses that are neither KServe's, primitives, nor in the Kubernetes schemas."""
        named = {name for fields in self.types.values() for each in fields.values() for name in type_names(each)}
        return {
            name
            for name in named - self.types.keys() - _PRIMITIVES.keys() - {"object"}
            if kubernetes_definition(name, self.definitions) is None
        }

    def validate(self, manifest: dict[str, Any]) -> list[str]:
        """Every problem found, each as ``path: what is wrong``; empty when the manifest is valid."""
        errors: list[str] = []
        for key, expected in (("apiVersion", self.api_version), ("kind", self.kind)):
            if manifest.get(key) != expected:
                errors.append(f"{key}: {manifest.get(key)!r}, expected {expected!r}")
        self._check(manifest, self.root, "", errors)
        return errors

    def _check(self, value: Any, openapi_type: str, path: str, errors: list[str]) -> None:
        where = path or "(root)"
        if value is None:  # an explicit null leaves the field unset, as the API server treats it
            return
        if match := _LIST.fullmatch(openapi_type):
            if not isinstance(value, list):
                errors.append(f"{where}: {type(value).__name__}, expected a list of {match.group(1)}")
                return
            for index, item in enumerate(value):
                self._check(item, match.group(1), f"{path}[{index}]", errors)
        elif match := _DICT.fullmatch(openapi_type):
            if not isinstance(value, dict):
                errors.append(f"{where}: {type(value).__name__}, expected a mapping to {match.group(1)}")
                return
            for key, item in value.items():
                if not isinstance(key, str):
                    errors.append(f"{where}: key {key!r} is not a string")
                self._check(item, match.group(1), f"{path}.{key}", errors)
        elif openapi_type == "object":
            return
        elif openapi_type in _PRIMITIVES:
            expected = _PRIMITIVES[openapi_type]
            if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
                errors.append(f"{where}: {value!r} is a {type(value).__name__}, expected {openapi_type}")
        elif openapi_type in self.types:
            self._check_object(value, openapi_type, path, errors)
        else:
            self._check_kubernetes(value, openapi_type, path, errors)

    def _check_object(self, value: Any, type_name: str, path: str, errors: list[str]) -> None:
        where = path or "(root)"
        if not isinstance(value, dict):
            errors.append(f"{where}: {type(value).__name__}, expected a {type_name} mapping")
            return
        fields = self.types[type_name]
        for key, item in value.items():
            if key not in fields:
                errors.append(f"{path}.{key}".lstrip(".") + f": unknown field (not in {type_name})")
                continue
            self._check(item, fields[key], f"{path}.{key}".lstrip("."), errors)

    def _check_kubernetes(self, value: Any, sdk_name: str, path: str, errors: list[str]) -> None:
        definition = kubernetes_definition(sdk_name, self.definitions)
        if definition is None:
            errors.append(f"{path}: no schema for {sdk_name}, neither KServe's nor Kubernetes'")
            return
        if definition not in self._validators:
            schema = {**self.definitions, "$ref": f"#/$defs/{definition}"}
            self._validators[definition] = jsonschema.Draft202012Validator(schema)
        for error in self._validators[definition].iter_errors(value):
            inner = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
            errors.append(f"{path}{inner}: {error.message} ({definition})")
