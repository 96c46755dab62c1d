"""Logging set-up for the server: plain text for people, JSON lines for log collectors."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

__all__ = ["configure_logging"]

_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"


def configure_logging(level: str, log_format: str) -> None:
    """Send the root logger to stderr, in ``text`` or ``json`` (one object per line, tracebacks included)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = (
        JsonFormatter(_JSON_FIELDS, rename_fields={"levelname": "level", "asctime": "time"})
        if (log_format == "json")
        else logging.Formatter(_TEXT)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
