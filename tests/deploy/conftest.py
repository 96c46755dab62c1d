"""The deployment files, read once: the Dockerfile's stages and every Kubernetes manifest under deploy/kubernetes/."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.settings import ENV_PREFIX, Settings, parse_settings
from tests.deploy.dockerfile import Stage, parse_dockerfile

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
MANIFEST_DIR = REPO_ROOT / "deploy" / "kubernetes"
MANIFEST_FILES = sorted(MANIFEST_DIR.rglob("*.yaml"))
# Newest Kubernetes minor that kubernetes-validate knows, and an older one still common on managed clusters.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
# The CLASSIFY_* variables classify-server reads (it ignores any other, so a misspelled one would pass unnoticed).
SETTING_VARIABLES = frozenset(f"{ENV_PREFIX}{option.name.upper()}" for option in dataclasses.fields(Settings))


def manifest_name(path: Path) -> str:
    return path.relative_to(MANIFEST_DIR).as_posix()


def load_manifests(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of one file (empty documents dropped)."""
    documents = [each for each in yaml.safe_load_all(path.read_text(encoding="utf-8")) if each is not None]
    assert all(isinstance(each, dict) for each in documents), f"{manifest_name(path)}: a document is not a mapping"
    return documents


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's literal ``env`` values (valueFrom entries have none to check)."""
    return {each["name"]: each["value"] for each in container.get("env", []) if "value" in each}


def effective_settings(image_env: dict[str, str], container: dict[str, Any]) -> Settings:
    """The server's settings in this container: the image's ENV, then the manifest's env, through the real parser."""
    return parse_settings([], {**image_env, **container_env(container)})


@pytest.fixture(scope="session")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def runtime_stage(stages: list[Stage]) -> Stage:
    """The image that is shipped: the last stage."""
    return stages[-1]


@pytest.fixture(scope="session")
def manifests() -> dict[str, list[dict[str, Any]]]:
    """{path under deploy/kubernetes: its documents}."""
    assert MANIFEST_FILES, f"no manifests under {MANIFEST_DIR}"
    return {manifest_name(path): load_manifests(path) for path in MANIFEST_FILES}


@pytest.fixture(scope="session")
def by_kind(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The one document of each kind (a second one of a kind would make the consistency checks ambiguous)."""
    kinds: dict[str, dict[str, Any]] = {}
    for name, documents in manifests.items():
        for document in documents:
            key = document["kind"] if document["kind"] != "Service" else _service_key(document)
            assert key not in kinds, f"{name}: a second {key}"
            kinds[key] = document
    return kinds


def _service_key(service: dict[str, Any]) -> str:
    return "HeadlessService" if service["spec"].get("clusterIP") == "None" else "Service"
