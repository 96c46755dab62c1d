"""Channels to a classify server, plaintext or TLS, and what to tell people when the server cannot be reached."""

from __future__ import annotations

from pathlib import Path

import grpc

from serving.pem import PemError, read_pem

__all__ = [
    "MAX_MESSAGE_BYTES",
    "CredentialsError",
    "failure_message",
    "open_channel",
]

MAX_MESSAGE_BYTES = 64 << 20  # the server's default --max-message-bytes
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Fragments of gRPC's connection-failure details (lower-cased) and what to say instead.
_REASONS = (
    ("connection refused", "connection refused"),
    ("domain name not found", "unknown host name"),
    ("dns resolution failed", "unknown host name"),
    ("network is unreachable", "network is unreachable"),
    ("no route to host", "no route to host"),
)
_TLS_REASONS = (  # a server is there, but the two sides disagree about TLS
    ("handshake", "the TLS handshake failed: does the server use TLS, and does --tls-ca hold the CA that signed its "
     "certificate?"),
    ("ssl", "the TLS handshake failed: does the server use TLS, and does --tls-ca hold the CA that signed its "
     "certificate?"),
    ("socket closed", "the server closed the connection: does it expect TLS (--tls-ca) or a client certificate "
     "(--tls-cert, --tls-key)?"),
)  # fmt: skip


class CredentialsError(ValueError):
    """The TLS flags are incomplete, or name a file that is not a readable PEM file; the message says which."""


def _credentials(tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> grpc.ChannelCredentials | None:
    if (tls_cert is None) != (tls_key is None):
        raise CredentialsError("--tls-cert and --tls-key go together")
    if tls_ca is None:
        if tls_cert is not None:
            raise CredentialsError("--tls-cert and --tls-key need --tls-ca: TLS is on only when --tls-ca is given")
        return None
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem("--tls-ca", tls_ca),
            private_key=read_pem("--tls-key", tls_key) if tls_key else None,
            certificate_chain=read_pem("--tls-cert", tls_cert) if tls_cert else None,
        )
    except PemError as exc:
        raise CredentialsError(str(exc)) from None


def open_channel(address: str, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> grpc.aio.Channel:
    """A channel to ``address`` (HOST:PORT): TLS when ``tls_ca`` is given, mutual TLS with ``tls_cert``/``tls_key``.

    Call it from a coroutine on the event loop that will use the channel, and close the channel (``async with``).
    Nothing is sent yet: an unreachable server shows as UNAVAILABLE on the first call (see ``failure_message``).

    Args:
        address: the server's gRPC address, e.g. "localhost:8001".
        tls_ca: PEM CA bundle that signed the server's certificate; None for plaintext.
        tls_cert: PEM client certificate chain for mutual TLS (needs ``tls_key`` and ``tls_ca``).
        tls_key: PEM private key of ``tls_cert``.

    Returns:
        The channel, with message limits matching the server's defaults.

    Raises:
        CredentialsError: incomplete TLS flags, or an unreadable or non-PEM file.
    """
    credentials = _credentials(tls_ca, tls_cert, tls_key)
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)


def _reason(error: grpc.aio.AioRpcError, timeout: float | None) -> str:
    if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer" + (f" within {timeout:g} s" if timeout is not None else "")
    details = error.details() or ""
    lowered = details.lower()
    return next((reason for fragment, reason in _REASONS if fragment in lowered), details or error.code().name)


def _tls_reason(error: grpc.aio.AioRpcError) -> str | None:
    lowered = (error.details() or "").lower()
    return next((reason for fragment, reason in _TLS_REASONS if fragment in lowered), None)


def failure_message(address: str, error: grpc.aio.AioRpcError, timeout: float | None = None) -> str:
    """One line for a call that failed before the server could do anything: unreachable, or not our server.

    Args:
        address: the address the channel was opened to, so the message names it.
        error: the failed call's error.
        timeout: the call's timeout in seconds, mentioned when it ran out.
    """
    tls_reason = _tls_reason(error) if error.code() is grpc.StatusCode.UNAVAILABLE else None
    if tls_reason is not None:
        return f"cannot connect to the server at {address}: {tls_reason}"
    if error.code() in _UNREACHABLE:
        return (
            f"cannot reach a classify server at {address} ({_reason(error, timeout)}); "
            "start one with `classify-server` or pass --server HOST:PORT"
        )
    if error.code() is grpc.StatusCode.UNIMPLEMENTED:
        return f"the server at {address} does not offer this service (UNIMPLEMENTED): is it a classify server?"
    return f"the server at {address} answered {error.code().name}: {error.details()}"
