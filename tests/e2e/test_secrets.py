"""No secret in any file a run leaves: the token, the TLS private keys and session credentials
appear in no log, metrics line, checkpoint or worker state, though the token and keys went through
the command line and the credentials through every call."""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from dept_comm.channel import open_channel
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_comm.tls import channel_credentials
from tests.e2e.harness import (
    EXIT_S,
    MARGIN_S,
    RUN_S,
    START_S,
    Server,
    describe,
    records,
    start_worker,
    wait_workers,
)
from tests.e2e.test_rounds import server_args, worker_args
from tests.integration.test_tls import Issued, _issue

pytestmark = pytest.mark.slow


def key_material(issued: Issued) -> list[bytes]:
    """What would betray a private key: its PEM body (whole and line by line) and its DER bytes."""
    lines = [ln for ln in issued.key_pem.splitlines() if ln and not ln.startswith(b"-----")]
    der = issued.key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return [b"".join(lines), *lines, der]


@pytest.mark.timeout(START_S + RUN_S + EXIT_S + MARGIN_S)
def test_token_and_tls_keys_are_in_no_file_of_the_run(global_vocab: Path, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = _issue(pki, "ca", is_ca=True)
    server_cert = _issue(
        pki,
        "server",
        issuer=ca,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    # With mutual TLS the certificate names the worker: "sw" (its --source, hence its name).
    client_cert = _issue(pki, "sw", issuer=ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    probe_cert = _issue(pki, "probe", issuer=ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    token = f"tok-{secrets.token_hex(16)}"

    run = tmp_path / "run"
    run.mkdir()
    tls_server = [
        "--token", token, "--tls-cert", str(server_cert.cert_path), "--tls-key", str(server_cert.key_path),
        "--tls-client-ca", str(ca.cert_path),
    ]  # fmt: skip
    args = server_args("spec", global_vocab, run, rounds=2, extra=tls_server)
    args[args.index("--workers") + 1] = "1"
    server = Server(args, run / "server.log")
    tls_worker = [
        "--token", token, "--tls-ca", str(ca.cert_path), "--tls-cert", str(client_cert.cert_path),
        "--tls-key", str(client_cert.key_path),
    ]  # fmt: skip
    worker = start_worker(worker_args(server.port, "sw", global_vocab, run, extra=tls_worker), run / "sw.log")
    # A second worker's session credentials go through Join, Heartbeat and a refused call (another
    # worker's Leave) while the run goes on; the server handles them, and must write them nowhere.
    sessions = probe_sessions(server.port, token, ca.cert_pem, probe_cert)
    wait_workers({"sw": worker}, RUN_S)
    assert server.wait(EXIT_S) == 0, describe()
    assert server.proc.stdout is not None
    (run / "server.stdout").write_text(server.proc.stdout.read())
    # The run happened, over mutual TLS with the token: two rounds, and files to search.
    assert [r["round"] for r in records(run / "metrics.jsonl") if r.get("kind") != "final"] == [0, 1]

    # Every file the run wrote: server and worker logs, server stdout, metrics, checkpoints, worker state.
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.relative_to(run).parts[0] for p in files}
    assert {"server.log", "sw.log", "server.stdout", "metrics.jsonl", "ckpt", "w-sw"} <= names, sorted(names)
    assert any(p.suffix == ".safetensors" for p in files)
    needles = {"token": [token.encode()], "session credential": [s.encode() for s in sessions]}
    needles |= {
        f"{name} key": key_material(issued)
        for name, issued in (("server", server_cert), ("client", client_cert))
    }
    # The search finds what it looks for where it is: in the key files themselves.
    for issued in (server_cert, client_cert):
        assert any(form in issued.key_path.read_bytes() for form in key_material(issued))
    leaks = [
        f"{what} in {p.relative_to(run)}"
        for p in files
        for what, forms in needles.items()
        if any(form in p.read_bytes() for form in forms)
    ]
    assert not leaks, leaks


def probe_sessions(port: int, token: str, ca_pem: bytes, cert: Issued) -> list[str]:
    """Join as "probe" twice (a credential and its replacement), use both, and leave."""
    creds = channel_credentials(ca_pem, cert.cert_pem, cert.key_pem)
    auth = (("authorization", f"Bearer {token}"),)
    out: list[str] = []
    with open_channel(f"127.0.0.1:{port}", credentials=creds) as channel:
        stub = service_pb2_grpc.ParameterServerStub(channel)
        join = service_pb2.JoinRequest(source_id="en", worker_name="probe")
        for _ in range(2):
            reply = stub.Join(join, metadata=auth, timeout=30)
            out.append(reply.session)
            session = (*auth, ("dept-session", reply.session))
            stub.Heartbeat(
                service_pb2.HeartbeatRequest(worker_id=reply.worker_id), metadata=session, timeout=30
            )
        with pytest.raises(grpc.RpcError) as refused:  # the sw worker is not ours to remove
            stub.Leave(service_pb2.LeaveRequest(worker_id="w-other"), metadata=session, timeout=30)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stub.Leave(
            service_pb2.LeaveRequest(worker_id=reply.worker_id, reason="probe"), metadata=session, timeout=30
        )
    assert all(len(s) >= 40 for s in out) and len(set(out)) == 2
    return out
