"""Per-worker identity against a real server: a session credential binds every call to the worker
that joined, ``--tokens`` binds names to tokens, and a refused call changes nothing."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dept_comm.errors import PermissionDeniedError
from dept_comm.frames import as_message
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_comm.server.run import RunningServer
from dept_comm.server.sessions import read_tokens
from tests.integration.servers import Joined, join_and_pull, serving, worker_upload


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def session_of(credential: str) -> tuple[tuple[str, str], ...]:
    return (("dept-session", credential),)


def state(server: RunningServer) -> tuple[Any, ...]:
    """What a refused call must leave as it was: membership, uploads, commits, the model."""
    app = server.app
    workers = tuple((w.worker_id, w.online, w.admitted_round) for w in app.coordinator.workers())
    record = app.coordinator.round_record()
    return (
        workers,
        record.members,
        record.commits,
        app.staged_upload_bytes,
        app.model.version,
        app.model.digest,
    )


@pytest.fixture
def two(
    tmp_path: Path,
) -> Iterator[tuple[RunningServer, Joined, Joined, service_pb2_grpc.ParameterServerStub]]:
    with serving(tmp_path, workers=2) as server:
        target = f"127.0.0.1:{server.port}"
        clients = [ServerClient(target, timeout_s=20) for _ in range(2)]
        channel = grpc.insecure_channel(target)
        try:
            a, b = (join_and_pull(c, s) for c, s in zip(clients, ("sw", "en"), strict=True))
            yield server, a, b, service_pb2_grpc.ParameterServerStub(channel)
        finally:
            channel.close()
            for c in clients:
                c.close()


def test_no_call_can_act_for_another_worker(two: tuple[RunningServer, Joined, Joined, Any]) -> None:
    server, a, b, stub = two
    assert a.session and b.session and a.session != b.session
    upload = worker_upload(b)  # an update in b's name...
    messages = [as_message(m) for m in upload.messages]
    forged = secrets.token_urlsafe(32)
    calls: dict[str, Callable[[tuple[tuple[str, str], ...]], object]] = {
        "push": lambda md: stub.PushUpdate(iter(messages[:-1]), metadata=md, timeout=20),
        "commit": lambda md: stub.CommitUpdate(
            upload.commit_request(b.worker_id, 0), metadata=md, timeout=20
        ),
        "heartbeat": lambda md: stub.Heartbeat(
            service_pb2.HeartbeatRequest(worker_id=b.worker_id), metadata=md, timeout=20
        ),
        "leave": lambda md: stub.Leave(
            service_pb2.LeaveRequest(worker_id=b.worker_id), metadata=md, timeout=20
        ),
        "query": lambda md: stub.QueryUpload(
            service_pb2.QueryUploadRequest(worker_id=b.worker_id, upload_id=upload.upload_id),
            metadata=md,
            timeout=20,
        ),
        "pull": lambda md: list(
            stub.PullBody(service_pb2.PullRequest(worker_id=b.worker_id), metadata=md, timeout=20)
        ),
        "wait": lambda md: stub.WaitRound(
            service_pb2.WaitRoundRequest(worker_id=b.worker_id, timeout_ms=10), metadata=md, timeout=20
        ),
    }
    before = state(server)
    for name, call in calls.items():
        # ...sent with a's credential, a forged one, or none at all.
        assert code_of(lambda call=call: call(session_of(a.session))) == grpc.StatusCode.PERMISSION_DENIED, (
            name
        )
        assert code_of(lambda call=call: call(session_of(forged))) == grpc.StatusCode.UNAUTHENTICATED, name
        assert code_of(lambda call=call: call(())) == grpc.StatusCode.UNAUTHENTICATED, name
        assert state(server) == before, f"a refused {name} changed the server's state"
    # b itself, with its own credential, is still a member in good standing.
    assert stub.Heartbeat(
        service_pb2.HeartbeatRequest(worker_id=b.worker_id), metadata=session_of(b.session)
    ).round
    assert all(online for _, online, _ in before[0])


def test_a_new_join_replaces_the_credential(
    two: tuple[RunningServer, Joined, Joined, Any], tmp_path: Path
) -> None:
    server, a, _, stub = two
    beat = service_pb2.HeartbeatRequest(worker_id=a.worker_id)
    assert stub.Heartbeat(beat, metadata=session_of(a.session), timeout=20).round
    again = stub.Join(service_pb2.JoinRequest(source_id="sw", worker_name="sw"), timeout=20)
    assert again.worker_id == a.worker_id and again.session != a.session
    assert code_of(lambda: stub.Heartbeat(beat, metadata=session_of(a.session), timeout=20)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert stub.Heartbeat(beat, metadata=session_of(again.session), timeout=20).round
    # Leave ends the session too.
    stub.Leave(
        service_pb2.LeaveRequest(worker_id=a.worker_id), metadata=session_of(again.session), timeout=20
    )
    assert code_of(lambda: stub.Heartbeat(beat, metadata=session_of(again.session), timeout=20)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_tokens_file_binds_each_name_to_its_token(tmp_path: Path) -> None:
    alice, bob = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    path = tmp_path / "tokens.txt"
    path.write_text(f"# name token\nalice {alice}\n\nbob {bob}\n")
    with (
        serving(tmp_path, workers=2, tokens_file=path) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = service_pb2_grpc.ParameterServerStub(channel)

        def join(name: str, token: str) -> grpc.StatusCode:
            try:
                stub.Join(
                    service_pb2.JoinRequest(source_id="sw", worker_name=name),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=20,
                )
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        assert join("bob", alice) == grpc.StatusCode.PERMISSION_DENIED  # a valid token, another name
        assert join("carol", alice) == grpc.StatusCode.PERMISSION_DENIED  # a name not in the file
        assert join("alice", "not-a-token") == grpc.StatusCode.UNAUTHENTICATED
        assert [w.name for w in server.app.coordinator.workers()] == []  # nothing was registered
        assert join("alice", alice) == grpc.StatusCode.OK
        assert join("bob", bob) == grpc.StatusCode.OK
        assert sorted(w.name for w in server.app.coordinator.workers()) == ["alice", "bob"]
        # The worker client maps the refusal to its class.
        client = ServerClient(f"127.0.0.1:{server.port}", token=alice, timeout_s=20)
        try:
            with pytest.raises(PermissionDeniedError, match="--tokens"):
                client.join(service_pb2.JoinRequest(source_id="sw", worker_name="bob"))
        finally:
            client.close()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("alice\n", "expected 'name token'"),
        ("alice a b\n", "expected 'name token'"),
        ("alice SECRETONE\nalice SECRETTWO\n", "listed twice"),
        ("alice SECRETONE\nbob SECRETONE\n", "another name's"),
        ("# only a comment\n", "no 'name token' line"),
    ],
)
def test_tokens_file_errors_name_the_line_never_the_token(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=error) as info:
        read_tokens(path)
    assert "SECRET" not in str(info.value)
