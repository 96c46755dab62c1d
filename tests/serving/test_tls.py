"""TLS and mutual TLS on the gRPC port, the plaintext health port beside it, and bad TLS flags at start-up."""

from __future__ import annotations

import datetime
import ipaddress
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.protos.classify.v1 import classify_pb2 as pb
from serving.protos.classify.v1 import classify_pb2_grpc
from serving.protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from tests.serving.conftest import REPO_ROOT, SMALL_BATCHING, ServerProcess, free_port, write_repository

DIGIT_LABELS = [str(digit) for digit in range(10)]
SERVICE_NAMES = ("", "classify.v1.Classifier", "inference.GRPCInferenceService")
RPC_TIMEOUT = 10.0


@dataclass(frozen=True)
class Pki:
    """PEM files of two unrelated certificate authorities: ours (server and client) and another (a client only)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier | None = None,
    alt_names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A certificate valid for a day: a self-signed CA when ``issuer`` is None, else a leaf for ``usage``."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (folder / f"{name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Fresh certificates for this run: nothing secret is committed, and none of them can expire in the repo."""
    folder = tmp_path_factory.mktemp("pki")
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "server", "client", "other_ca", "other")}
    ca = _certificate("classify test CA", keys["ca"], None, keys["ca"])
    server_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    ]
    server = _certificate("localhost", keys["server"], ca, keys["ca"], ExtendedKeyUsageOID.SERVER_AUTH, server_names)
    client = _certificate("classify client", keys["client"], ca, keys["ca"], ExtendedKeyUsageOID.CLIENT_AUTH)
    other_ca = _certificate("unrelated CA", keys["other_ca"], None, keys["other_ca"])
    other = _certificate("unrelated client", keys["other"], other_ca, keys["other_ca"], ExtendedKeyUsageOID.CLIENT_AUTH)
    for name, certificate in (("ca", ca), ("server", server), ("client", client), ("other_ca", other_ca)):
        _write(folder, name, certificate, keys[name])
    _write(folder, "other_client", other, keys["other"])
    return Pki(
        ca=folder / "ca.crt",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
        other_ca=folder / "other_ca.crt",
        other_client_cert=folder / "other_client.crt",
        other_client_key=folder / "other_client.key",
    )


def _start(args: list[str], folder: Path) -> Iterator[ServerProcess]:
    """A digits-only server on the CPU for one module; with TLS on, ``wait_serving`` probes the health port."""
    repository = write_repository(folder / "models", {"digits": SMALL_BATCHING["digits"]})
    process = ServerProcess(
        ["--model-repository", str(repository), "--device", "cpu", "--health-port", str(free_port()), *args],
        folder / "server.log",
    )
    try:
        process.wait_serving()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Server-side TLS only: any client that trusts our CA may call."""
    yield from _start(
        ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)], tmp_path_factory.mktemp("tls")
    )


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Mutual TLS: only clients presenting a certificate signed by our CA may call."""
    yield from _start(
        ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)],
        tmp_path_factory.mktemp("mtls"),
    )


def _credentials(root: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=root.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def _server_live(channel: grpc.Channel) -> bool:
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    return stub.ServerLive(grpc_service_pb2.ServerLiveRequest(), timeout=RPC_TIMEOUT).live


def _refusal(channel: grpc.Channel) -> grpc.StatusCode:
    """The status of a ServerLive call that the test expects the server to refuse."""
    with pytest.raises(grpc.RpcError) as refused:
        _server_live(channel)
    code: grpc.StatusCode = refused.value.code()
    return code


def _drawn_one() -> pb.Image:
    """A "1" drawn as a bar, as the model's raw 28x28x1 input: no MNIST files needed to cross the wire."""
    pixels = np.zeros((28, 28, 1), dtype=np.uint8)
    pixels[4:24, 13:16] = 255
    return pb.Image(raw=pb.RawImage(data=pixels.tobytes(), shape=list(pixels.shape)))


# --- server-side TLS ---------------------------------------------------------------------------------------------


def test_client_trusting_the_ca_is_served_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    """The point of --tls-cert: a client that verifies the server (IP SAN 127.0.0.1, no name override) gets answers."""
    with grpc.secure_channel(tls_server.address, _credentials(pki.ca)) as channel:
        ready = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(
            grpc_service_pb2.ServerReadyRequest(), timeout=RPC_TIMEOUT
        )
        response = classify_pb2_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(model="digits", images=[_drawn_one()], request_id="over-tls"), timeout=RPC_TIMEOUT
        )
    assert ready.ready
    assert (response.model, response.request_id, len(response.results)) == ("digits", "over-tls", 1)
    assert response.results[0].labels[0].label in DIGIT_LABELS
    assert "(TLS)" in tls_server.log


def test_plaintext_client_is_refused_on_the_tls_port(tls_server: ServerProcess) -> None:
    """With TLS on, nothing may travel in clear on the API port: a plaintext client cannot even connect."""
    with grpc.insecure_channel(tls_server.address) as channel:
        assert _refusal(channel) == grpc.StatusCode.UNAVAILABLE


