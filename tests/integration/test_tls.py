"""TLS and mutual TLS on a real dept-server: who gets through the handshake, and who never reaches a handler."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dept_comm.channel import open_channel
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_comm.server.run import RunningServer
from dept_comm.tls import channel_credentials
from dept_server.cli import main as server_main
from dept_server.config import ServerConfig
from dept_server.serve import start_dept_server
from dept_worker.cli import main as worker_main
from dept_worker.config import WorkerConfig

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


# -- a throwaway PKI ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, PEM-encoded, plus the files they were written to."""

    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _issue(
    out: Path,
    name: str,
    *,
    issuer: Issued | None = None,
    is_ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> Issued:
    """A P-256 key and a certificate for ``name``, self-signed when ``issuer`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return Issued(cert_pem, key_pem, cert_path, key_path, cert, key)


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    foreign_ca: Issued
    foreign_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca = _issue(out, "ca", is_ca=True)
    server = _issue(
        out,
        "server",
        issuer=ca,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client = _issue(out, "client", issuer=ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    foreign_ca = _issue(out, "foreign-ca", is_ca=True)
    foreign_client = _issue(out, "foreign-client", issuer=foreign_ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(ca, server, client, foreign_ca, foreign_client)


# -- servers -----------------------------------------------------------------------------------


def _config(pki: Pki, *, mutual: bool) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1", port=0, rounds=1, workers=1, variant="spec", model="tiny", token=TOKEN,
        tls_cert=pki.server.cert_path, tls_key=pki.server.key_path,
        tls_client_ca=pki.ca.cert_path if mutual else None,
    )  # fmt: skip


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[RunningServer]:
    server = start_dept_server(_config(pki, mutual=False))
    yield server
    server.stop(None)


@pytest.fixture
def mtls_server(pki: Pki) -> Iterator[RunningServer]:
    server = start_dept_server(_config(pki, mutual=True))
    yield server
    server.stop(None)


def join_request(name: str) -> service_pb2.JoinRequest:
    return service_pb2.JoinRequest(source_id="sw", worker_name=name)


def join_code(
    channel: grpc.Channel, name: str, metadata: tuple[tuple[str, str], ...] = AUTH
) -> grpc.StatusCode:
    """The status of one Join over ``channel`` (OK when it succeeds)."""
    stub = service_pb2_grpc.ParameterServerStub(channel)
    try:
        stub.Join(join_request(name), metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def joined(server: RunningServer) -> list[str]:
    """Names of the workers the app admitted: a Join that reached the handler shows up here."""
    return sorted(w.name for w in server.app.coordinator.workers())


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_client_with_the_right_ca_joins(tls_server: RunningServer, pki: Pki) -> None:
    creds = channel_credentials(pki.ca.cert_pem)
    with open_channel(f"localhost:{tls_server.port}", credentials=creds) as channel:
        assert join_code(channel, "by-name") == grpc.StatusCode.OK
        # The token is still checked over TLS.
        assert join_code(channel, "no-token", metadata=()) == grpc.StatusCode.UNAUTHENTICATED
    with open_channel(f"127.0.0.1:{tls_server.port}", credentials=creds) as channel:  # the IP SAN
        assert join_code(channel, "by-ip") == grpc.StatusCode.OK
    assert joined(tls_server) == ["by-ip", "by-name"]


def test_plaintext_client_against_the_tls_port_fails(tls_server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        assert join_code(channel, "plain") == grpc.StatusCode.UNAVAILABLE
    assert joined(tls_server) == []


def test_a_server_the_client_cannot_verify_is_refused(tls_server: RunningServer, pki: Pki) -> None:
    target = f"localhost:{tls_server.port}"
    wrong_name = channel_credentials(pki.ca.cert_pem)
    with open_channel(target, credentials=wrong_name, server_name="not-the-server.example") as channel:
        assert join_code(channel, "wrong-name") == grpc.StatusCode.UNAVAILABLE
    with open_channel(target, credentials=channel_credentials(pki.foreign_ca.cert_pem)) as channel:
        assert join_code(channel, "wrong-ca") == grpc.StatusCode.UNAVAILABLE
    assert joined(tls_server) == []


def test_server_name_override_accepts_the_name_in_the_certificate(
    tls_server: RunningServer, pki: Pki
) -> None:
    # The override replaces the target's host as the checked name (a wrong one fails, see above);
    # the certificate's own name passes.
    creds = channel_credentials(pki.ca.cert_pem)
    with open_channel(f"127.0.0.1:{tls_server.port}", credentials=creds, server_name="localhost") as channel:
        assert join_code(channel, "override") == grpc.StatusCode.OK
    assert joined(tls_server) == ["override"]


# -- mutual TLS --------------------------------------------------------------------------------


def test_mutual_tls_admits_only_client_certificates_from_the_ca(mtls_server: RunningServer, pki: Pki) -> None:
    target = f"localhost:{mtls_server.port}"
    with open_channel(target, credentials=channel_credentials(pki.ca.cert_pem)) as channel:
        assert join_code(channel, "no-cert") == grpc.StatusCode.UNAVAILABLE
    foreign = channel_credentials(pki.ca.cert_pem, pki.foreign_client.cert_pem, pki.foreign_client.key_pem)
    with open_channel(target, credentials=foreign) as channel:
        assert join_code(channel, "foreign-cert") == grpc.StatusCode.UNAVAILABLE
    assert joined(mtls_server) == []

    right = channel_credentials(pki.ca.cert_pem, pki.client.cert_pem, pki.client.key_pem)
    with open_channel(target, credentials=right) as channel:
        # Token and client certificate together: the certificate alone is not enough.
        assert join_code(channel, "cert-no-token", metadata=()) == grpc.StatusCode.UNAUTHENTICATED
        # The certificate names the worker: it joins as "client" (its common name) and nothing else.
        assert join_code(channel, "someone-else") == grpc.StatusCode.PERMISSION_DENIED
        assert join_code(channel, "client") == grpc.StatusCode.OK
    assert joined(mtls_server) == ["client"]


# -- the worker's client -----------------------------------------------------------------------


def worker_config(port: int, **tls: object) -> WorkerConfig:
    return WorkerConfig(server=f"localhost:{port}", source="sw", token=TOKEN, **tls)  # type: ignore[arg-type]


def client_for(config: WorkerConfig) -> ServerClient:
    """The ServerClient dept-worker builds from its config, without retries (failures are final)."""
    return ServerClient(
        config.server,
        token=config.token,
        timeout_s=10,
        retry_attempts=1,
        credentials=config.channel_credentials(),
        server_name=config.tls_server_name,
    )


def test_worker_client_speaks_mutual_tls(mtls_server: RunningServer, pki: Pki) -> None:
    good = worker_config(
        mtls_server.port, tls_ca=pki.ca.cert_path, tls_cert=pki.client.cert_path, tls_key=pki.client.key_path
    )
    client = client_for(good)
    try:
        assert client.join(join_request("client")).worker_id  # the certificate's common name
    finally:
        client.close()

    no_cert = worker_config(mtls_server.port, tls_ca=pki.ca.cert_path)
    wrong_name = worker_config(
        mtls_server.port, tls_ca=pki.ca.cert_path, tls_cert=pki.client.cert_path,
        tls_key=pki.client.key_path, tls_server_name="elsewhere.example",
    )  # fmt: skip
    plaintext = worker_config(mtls_server.port)
    for name, config in (
        ("worker-no-cert", no_cert),
        ("worker-wrong-name", wrong_name),
        ("worker-plain", plaintext),
    ):
        client = client_for(config)
        try:
            with pytest.raises(grpc.RpcError) as info:
                client.join(join_request(name))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, name
        finally:
            client.close()
    assert joined(mtls_server) == ["client"]


# -- configuration errors ----------------------------------------------------------------------


def test_server_tls_settings_are_validated(pki: Pki, tmp_path: Path) -> None:
    cert, key, ca = pki.server.cert_path, pki.server.key_path, pki.ca.cert_path
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        ServerConfig(tls_cert=cert)
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        ServerConfig(tls_key=key)
    with pytest.raises(ValueError, match="--tls-client-ca .* needs --tls-cert"):
        ServerConfig(tls_client_ca=ca)
    with pytest.raises(ValueError, match="no such file"):
        ServerConfig(tls_cert=tmp_path / "missing.pem", tls_key=key)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match="not a PEM file"):
        ServerConfig(tls_cert=cert, tls_key=not_pem).tls_pems()
    assert ServerConfig().tls_pems() is None
    assert ServerConfig(tls_cert=cert, tls_key=key, tls_client_ca=ca).tls_pems() == (
        pki.server.cert_pem,
        pki.server.key_pem,
        pki.ca.cert_pem,
    )


def test_worker_tls_settings_are_validated(pki: Pki, tmp_path: Path) -> None:
    ca, cert, key = pki.ca.cert_path, pki.client.cert_path, pki.client.key_path
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        WorkerConfig(server="h:1", source="sw", tls_ca=ca, tls_cert=cert)
    with pytest.raises(ValueError, match="--tls-cert needs --tls-ca"):
        WorkerConfig(server="h:1", source="sw", tls_cert=cert, tls_key=key)
    with pytest.raises(ValueError, match="--tls-server-name needs --tls-ca"):
        WorkerConfig(server="h:1", source="sw", tls_server_name="x")
    with pytest.raises(ValueError, match="no such file"):
        WorkerConfig(server="h:1", source="sw", tls_ca=tmp_path / "missing.pem")
    assert WorkerConfig(server="h:1", source="sw").channel_credentials() is None
    assert isinstance(
        WorkerConfig(server="h:1", source="sw", tls_ca=ca).channel_credentials(), grpc.ChannelCredentials
    )
    with pytest.raises(ValueError, match="needs TLS credentials"):
        open_channel("h:1", server_name="x")
    with pytest.raises(ValueError, match="both or neither"):
        channel_credentials(pki.ca.cert_pem, cert_pem=pki.client.cert_pem)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tls-cert", "{cert}"], "--tls-key go together"),
        (["--tls-client-ca", "{ca}"], "needs --tls-cert"),
        (["--tls-cert", "{missing}", "--tls-key", "{key}"], "does not exist"),
        (["--tls-cert", "{not_pem}", "--tls-key", "{key}"], "not a PEM file"),
    ],
)
def test_server_cli_rejects_bad_tls_flags(pki: Pki, tmp_path: Path, args: list[str], needle: str) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    paths = {
        "cert": pki.server.cert_path, "key": pki.server.key_path, "ca": pki.ca.cert_path,
        "missing": tmp_path / "missing.pem", "not_pem": not_pem,
    }  # fmt: skip
    result = CliRunner().invoke(server_main, [a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert needle in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tls-cert", "{cert}", "--tls-key", "{key}"], "needs --tls-ca"),
        (["--tls-ca", "{ca}", "--tls-key", "{key}"], "--tls-key go together"),
        (["--tls-server-name", "localhost"], "needs --tls-ca"),
        (["--tls-ca", "{not_pem}"], "not a PEM file"),
    ],
)
def test_worker_cli_rejects_bad_tls_flags(pki: Pki, tmp_path: Path, args: list[str], needle: str) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    paths = {
        "cert": pki.client.cert_path,
        "key": pki.client.key_path,
        "ca": pki.ca.cert_path,
        "not_pem": not_pem,
    }
    result = CliRunner().invoke(worker_main, ["--source", "sw", *(a.format(**paths) for a in args)])
    assert result.exit_code == 2, result.output
    assert needle in result.output
