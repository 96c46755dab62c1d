"""Server settings: declared once, with their help text; the command line and ``CLASSIFY_*`` variables fill them."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.cores import usable_cores
from serving.runtime import Device

__all__ = ["ENV_PREFIX", "Settings", "parse_settings"]

ENV_PREFIX = "CLASSIFY_"


@dataclass(frozen=True)
class Settings:
    """Everything ``classify-server`` can be told; each field is one flag ``--field-name`` and one variable."""

    model_repository: Path = field(default=Path("models"), metadata={"help": "model repository folder (Triton layout)"})
    host: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=8001, metadata={"help": "gRPC port: classify.v1, KServe v2, health and reflection"})
    metrics_port: int = field(default=8002, metadata={"help": "Prometheus /metrics HTTP port; 0 turns metrics off"})
    device: Device = field(
        default=Device.AUTO,
        metadata={"help": "auto: CUDA if ONNX Runtime's CUDA provider loads, else CPU; cuda: CUDA or exit; cpu"},
    )
    log_level: str = field(
        default="info", metadata={"help": "log level", "choices": ("debug", "info", "warning", "error")}
    )
    log_format: str = field(default="text", metadata={"help": "log lines as text or JSON", "choices": ("text", "json")})
    max_message_bytes: int = field(default=64 << 20, metadata={"help": "largest gRPC message received or sent"})
    max_image_bytes: int = field(default=16 << 20, metadata={"help": "largest encoded image accepted"})
    max_image_pixels: int = field(default=50_000_000, metadata={"help": "largest decoded image (width x height)"})
    workers: int = field(default=1, metadata={"help": "server processes sharing the port, each with its own sessions"})
    decode_threads: int = field(
        default=0,
        metadata={"help": "image decode threads per server process; 0: the usable cores over --workers, rounded up"},
    )
    grace_period: float = field(default=30.0, metadata={"help": "seconds to finish in-flight requests on SIGTERM"})
    tls_cert: Path | None = field(default=None, metadata={"help": "PEM certificate chain: serve gRPC over TLS"})
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key for --tls-cert"})
    tls_client_ca: Path | None = field(
        default=None, metadata={"help": "PEM CA bundle: only clients with a certificate it signed (mutual TLS)"}
    )
    health_port: int = field(
        default=0, metadata={"help": "plaintext port with only grpc.health.v1, for Kubernetes probes under TLS; 0: off"}
    )

    def decode_pool_size(self) -> int:
        """``decode_threads``, or the cores this process may run on shared among the workers, rounded up: many
        more threads per process only queue for its GIL between decodes and crowd out its event loop, but rounding
        the share down leaves the decode stage short (12 workers on 16 cores decode with 2 threads each,
        ``benchmarks/BENCHMARKS.md`` section 3)."""
        return self.decode_threads or math.ceil(usable_cores() / self.workers)


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "Path": Path,
    "Path | None": Path,
    "Device": Device,
    "str": str,
}


def _choices(option: dataclasses.Field[Any]) -> tuple[str, ...] | None:
    if option.type == "Device":
        return tuple(device.value for device in Device)
    choices: tuple[str, ...] | None = option.metadata.get("choices")
    return choices


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="classify-server",
        description="Serve the image classifiers of a model repository over gRPC (classify.v1 and KServe v2).",
        epilog=f"Each flag can also be set by an environment variable, {ENV_PREFIX} and the flag's name in capitals "
        f"(e.g. {ENV_PREFIX}PORT=9001); a flag wins over its variable.",
    )
    for option in dataclasses.fields(Settings):
        default = option.default.value if isinstance(option.default, Device) else option.default
        parser.add_argument(
            f"--{option.name.replace('_', '-')}",
            choices=_choices(option),
            default=argparse.SUPPRESS,
            help=f"{option.metadata['help']} [{ENV_PREFIX}{option.name.upper()}; default: {default}]",
        )
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, overridden by ``CLASSIFY_*`` variables, overridden by flags; exits with a usage error if bad."""
    parser = _parser()
    environ = os.environ if environ is None else environ
    texts = {
        o.name: environ[ENV_PREFIX + o.name.upper()]
        for o in dataclasses.fields(Settings)
        if ENV_PREFIX + o.name.upper() in environ
    }
    texts.update(vars(parser.parse_args(argv)))
    values: dict[str, Any] = {}
    for option in dataclasses.fields(Settings):
        if option.name not in texts:
            continue
        text = texts[option.name]
        choices = _choices(option)
        try:
            if choices is not None and text not in choices:
                raise ValueError(f"choose from {', '.join(choices)}")
            values[option.name] = _CONVERTERS[str(option.type)](text)
        except ValueError as exc:
            parser.error(f"--{option.name.replace('_', '-')} / {ENV_PREFIX}{option.name.upper()}: {text!r}: {exc}")
    settings = Settings(**values)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if settings.workers < 1:
        parser.error("--workers must be at least 1")
    if settings.decode_threads < 0:
        parser.error("--decode-threads must be 0 (one share of the cores per worker) or more")
    if settings.workers > 1 and settings.port == 0:
        parser.error("--workers above 1 needs a fixed --port: the workers share it")
    return settings