def test_client_not_trusting_the_server_certificate_is_refused(tls_server: ServerProcess, pki: Pki) -> None:
    """The client side of TLS: a server certificate from a CA the client does not trust ends the handshake."""
    with grpc.secure_channel(tls_server.address, _credentials(pki.other_ca)) as channel:
        assert _refusal(channel) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_plaintext_health_port_answers_serving(tls_server: ServerProcess, service: str) -> None:
    """Kubernetes gRPC probes cannot speak TLS: the health port answers them in plaintext, for every service name."""
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_port_does_not_serve_the_inference_apis(tls_server: ServerProcess) -> None:
    """The plaintext port must not become a way around TLS: it serves grpc.health.v1 and nothing else."""
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as channel:
        assert _refusal(channel) == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as classify:
            classify_pb2_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(model="digits", images=[_drawn_one()]), timeout=RPC_TIMEOUT
            )
    assert classify.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- mutual TLS --------------------------------------------------------------------------------------------------


def test_client_with_a_certificate_from_the_client_ca_is_served(mtls_server: ServerProcess, pki: Pki) -> None:
    """The point of --tls-client-ca: a client holding a certificate our CA signed is let in."""
    with grpc.secure_channel(mtls_server.address, _credentials(pki.ca, pki.client_cert, pki.client_key)) as channel:
        assert _server_live(channel)
        response = classify_pb2_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(model="digits", images=[_drawn_one()]), timeout=RPC_TIMEOUT
        )
    assert response.results[0].labels[0].label in DIGIT_LABELS
    assert "(TLS)" in mtls_server.log


def test_tls_client_without_a_certificate_is_refused(mtls_server: ServerProcess, pki: Pki) -> None:
    """Under mutual TLS, trusting the server is not enough: a client must prove who it is."""
    with grpc.secure_channel(mtls_server.address, _credentials(pki.ca)) as channel:
        assert _refusal(channel) == grpc.StatusCode.UNAVAILABLE


def test_client_with_a_certificate_from_another_ca_is_refused(mtls_server: ServerProcess, pki: Pki) -> None:
    """Any certificate will not do: only the CA given by --tls-client-ca vouches for clients."""
    credentials = _credentials(pki.ca, pki.other_client_cert, pki.other_client_key)
    with grpc.secure_channel(mtls_server.address, credentials) as channel:
        assert _refusal(channel) == grpc.StatusCode.UNAVAILABLE


def test_health_port_stays_plaintext_under_mutual_tls(mtls_server: ServerProcess) -> None:
    """Probes carry no client certificate: the health port must not ask for one."""
    with grpc.insecure_channel(f"127.0.0.1:{mtls_server.health_port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


# --- bad configuration -------------------------------------------------------------------------------------------


def _run_server(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as an operator would, expecting it to exit on its own before serving anything."""
    return subprocess.run(
        [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--device", "cpu", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "server.crt"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "server.key"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.crt"], "--tls-client-ca needs --tls-cert and --tls-key"),
    ],
)
def test_incomplete_tls_flags_are_a_usage_error(flags: list[str], message: str) -> None:
    """Half a TLS configuration must not quietly serve plaintext: a usage error, exit 2, before any file is read."""
    result = _run_server(*flags)
    assert result.returncode == 2, result.stderr
    assert "usage: classify-server" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _reason(stderr: str) -> str:
    """The CLI's own one-line reason for not starting (log lines and gRPC's C-core lines come before it)."""
    return "\n".join(line for line in stderr.splitlines() if line.startswith("classify-server: "))


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key", "tls_client_ca"])
def test_missing_tls_file_is_a_clear_error(pki: Pki, tmp_path: Path, missing: str) -> None:
    """A wrong path in a Kubernetes secret mount is common: the operator needs one line naming the file, not a trace."""
    files = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    files[missing] = tmp_path / "no-such-file.pem"
    result = _run_server(*(part for name, path in files.items() for part in (f"--{name.replace('_', '-')}", str(path))))
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert str(files[missing]) in _reason(result.stderr), result.stderr


@pytest.mark.parametrize("broken", ["not_pem_cert", "key_of_another_certificate", "not_pem_client_ca"])
def test_unusable_tls_file_is_a_clear_error(pki: Pki, tmp_path: Path, broken: str) -> None:
    """A file that exists but cannot serve TLS (wrong content, the wrong key) must be blamed, not the port."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    flags = {
        "not_pem_cert": ["--tls-cert", str(garbage), "--tls-key", str(pki.server_key)],
        "key_of_another_certificate": ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)],
        "not_pem_client_ca": [
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(garbage)
        ],
    }[broken]  # fmt: skip
    result = _run_server(*flags)
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    reason = _reason(result.stderr)
    assert reason, result.stderr
    assert "port in use" not in reason, reason
    assert re.search(r"TLS|certificate|key", reason, re.IGNORECASE), reason
