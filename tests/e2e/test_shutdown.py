"""The real dept-server process on SIGTERM/SIGINT: NOT_SERVING, in-flight calls finish, checkpoint, exit 0.

Waits are for events (the health stream's next status, the in-flight call's answer, the process's
exit), each with a deadline far above what they take (about a second idle): ``GRACE_S`` is the
server's own drain limit, and checkpointing and interpreter exit get ``EXIT_S`` on top, enough
for a 2-core machine under two CPU burners.
"""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dept_comm.checkpoint import CheckpointStore
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_server.config import ServerConfig
from dept_server.serve import build_app
from tests.e2e.harness import Server

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
GRACE_S = 3.0  # --grace: how long the server lets in-flight RPCs finish
START_S = 60.0  # the harness's wait for the server's port line (imports torch, builds the model)
CALL_S = 30.0  # deadline of each RPC the test makes
EXIT_S = 60.0  # drain (GRACE_S at most), checkpoint, summary, interpreter exit

# Above the sum of the waits below, so a stuck server fails with the harness's diagnosis.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(START_S + 3 * CALL_S + 2 * (GRACE_S + EXIT_S) + 60)]


def server_args(extra: list[str]) -> list[str]:
    return [
        "--port", "0", "--rounds", "2", "--workers", "1", "--variant", "spec", "--model", "tiny",
        "--round-timeout", "300", "--token", TOKEN, "--grace", str(GRACE_S), *extra,
    ]  # fmt: skip


def test_sigterm_drains_checkpoints_and_exits_zero(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    server = Server(server_args(["--checkpoint-dir", str(ckpt)]), tmp_path / "server.log")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=CALL_S
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = service_pb2_grpc.ParameterServerStub(channel)
        reply = stub.Join(service_pb2.JoinRequest(source_id="sw"), metadata=AUTH, timeout=CALL_S)
        worker_id, session = reply.worker_id, (*AUTH, ("dept-session", reply.session))
        poll = service_pb2.WaitRoundRequest(worker_id=worker_id, round_idx=0, timeout_ms=1_000)
        in_flight = stub.WaitRound.future(poll, metadata=session, timeout=GRACE_S + EXIT_S)
        # Served after the poll was sent on the same connection: the poll is in the server.
        stub.Heartbeat(service_pb2.HeartbeatRequest(worker_id=worker_id), metadata=session, timeout=CALL_S)

        server.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open Watch would hold the drain for the whole grace period
        # Answered (the poll's own 1 s timeout, inside the grace period), not cut off.
        assert in_flight.result(timeout=GRACE_S + EXIT_S).round_idx == 0
    assert server.wait(timeout=GRACE_S + EXIT_S) == 0, server.log.read_text()[-3000:]
    assert "final_checkpoint round=0 version=0" in server.log.read_text()

    # No round closed, so this checkpoint was written on the way out: the initial body, round 0.
    with CheckpointStore(ckpt) as store:
        saved = store.latest()
    assert saved is not None
    assert saved.meta["round_idx"] == 0 and saved.meta["version"] == 0
    assert saved.tensors
    # --resume takes it (ServerApp checks the body's digest against the manifest's).
    app = build_app(
        ServerConfig(
            port=0, rounds=2, workers=1, variant="spec", model="tiny", checkpoint_dir=ckpt, resume=True
        )
    )
    try:
        assert app.model.version == 0
        assert app.model.digest.hex() == saved.meta["digest"]
    finally:
        app.close()


def test_sigint_without_checkpoint_dir_exits_zero(tmp_path: Path) -> None:
    server = Server(server_args([]), tmp_path / "server.log")
    server.proc.send_signal(signal.SIGINT)
    assert server.wait(timeout=GRACE_S + EXIT_S) == 0, server.log.read_text()[-3000:]
    assert "stop requested" in server.log.read_text()
