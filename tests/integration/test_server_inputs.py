"""Bad input from a worker gets a clear status and never corrupts or crashes the server."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
import torch

from dept_comm.codecs import get_codec
from dept_comm.codecs.zstd_bounded import compress
from dept_comm.frames import as_message, chunk_checksum
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_comm.server.run import RunningServer
from dept_comm.streaming import StreamOpenInfo, encode_stream, receive_stream
from dept_server.config import ServerConfig
from dept_server.serve import start_dept_server

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
def running(tmp_path) -> Iterator[RunningServer]:
    config = ServerConfig(
        port=0, rounds=2, workers=1, variant="spec", model="tiny", codec_up="int8", codec_down="int8",
        token=TOKEN, checkpoint_dir=tmp_path / "ckpt",
    )  # fmt: skip
    server = start_dept_server(config)
    yield server
    server.stop(None)


@pytest.fixture
def stub(running: RunningServer) -> Iterator[service_pb2_grpc.ParameterServerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield service_pb2_grpc.ParameterServerStub(channel)


SESSIONS: dict[str, str] = {}  # worker id -> its session credential (from Join)


def meta(worker_id: str) -> tuple[tuple[str, str], ...]:
    """The token and ``worker_id``'s session credential, as a worker sends them."""
    return (*AUTH, ("dept-session", SESSIONS.get(worker_id, "")))


def join(stub) -> service_pb2.JoinReply:
    reply = stub.Join(service_pb2.JoinRequest(source_id="sw", worker_name="sw"), metadata=AUTH, timeout=10)
    SESSIONS[reply.worker_id] = reply.session
    return reply


def pull(stub, worker_id: str) -> tuple[StreamOpenInfo, dict[str, torch.Tensor]]:
    request = service_pb2.PullRequest(worker_id=worker_id, full=True)
    return receive_stream(stub.PullBody(request, metadata=meta(worker_id), timeout=30))


def upload(worker_id: str, info: StreamOpenInfo, tensors: dict[str, torch.Tensor], **overrides) -> list:
    open_info = StreamOpenInfo(
        upload_id=f"u-{uuid.uuid4().hex}",
        sender_id=worker_id,
        round_idx=overrides.get("round_idx", 0),
        base_version=info.target_version,
        base_digest=overrides.get("base_digest", info.target_digest),
        target_version=0,
        target_digest=b"",
        is_delta=True,
    )
    codec = get_codec(overrides.get("codec", "int8"))
    # As protobuf messages: this client is the generated stub, as any other peer's would be.
    return [as_message(m) for m in encode_stream(tensors, open_info=open_info, codec=codec)]


def push(stub, messages) -> service_pb2.PushReceipt:
    # As the worker that joined (a stream may lack its open message: that is what some tests send).
    sender = messages[0].open.sender_id if messages and messages[0].HasField("open") else next(iter(SESSIONS))
    return stub.PushUpdate(iter(messages), metadata=meta(sender), timeout=30)


