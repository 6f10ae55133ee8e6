"""Streams with no deadline as a whole: a stalled pull or push is cancelled, retried and resumed.

No race against the clock: the guard's idle limit is a minute, far beyond any pause a loaded
machine puts between two messages of a healthy stream, and a stalled peer makes the guard's
clock run a thousand times faster while it holds the stream (``HoldClock``), so the stall is
detected within milliseconds of real time after the last message moved. Holds end on the
call's own cancellation (an event), not after a sleep.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch

from dept_comm.channel import bind, build_server
from dept_comm.codecs import get_codec
from dept_comm.frames import ChunkFrame, StreamItem
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_comm.service import add_parameter_server
from dept_comm.stall import StalledStreamError, StallGuard
from dept_comm.streaming import StreamConfig, StreamOpenInfo, StreamReceiver, encode_stream

IDLE_S = 60.0  # a healthy stream never pauses this long, however loaded the machine
SPEEDUP = 1000.0  # while a peer holds a stream, the guard's minute passes in 60 ms
HOLD_LIMIT_S = 30.0  # a hold nobody cancels ends here (the test then fails on the counts)
CHUNK_BYTES = 64 << 10


class HoldClock:
    """``time.monotonic``, except that time runs ``SPEEDUP`` times faster while a peer holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset = 0.0
        self._held_since: float | None = None

    def __call__(self) -> float:
        now = time.monotonic()
        with self._lock:
            extra = self._offset
            if self._held_since is not None:
                extra += (now - self._held_since) * (SPEEDUP - 1)
            return now + extra

    def hold(self) -> None:
        with self._lock:
            self._held_since = time.monotonic()

    def release(self) -> None:
        with self._lock:
            if self._held_since is not None:
                self._offset += (time.monotonic() - self._held_since) * (SPEEDUP - 1)
                self._held_since = None


class Guard(StallGuard):
    """The real guard on a HoldClock; firing also ends the fast time, so the retry that follows
    runs on real time from its first message, whenever the server notices the cancel."""

    def __init__(self, idle_s: float, *, clock: HoldClock) -> None:
        super().__init__(idle_s, clock=clock, poll_s=0.01)
        self._hold_clock = clock

    def on_stall(self, callback: Callable[[], object]) -> None:
        def fire() -> object:
            self._hold_clock.release()
            return callback()

        super().on_stall(fire)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> HoldClock:
    """The clock of every StallGuard the client makes."""
    clock = HoldClock()
    monkeypatch.setattr("dept_comm.participant.client.StallGuard", functools.partial(Guard, clock=clock))
    return clock


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"w{i}": torch.randn(1 << 20, generator=g) for i in range(4)}  # 16 MiB: past every buffer


def _stream(upload_id: str) -> list[StreamItem]:
    info = StreamOpenInfo(upload_id=upload_id, sender_id="w0")
    config = StreamConfig(chunk_bytes=CHUNK_BYTES)
    return list(encode_stream(_tensors(), open_info=info, codec=get_codec("fp32"), config=config))


def _hold(context: grpc.ServicerContext, clock: HoldClock) -> bool:
    """Block like a stuck peer until the client cancels the call; True if it did."""
    ended = threading.Event()
    context.add_callback(ended.set)  # runs when the call terminates: here, the client's cancel
    clock.hold()
    try:
        return ended.wait(HOLD_LIMIT_S) and not context.is_active()
    finally:
        clock.release()


class StallingServicer(service_pb2_grpc.ParameterServerServicer):
    """First pull and first push get stuck part-way; later ones go through."""

    def __init__(self, clock: HoldClock) -> None:
        self.clock = clock
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
            self.cancelled += _hold(context, self.clock)
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
                    self.cancelled += _hold(
                        context, self.clock
                    )  # stops reading: flow control stalls the sender
                    return service_pb2.PushReceipt()
        return self.rx.push_receipt()

    def QueryUpload(self, request, context):  # noqa: N802
        return self.rx.push_receipt()


@pytest.fixture
def env(clock: HoldClock) -> Iterator[tuple[StallingServicer, ServerClient]]:
    servicer = StallingServicer(clock)
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


def test_a_stall_that_never_ends_gives_up_with_a_stall_error(clock: HoldClock) -> None:
    holds: queue.Queue[bool] = queue.Queue()

    class Stuck(service_pb2_grpc.ParameterServerServicer):
        def PullBody(self, request, context):  # noqa: N802
            holds.put(_hold(context, clock))
            yield from ()

    server = build_server(2)
    add_parameter_server(Stuck(), server)
    port = bind(server, "127.0.0.1", 0)
    server.start()
    client = ServerClient(f"127.0.0.1:{port}", stream_idle_s=IDLE_S, retry_attempts=2)
    try:
        with pytest.raises(StalledStreamError, match="no message moved for 60.0 s"):
            client.pull(service_pb2.PullRequest(worker_id="w0"))
        # Each of the two attempts was held until the guard cancelled it.
        assert [holds.get(timeout=HOLD_LIMIT_S + 10) for _ in range(2)] == [True, True]
    finally:
        client.close()
        server.stop(None).wait()
