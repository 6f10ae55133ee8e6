"""The userspace link emulator's behaviour: bytes arrive intact, a reset cuts after exactly N bytes,
a blackhole stalls a real gRPC pull until the client's stall guard cancels it.

Rate and delay accuracy are timings and live in ``dept-bench link``; here only behaviour. Every
socket is on 127.0.0.1, every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch

from dept_bench.linkemu import LinkEmulator, LinkSpec
from dept_bench.wire import _handler
from dept_comm.channel import bind, build_server, channel_options
from dept_comm.pb import service_pb2
from dept_comm.service import ParameterServerStub
from dept_comm.stall import StalledStreamError, StallGuard
from dept_comm.streaming import PULL_LIMITS, StreamConfig, receive_stream

WAIT_S = 30.0


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        listener.settimeout(WAIT_S)
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
        except OSError:
            pass


def _round_trip(port: int, data: bytes) -> bytes:
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:

        def read() -> None:
            try:
                while len(got) < len(data):
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        return
                    got.extend(chunk)
            except OSError:
                return  # cut

        reader = threading.Thread(target=read)
        reader.start()
        s.sendall(data)
        reader.join(WAIT_S)
    return bytes(got)


def test_bytes_arrive_intact_both_ways_over_several_connections() -> None:
    listener, _ = _echo_server()
    spec = LinkSpec(rate_bps=400e6, delay_s=0.002, jitter_s=0.002, seed=1)  # jitter must not reorder
    with LinkEmulator(listener.getsockname(), spec) as emu:
        payloads = [os.urandom(n) for n in (1, 70_000, 3 << 20)]
        results: list[bytes] = [b""] * len(payloads)

        def one(i: int) -> None:
            results[i] = _round_trip(emu.port, payloads[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert results == payloads
        assert emu.bytes == {"up": sum(map(len, payloads)), "down": sum(map(len, payloads))}
    listener.close()


def test_reset_after_n_bytes_cuts_exactly_there_once() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    received = bytearray()
    closed = threading.Event()

    def sink() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    received.extend(data)
            except OSError:
                pass
        closed.set()

    threading.Thread(target=sink, daemon=True).start()
    limit = 100_000
    with LinkEmulator(listener.getsockname(), LinkSpec(reset_after_bytes=limit)) as emu:
        data = os.urandom(1 << 20)
        with (
            socket.create_connection(("127.0.0.1", emu.port), timeout=WAIT_S) as s,
            pytest.raises(OSError),  # ECONNRESET or EPIPE once the relay cut it
        ):
            s.sendall(data)
            s.recv(1)  # a cut connection answers with a reset (or EOF, b"")
            raise ConnectionResetError("EOF")
        assert closed.wait(WAIT_S)
        assert bytes(received) == data[:limit]
        assert emu.resets == 1
        # disarmed after one cut: the next connection goes through whole
        echo, _ = _echo_server()
        with LinkEmulator(echo.getsockname(), LinkSpec(reset_after_bytes=10)) as again:
            with pytest.raises(OSError):
                _round_trip_or_raise(again.port, b"x" * 100)
            assert _round_trip(again.port, b"y" * 100) == b"y" * 100
        echo.close()
    listener.close()


def _round_trip_or_raise(port: int, data: bytes) -> None:
    if _round_trip(port, data) != data:
        raise ConnectionResetError("cut short")


@pytest.fixture
def pull_server() -> Iterator[int]:
    body = {f"t{i}": torch.randn(64 << 10) for i in range(8)}  # 2 MiB in 256 KiB tensors
    server = build_server(2)
    server.add_generic_rpc_handlers((_handler(body, StreamConfig(chunk_bytes=64 << 10)),))
    port = bind(server, "127.0.0.1", 0)
    server.start()
    yield port
    server.stop(None).wait()


def _guarded_pull(
    stub: ParameterServerStub, guard: StallGuard, after_first: threading.Event | None = None
) -> int:
    with guard:
        call = stub.PullBody(service_pb2.PullRequest(), timeout=WAIT_S)
        guard.on_stall(call.cancel)

        def messages() -> Iterator[object]:
            for i, m in enumerate(guard.guarded(call)):
                if i == 0 and after_first is not None:
                    after_first.set()
                yield m

        _, tensors = receive_stream(messages(), limits=PULL_LIMITS)  # type: ignore[arg-type]
    return len(tensors)


def test_blackhole_stalls_a_pull_and_the_stall_guard_fires(pull_server: int) -> None:
    spec = LinkSpec(rate_bps=50e6)  # 2 MiB take ~0.35 s: the blackhole lands mid-stream
    with (
        LinkEmulator(("127.0.0.1", pull_server), spec) as emu,
        grpc.insecure_channel(emu.address, options=channel_options()) as channel,
    ):
        stub = ParameterServerStub(channel)
        assert _guarded_pull(stub, StallGuard(idle_s=WAIT_S)) == 8  # the link itself works
        first = threading.Event()
        threading.Thread(target=lambda: first.wait(WAIT_S) and emu.blackhole(), daemon=True).start()
        guard = StallGuard(idle_s=1.0, poll_s=0.05)
        with pytest.raises(StalledStreamError):
            _guarded_pull(stub, guard, after_first=first)
        assert guard.fired
        emu.blackhole(False)
