"""Reading the PEM files of TLS flags, with a message that names the flag and the file."""

from __future__ import annotations

from pathlib import Path

__all__ = ["PemError", "read_pem"]


class PemError(ValueError):
    """A TLS flag names a file that cannot be read or holds no PEM block; the message says which."""


def read_pem(flag: str, path: Path) -> bytes:
    """The bytes of ``path``, given by ``flag``; PemError if it is unreadable or not PEM."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PemError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise PemError(f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data
