"""Settings: one declaration per option, filled from CLASSIFY_* variables and flags (flags win)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.runtime import Device
from serving.settings import ENV_PREFIX, Settings, parse_settings
from tests.serving.conftest import REPO_ROOT, ServerProcess, write_repository


def test_defaults_without_flags_or_variables() -> None:
    """With no arguments the server serves ./models on 8001 with metrics on 8002, device auto."""
    settings = parse_settings([], {})
    assert settings == Settings()
    assert (settings.model_repository, settings.port, settings.metrics_port) == (Path("models"), 8001, 8002)
    assert settings.device is Device.AUTO


def test_variables_fill_and_flags_win() -> None:
    """Containers configure by environment; a flag on the command line still overrides."""
    environ = {"CLASSIFY_PORT": "9001", "CLASSIFY_DEVICE": "cpu", "CLASSIFY_GRACE_PERIOD": "2.5", "OTHER": "x"}
    settings = parse_settings(["--port", "9100", "--workers", "3"], environ)
    assert (settings.port, settings.device, settings.grace_period, settings.workers) == (9100, Device.CPU, 2.5, 3)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--port", "x"], {}, "--port / CLASSIFY_PORT: 'x'"),
        ([], {"CLASSIFY_DEVICE": "gpu"}, "choose from auto, cuda, cpu"),
        (["--tls-cert", "cert.pem"], {}, "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], {}, "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--workers", "0"], {}, "--workers must be at least 1"),
        (["--workers", "2", "--port", "0"], {}, "--workers above 1 needs a fixed --port"),
        (["--decode-threads", "-1"], {}, "--decode-threads must be 0 (one share of the cores per worker) or more"),
    ],
)
def test_bad_settings_are_usage_errors(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in a deployment must stop the server with a message naming the setting, not a traceback."""
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv, environ)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_flag_and_its_variable() -> None:
    """``--help`` is the configuration reference: every field, its variable and its default."""
    result = subprocess.run(
        [sys.executable, "-m", "serving", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    text = " ".join(result.stdout.split())
    for option in dataclasses.fields(Settings):
        assert f"--{option.name.replace('_', '-')}" in text
        assert f"{ENV_PREFIX}{option.name.upper()}" in text


def test_json_log_lines(start_server: object, tmp_path: Path) -> None:
    """Log collectors parse one JSON object per line."""
    repository = write_repository(tmp_path / "models")
    server: ServerProcess = start_server(  # type: ignore[operator]
        "--model-repository", str(repository), "--device", "cpu", "--log-format", "json"
    )
    lines = [json.loads(line) for line in server.log.splitlines() if line.strip()]
    assert any(line["message"].startswith("listening on") for line in lines)
    assert {"time", "level", "name", "message"} <= set(lines[0])


@pytest.mark.parametrize(("workers", "threads", "pool"), [(1, 0, 16), (8, 0, 2), (12, 0, 2), (32, 0, 1), (8, 5, 5)])
def test_decode_pool_shares_the_cores_among_workers(
    workers: int, threads: int, pool: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers on one box decode side by side: by default each gets its share of the cores the process may
    use (``serving.cores``), rounded up, so at least one."""
    monkeypatch.setattr("serving.settings.usable_cores", lambda: 16)
    assert Settings(workers=workers, decode_threads=threads).decode_pool_size() == pool
