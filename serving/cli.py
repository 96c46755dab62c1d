"""``classify-server``: parse settings, set up logging, run the server until a signal drains it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from serving.logs import configure_logging
from serving.model_config import ConfigError
from serving.runtime import DeviceUnavailable
from serving.server import StartupError, serve
from serving.settings import Settings, parse_settings
from serving.workers import run_workers

__all__ = ["main", "run_server"]


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (a faster loop for the same gRPC work), else on asyncio's own."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def run_server(settings: Settings, engine: str | None = None) -> int:
    """Serve in this process until drained; 2 with a one-line reason when the server cannot start."""
    try:
        _run(serve(settings, engine))
    except (DeviceUnavailable, ConfigError, StartupError) as exc:
        print(f"classify-server: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    return run_workers(settings) if settings.workers > 1 else run_server(settings)


if __name__ == "__main__":
    sys.exit(main())
