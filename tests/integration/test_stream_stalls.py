"""Streams with no deadline as a whole: a stalled pull or push is cancelled, retried and resumed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from dept_comm.channel import bind, build_server
from dept_comm.codecs import get_codec
from dept_comm.frames import ChunkFrame, StreamItem
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_comm.service import add_parameter_server
from dept_comm.stall import StalledStreamError
from dept_comm.streaming import StreamConfig, StreamOpenInfo, StreamReceiver, encode_stream
from dept_worker.client import ServerClient

IDLE_S = 1.0  # well above any pause a loaded CI machine puts between two messages
CHUNK_BYTES = 64 << 10


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"w{i}": torch.randn(1 << 20, generator=g) for i in range(4)}  # 16 MiB: past every buffer


def _stream(upload_id: str) -> list[StreamItem]:
    info = StreamOpenInfo(upload_id=upload_id, sender_id="w0")
    config = StreamConfig(chunk_bytes=CHUNK_BYTES)
    return list(encode_stream(_tensors(), open_info=info, codec=get_codec("fp32"), config=config))


def _hold(context: grpc.ServicerContext) -> bool:
    """Block like a stuck peer until the client cancels; True if it did."""
    deadline = time.monotonic() + 30
    while context.is_active() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not context.is_active()


class StallingServicer(service_pb2_grpc.ParameterServerServicer):
    """First pull and first push get stuck part-way; later ones go through."""

    def __init__(self) -> None:
        self.pulls = 0
        self.pushes: list[int] = []  # chunks read per push call
        self.cancelled = 0
        self.rx = StreamReceiver()
        self.lock = threading.Lock()

    def PullBody(self, request, context):  # noqa: N802
        with self.lock:
            self.pulls += 1
            first = self.pulls == 1
        messages = _stream("pull")
        if first:
            yield from messages[:3]
            self.cancelled += _hold(context)
            return
        yield from messages

    def PushUpdate(self, request_iterator, context):  # noqa: N802
        first = not self.pushes
        self.pushes.append(0)
        for msg in request_iterator:
            self.rx.add(msg)
            if isinstance(msg, ChunkFrame):
                self.pushes[-1] += 1
                if first and self.pushes[-1] == 10:
                    self.cancelled += _hold(context)  # stops reading: flow control stalls the sender
                    return service_pb2.PushReceipt()
        return self.rx.push_receipt()

    def QueryUpload(self, request, context):  # noqa: N802
        return self.rx.push_receipt()


@pytest.fixture
def env() -> Iterator[tuple[StallingServicer, ServerClient]]:
    servicer = StallingServicer()
    server = build_server(4)
    add_parameter_server(servicer, server)
    port = bind(server, "127.0.0.1", 0)
    server.start()
    client = ServerClient(f"127.0.0.1:{port}", stream_idle_s=IDLE_S, retry_attempts=3)
    try:
        yield servicer, client
    finally:
        client.close()
        server.stop(None).wait()


def test_a_stalled_pull_is_cancelled_and_pulled_again(env, caplog) -> None:
    servicer, client = env
    with caplog.at_level(logging.WARNING, logger="dept_comm.channel"):
        messages = client.pull(service_pb2.PullRequest(worker_id="w0"))
    assert len(messages) == len(_stream("pull"))  # the second pull, whole
    assert servicer.pulls >= 2 and servicer.cancelled == 1
    assert any("DEADLINE_EXCEEDED" in r.getMessage() for r in caplog.records)


def test_a_stalled_push_is_cancelled_and_resumed_from_what_the_server_holds(env, caplog) -> None:
    servicer, client = env
    upload = _stream("up-1")[:-1]
    chunks = sum(isinstance(m, ChunkFrame) for m in upload)
    with caplog.at_level(logging.INFO):
        receipt = client.push(upload)
    assert receipt.num_chunks == chunks and not receipt.missing_seqs
    assert servicer.cancelled == 1
    assert servicer.pushes[0] == 10 and sum(servicer.pushes[1:]) == chunks - 10  # only the rest went again
    assert any(r.getMessage().startswith("push_resume") for r in caplog.records)


def test_a_stall_that_never_ends_gives_up_with_a_stall_error() -> None:
    class Stuck(service_pb2_grpc.ParameterServerServicer):
        def PullBody(self, request, context):  # noqa: N802
            _hold(context)
            yield from ()

    server = build_server(2)
    add_parameter_server(Stuck(), server)
    port = bind(server, "127.0.0.1", 0)
    server.start()
    client = ServerClient(f"127.0.0.1:{port}", stream_idle_s=IDLE_S, retry_attempts=2)
    try:
        with pytest.raises(StalledStreamError, match="no message moved"):
            client.pull(service_pb2.PullRequest(worker_id="w0"))
    finally:
        client.close()
        server.stop(None).wait()