def commit(stub, worker_id: str, messages, round_idx: int = 0) -> service_pb2.CommitReply:
    request = service_pb2.CommitUpdateRequest(
        commit=messages[-1].commit, worker_id=worker_id, round_idx=round_idx
    )
    return stub.CommitUpdate(request, metadata=meta(worker_id), timeout=30)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_bad_inputs_are_refused_and_a_good_round_still_closes(running: RunningServer, stub) -> None:
    # Unauthenticated: refused before any handler runs, for unary and streaming methods.
    assert code_of(lambda: stub.Join(service_pb2.JoinRequest(source_id="sw"), timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert code_of(lambda: stub.PushUpdate(iter([]), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer nope"),)
    assert code_of(
        lambda: stub.Join(service_pb2.JoinRequest(source_id="sw"), metadata=wrong, timeout=10)
    ) == (grpc.StatusCode.UNAUTHENTICATED)

    worker_id = join(stub).worker_id
    info, body = pull(stub, worker_id)
    assert info.target_digest == running.app.model.digest
    zeros = {k: torch.zeros_like(v) for k, v in body.items()}

    # Unknown worker, stream without an open message, future round, stale base.
    assert code_of(lambda: pull(stub, "w-nobody")) == grpc.StatusCode.UNAUTHENTICATED  # it has no session
    SESSIONS["w-nobody"] = SESSIONS[worker_id]  # sw's session cannot act for anyone else
    assert code_of(lambda: pull(stub, "w-nobody")) == grpc.StatusCode.PERMISSION_DENIED
    msgs = upload(worker_id, info, zeros)
    assert code_of(lambda: push(stub, msgs[1:-1])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: push(stub, upload(worker_id, info, zeros, round_idx=5)[:-1])) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert code_of(lambda: push(stub, upload(worker_id, info, zeros, base_digest=b"x" * 16)[:-1])) == (
        grpc.StatusCode.ABORTED
    )

    # A flipped bit in a chunk: DATA_LOSS.
    bad = upload(worker_id, info, zeros)
    bad[1].chunk.data = bytes([bad[1].chunk.data[0] ^ 1]) + bad[1].chunk.data[1:]
    assert code_of(lambda: push(stub, bad[:-1])) == grpc.StatusCode.DATA_LOSS

    # Wrong shape against the manifest.
    first = next(iter(zeros))
    misshaped = dict(zeros)
    misshaped[first] = torch.zeros(3, 3)
    assert (
        code_of(lambda: push(stub, upload(worker_id, info, misshaped)[:-1]))
        == grpc.StatusCode.INVALID_ARGUMENT
    )

    # NaN in the update: the stream stages, the commit is refused.
    poisoned = dict(zeros)
    poisoned[first] = torch.full_like(zeros[first], float("nan"))
    msgs = upload(worker_id, info, poisoned, codec="fp32")
    push(stub, msgs[:-1])
    assert code_of(lambda: commit(stub, worker_id, msgs)) == grpc.StatusCode.INVALID_ARGUMENT

    # A decompression bomb in place of an int8 payload: a 1 MiB frame of zeros for a small tensor.
    bomb = upload(worker_id, info, zeros)
    chunk = bomb[1].chunk
    chunk.data = b"\x01" + compress(b"\x00" * (64 << 20), 3)
    chunk.header.encoded_bytes = len(chunk.data)
    chunk.checksum = chunk_checksum(chunk.data)
    assert code_of(lambda: push(stub, bomb[:-1])) == grpc.StatusCode.INVALID_ARGUMENT

    # Bytes that are no StreamMessage at all, and a chunk cut short: refused by name, not a crash.
    cut = [m.SerializeToString() for m in upload(worker_id, info, zeros)[:-1]]
    cut[1] = cut[1][: len(cut[1]) // 2]
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        raw_push = channel.stream_unary("/dept.v1.ParameterServer/PushUpdate")  # bytes as they are
        for wires in ([b"\xff\xff\xff"], cut):
            assert code_of(lambda: raw_push(iter(wires), metadata=meta(worker_id), timeout=30)) == (  # noqa: B023
                grpc.StatusCode.INVALID_ARGUMENT
            )

    # A message over the receive limit (gRPC's own check).
    huge = upload(worker_id, info, zeros)
    huge[1].chunk.data = b"\x00" * (3 << 20)
    assert code_of(lambda: push(stub, huge[:-1])) == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Every refused push's read-ahead helper (dept_comm.readahead) ended with its call.
    deadline = time.monotonic() + 10
    while any(t.name == "push-read-ahead" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "push-read-ahead"]

    # A commit for an upload nobody sent.
    ghost = upload(worker_id, info, zeros)
    assert code_of(lambda: commit(stub, worker_id, ghost)) == grpc.StatusCode.NOT_FOUND

    # The model is untouched, and a good update still closes the round.
    assert running.app.model.version == 0 and running.app.model.digest == info.target_digest
    delta = {k: torch.full_like(v, 0.01) for k, v in body.items()}
    good = upload(worker_id, info, delta)
    receipt = push(stub, good[:-1])
    assert receipt.num_chunks == len(good) - 2 and not receipt.missing_seqs
    assert commit(stub, worker_id, good).accepted
    assert commit(stub, worker_id, good).accepted  # a retried commit: same answer, counted once
    assert running.app.model.version == 1
    new_info, new_body = pull(stub, worker_id)
    assert new_info.target_version == 1
    moved = [float((new_body[k] - body[k]).mean()) for k in body]
    assert all(abs(m - 0.01) < 1e-3 for m in moved), "FedAvg of one worker applies its (int8) update"
    health = stub.Heartbeat(
        service_pb2.HeartbeatRequest(worker_id=worker_id), metadata=meta(worker_id), timeout=10
    )
    assert health.round.round_idx == 1 and health.round.version == 1
