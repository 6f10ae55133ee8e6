"""Tensor streams through a real loopback gRPC server: push, pull, metering, cuts, status mapping.

Byte accounting is checked on dept-server's own servicer (dept_comm/server/servicer.py over ServerApp, started
on port 0); the stream library's behaviour (interop, cuts, errors, retries) on a small servicer here.
"""

from __future__ import annotations

import socket
import threading

import grpc
import pytest
import torch

from dept_comm.accounting import ByteMeter, metered, read_jsonl
from dept_comm.channel import (
    BindError,
    abort_with,
    bind,
    build_server,
    call_with_retry,
    channel_options,
    chunk_timeout_s,
    error_from_rpc,
    server_options,
    status_for,
)
from dept_comm.codecs import get_codec
from dept_comm.digest import Group, manifest_of, tensors_digest
from dept_comm.errors import (
    ChecksumError,
    CommitMismatchError,
    DeptError,
    ManifestMismatchError,
    MembershipFullError,
    OverloadedError,
    StaleRoundError,
)
from dept_comm.frames import ChunkFrame, as_message
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.service import ParameterServerStub, add_parameter_server
from dept_comm.streaming import (
    PULL_LIMITS,
    StreamConfig,
    StreamOpenInfo,
    StreamReceiver,
    encode_stream,
    receive_stream,
)
from tests.integration.servers import Joined, serving, worker_upload

TIMEOUT_S = 30


def _body():
    g = torch.Generator().manual_seed(7)
    return {
        "blocks.0.w": torch.randn(700, 900, generator=g),  # 2.5 MB: several chunks
        "blocks.0.b": torch.randn(900, generator=g),
        "emb": torch.randn(300, 64, generator=g),
        "step": torch.tensor([12], dtype=torch.int64),
    }


GROUPS = {"blocks.0.w": Group.BODY, "blocks.0.b": Group.BODY, "emb": Group.EMBEDDINGS, "step": Group.OTHER}


def _codec(name, x):
    return get_codec("fp32" if x.is_floating_point() else "raw")


class Servicer(service_pb2_grpc.ParameterServerServicer):
    """Test adapter for the stream library: stage uploads, keep committed ones, stream the body;
    records what it saw. Metering is tested on the real servicer instead
    (test_the_real_servers_meters_match_what_crossed_the_wire)."""

    def __init__(self, body):
        self.body = body
        self.manifest = manifest_of(body, GROUPS)
        self.committed = {}  # upload_id -> tensors
        self.outcomes = {}  # upload_id -> "committed" | error class name
        self.chunks_seen = threading.Semaphore(0)
        self.finished = threading.Event()
        self.calls = 0

    def PushUpdate(self, request_iterator, context):
        rx = StreamReceiver(manifest=self.manifest)
        upload_id = "?"
        try:
            try:
                for msg in request_iterator:
                    rx.add(msg)
                    if rx.open_info is not None:
                        upload_id = rx.open_info.upload_id
                    if isinstance(msg, ChunkFrame):
                        self.chunks_seen.release()
                if not rx.committed:
                    raise CommitMismatchError(f"upload {upload_id} ended without a commit")
                self.committed[upload_id] = rx.decode_all()
                self.outcomes[upload_id] = "committed"
                return rx.push_receipt()
            except DeptError as err:
                self.outcomes[upload_id] = type(err).__name__
                abort_with(context, err)
        except grpc.RpcError:  # the client went away mid-stream
            self.outcomes[upload_id] = "cut"
            raise
        finally:
            self.finished.set()

    def PullBody(self, request, context):
        if request.round_idx == 99:
            abort_with(context, StaleRoundError("round 99 is closed; current round is 3"))
        info = StreamOpenInfo(upload_id=f"pull-{request.worker_id}", sender_id="server", target_version=4)
        yield from encode_stream(self.body, open_info=info, codec=_codec, groups=GROUPS)

    def Heartbeat(self, request, context):
        if request.worker_id.startswith("busy-"):  # overloaded this many more times, with a hint
            busy = self.__dict__.setdefault("busy", {})
            left = busy[request.worker_id] = busy.get(request.worker_id, int(request.worker_id[5:])) - 1
            if left >= 0:
                abort_with(context, OverloadedError("busy", retry_after_s=0.2))
            return service_pb2.HeartbeatReply()
        if request.worker_id == "full":
            abort_with(context, MembershipFullError("no room"))
        self.calls += 1
        if self.calls <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        if request.worker_id == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad worker")
        return service_pb2.HeartbeatReply()


@pytest.fixture
def env():
    servicer = Servicer(_body())
    server = build_server(4)
    add_parameter_server(servicer, server)
    port = bind(server, "127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
    try:
        yield servicer, ParameterServerStub(channel), port
    finally:
        channel.close()
        server.stop(None).wait()


def _upload(upload_id, tensors, chunk_bytes=1 << 20):
    info = StreamOpenInfo(upload_id=upload_id, sender_id="w0", round_idx=1, is_delta=True)
    return encode_stream(
        tensors, open_info=info, codec=_codec, groups=GROUPS, config=StreamConfig(chunk_bytes=chunk_bytes)
    )


@pytest.mark.parametrize("chunk_bytes", [4 << 10, 64 << 10, 1 << 20])
def test_the_real_servers_meters_match_what_crossed_the_wire(tmp_path, chunk_bytes):
    """dept-server's own servicer and app (in-process, port 0) count every byte a worker sends and
    receives, per group, exactly as the worker's side counts them; its metrics line says the same."""
    with serving(tmp_path, workers=1, metrics_path=tmp_path / "metrics.jsonl") as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=TIMEOUT_S)
        client_up, client_down = ByteMeter(), ByteMeter()
        try:
            reply = client.join(service_pb2.JoinRequest(source_id="sw", worker_name="sw"))
            pulled = list(
                metered(
                    client.pull(service_pb2.PullRequest(worker_id=reply.worker_id, full=True)), client_down
                )
            )
            info, body = receive_stream(pulled, limits=PULL_LIMITS)
            joined = Joined(reply.worker_id, reply, info, body)
            upload = worker_upload(joined, seed=5, chunk_bytes=chunk_bytes)
            for msg in upload.messages[:-1]:
                client_up.observe(msg)
            receipt = client.push(upload.messages[:-1])
            assert not receipt.missing_seqs
            commit = upload.commit_request(reply.worker_id, round_idx=0)
            client_up.observe(commit)
            assert client.commit(commit).accepted  # one expected worker: the round closes
        finally:
            client.close()
        (record,) = server.app.records
    (written,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert written == record
    (worker,) = record.workers
    assert worker.up_by_group == client_up.by_group()
    assert worker.down_by_group == client_down.by_group()
    assert set(client_up.by_group()) == {"body", "control"}  # spec: no embeddings cross
    numel = sum(t.numel() for t in body.values())
    assert worker.down_raw_bytes == worker.up_raw_bytes == 4 * numel == record.uncompressed_body_bytes
    assert worker.up_payload_bytes == client_up.total().payload_bytes == record.up_payload_bytes
    assert worker.down_payload_bytes == client_down.total().payload_bytes == record.down_payload_bytes
    # int8 up: within the codec's own bound plus per-message framing (an fp32 fallback would be
    # four times the size); the full pull goes down in fp32.
    int8_bound = sum(get_codec("int8").max_encoded_bytes(t.numel()) for t in body.values())
    assert worker.up_payload_bytes <= int8_bound + 128 * worker.up_messages < 2 * numel
    assert 4 * numel < worker.down_payload_bytes <= 4 * numel + 128 * worker.down_messages


def test_generated_protobuf_client_on_a_default_channel_interoperates(env):
    """A peer that uses the generated code (protobuf messages, grpc's default 4 MiB limit) reads
    the frames the server writes and writes what the server reads as frames."""
    servicer, _, port = env
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.ParameterServerStub(channel)
        messages = [as_message(m) for m in _upload("u-default", servicer.body, 2 << 20)]
        stub.PushUpdate(iter(messages), timeout=TIMEOUT_S)
        pulled_messages = list(stub.PullBody(service_pb2.PullRequest(worker_id="d"), timeout=TIMEOUT_S))
    assert servicer.outcomes["u-default"] == "committed"
    assert tensors_digest(servicer.committed["u-default"]) == tensors_digest(servicer.body)
    assert not any(isinstance(m, ChunkFrame) for m in pulled_messages)
    _, pulled = receive_stream(pulled_messages)
    assert tensors_digest(pulled) == tensors_digest(servicer.body)


def test_cancelled_push_never_yields_tensors(env):
    servicer, stub, _ = env
    release = threading.Event()

    def cut_stream():
        msgs = _upload("u-cut", servicer.body, 64 << 10)
        for i, msg in enumerate(msgs):
            if i == 6:
                release.wait(TIMEOUT_S)  # hold the stream open mid-way until cancelled
                return
            yield msg

    future = stub.PushUpdate.future(cut_stream(), timeout=TIMEOUT_S)
    for _ in range(3):
        assert servicer.chunks_seen.acquire(timeout=TIMEOUT_S)
    future.cancel()
    release.set()
    assert servicer.finished.wait(TIMEOUT_S)
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert "u-cut" not in servicer.committed
    assert servicer.outcomes["u-cut"] in ("cut", "CommitMismatchError")


def test_stream_ending_without_commit_is_refused(env):
    servicer, stub, _ = env
    msgs = list(_upload("u-short", servicer.body))[:-1]
    with pytest.raises(grpc.RpcError) as info:
        stub.PushUpdate(iter(msgs), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(error_from_rpc(info.value), CommitMismatchError)
    assert "u-short" not in servicer.committed


def test_server_errors_map_back_to_their_classes(env):
    servicer, stub, _ = env
    msgs = [as_message(m) for m in _upload("u-bad", servicer.body)]
    data = bytearray(msgs[2].chunk.data)
    data[5] ^= 0x80
    msgs[2].chunk.data = bytes(data)
    with pytest.raises(grpc.RpcError) as info:
        stub.PushUpdate(iter(msgs), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert isinstance(error_from_rpc(info.value), ChecksumError)

    wrong = {**servicer.body, "emb": torch.zeros(301, 64)}
    with pytest.raises(grpc.RpcError) as info:
        stub.PushUpdate(_upload("u-shape", wrong), timeout=TIMEOUT_S)
    err = error_from_rpc(info.value)
    assert isinstance(err, ManifestMismatchError) and "emb" in str(err)

    with pytest.raises(grpc.RpcError) as info:
        list(stub.PullBody(service_pb2.PullRequest(round_idx=99), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.ABORTED
    err = error_from_rpc(info.value)
    assert type(err) is StaleRoundError and str(err) == "round 99 is closed; current round is 3"
    assert not servicer.committed


def test_call_with_retry_retries_only_transient_codes(env):
    _, stub, _ = env
    delays = []
    reply = call_with_retry(
        lambda: stub.Heartbeat(service_pb2.HeartbeatRequest(worker_id="ok"), timeout=TIMEOUT_S),
        base_delay_s=0.5,
        max_delay_s=0.75,
        sleep=delays.append,
    )
    assert isinstance(reply, service_pb2.HeartbeatReply)
    assert len(delays) == 2 and 0 <= delays[0] <= 0.5 and 0 <= delays[1] <= 0.75
    delays.clear()
    with pytest.raises(grpc.RpcError) as info:
        call_with_retry(
            lambda: stub.Heartbeat(service_pb2.HeartbeatRequest(worker_id="bad"), timeout=TIMEOUT_S),
            sleep=delays.append,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and delays == []
    assert error_from_rpc(info.value) is not None  # an app-only code maps to its base class


def test_overload_refusals_are_retried_after_the_servers_hint(env):
    _, stub, _ = env
    delays = []
    reply = call_with_retry(
        lambda: stub.Heartbeat(service_pb2.HeartbeatRequest(worker_id="busy-3"), timeout=TIMEOUT_S),
        attempts=1,  # overloads have their own budget: not spent from the transient-failure one
        sleep=delays.append,
    )
    assert isinstance(reply, service_pb2.HeartbeatReply)
    assert len(delays) == 3 and all(0.2 <= d <= 0.4 for d in delays), delays  # hint, jittered up to 2x
    # RESOURCE_EXHAUSTED without a hint (a full membership) is final, and maps to its class.
    delays.clear()
    with pytest.raises(grpc.RpcError) as info:
        call_with_retry(
            lambda: stub.Heartbeat(service_pb2.HeartbeatRequest(worker_id="full"), timeout=TIMEOUT_S),
            sleep=delays.append,
        )
    assert delays == [] and type(error_from_rpc(info.value)) is MembershipFullError
    # An exhausted overload budget gives the refusal back, with the hint on the mapped error.
    with pytest.raises(grpc.RpcError) as info:
        call_with_retry(
            lambda: stub.Heartbeat(service_pb2.HeartbeatRequest(worker_id="busy-99"), timeout=TIMEOUT_S),
            overload_attempts=2,
            sleep=delays.append,
        )
    err = error_from_rpc(info.value)
    assert isinstance(err, OverloadedError) and err.retry_after_s == pytest.approx(0.2)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_call_with_retry_gives_up_after_attempts():
    calls = []
    with grpc.insecure_channel(f"127.0.0.1:{_closed_port()}") as channel:  # nothing listens there
        stub = service_pb2_grpc.ParameterServerStub(channel)

        def call():
            calls.append(1)
            return stub.Heartbeat(service_pb2.HeartbeatRequest(), timeout=2)

        with pytest.raises(grpc.RpcError) as info:
            call_with_retry(call, attempts=3, sleep=lambda s: None)
    assert len(calls) == 3
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert error_from_rpc(info.value) is None


def test_second_server_on_a_taken_port_fails_loudly(env):
    _, _, port = env
    other = build_server(1)
    with pytest.raises(BindError, match=str(port)):
        bind(other, "127.0.0.1", port)
    other.stop(None)


def test_option_and_status_helpers():
    opts = dict(server_options())
    assert opts["grpc.so_reuseport"] == 0
    assert (2 << 20) < opts["grpc.max_receive_message_length"] < (4 << 20)
    client = dict(channel_options())
    assert opts["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert status_for(ChecksumError("x")) == grpc.StatusCode.DATA_LOSS
    assert status_for(ManifestMismatchError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert chunk_timeout_s(0) == 5.0 and chunk_timeout_s(10**12) == 300.0
    assert chunk_timeout_s(10 << 20, min_bandwidth_bps=1e6) == pytest.approx(3 * (10 << 20) / 1e6)
    with pytest.raises(ValueError):
        build_server(4, maximum_concurrent_rpcs=8)


def test_pb_message_is_unchanged_by_metering():
    msg = pb.StreamMessage(open=pb.StreamOpen(upload_id="x"))
    meter = ByteMeter()
    assert list(metered([msg], meter)) == [msg]
    assert meter.total().payload_bytes == msg.ByteSize()
