"""Wire throughput on loopback: gRPC push and pull of float32 tensors against a plain TCP socket."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from multiprocessing.connection import Connection
from typing import Any

import grpc
import torch

from dept_comm.channel import bind, build_server, channel_options
from dept_comm.codecs import get_codec
from dept_comm.errors import CommitMismatchError
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_comm.pb import tensor_pb2 as pb
from dept_comm.streaming import StreamConfig, StreamOpenInfo, StreamReceiver, encode_stream, receive_stream

logger = logging.getLogger(__name__)

_TENSOR_BYTES = 4 << 20  # a model body is many tensors of a few MiB each
_REPEATS = 3
# Untimed first pass: fresh pages cost ~1.5 ms/MiB in this sandbox; later passes reuse freed memory,
# as a long-running server and worker do.
_WARMUP = 1


def _tensors(size_bytes: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n = max(1, size_bytes // _TENSOR_BYTES)
    return {f"layer{i:03d}.weight": torch.randn(_TENSOR_BYTES // 4, generator=gen) for i in range(n)}


class _Servicer(service_pb2_grpc.ParameterServerServicer):
    """Push: stage and verify the commit. Pull: stream the body."""

    def __init__(self, body: Mapping[str, torch.Tensor], config: StreamConfig) -> None:
        self._body = body
        self._config = config

    def PushUpdate(  # noqa: N802
        self, request_iterator: Iterator[pb.StreamMessage], context: grpc.ServicerContext
    ) -> service_pb2.PushReceipt:
        rx = StreamReceiver()
        for msg in request_iterator:
            rx.add(msg)
        if not rx.committed:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream ended without a commit")
        return rx.push_receipt()

    def PullBody(  # noqa: N802
        self, request: service_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StreamMessage]:
        info = StreamOpenInfo(upload_id=f"pull-{request.round_idx}", sender_id="server")
        yield from encode_stream(self._body, open_info=info, codec=get_codec("fp32"), config=self._config)


def _tcp_sink(listener: socket.socket, size: int) -> None:
    sink = bytearray(size)  # preallocated: the socket path pays no allocation
    view = memoryview(sink)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # listener closed
        with conn:
            got = 0
            while got < size:
                n = conn.recv_into(view[got:])
                if n == 0:
                    break
                got += n
            if got == size:
                conn.sendall(b"k")


def _serve(control: Connection, size_bytes: int, chunk_bytes: int) -> None:
    """Child process: a gRPC server and a TCP sink on loopback, until told to stop."""
    torch.set_num_threads(1)
    config = StreamConfig(chunk_bytes=chunk_bytes)
    server = build_server(4)
    service_pb2_grpc.add_ParameterServerServicer_to_server(_Servicer(_tensors(size_bytes), config), server)
    grpc_port = bind(server, "127.0.0.1", 0)
    server.start()
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_tcp_sink, args=(listener, size_bytes), name="tcp-sink", daemon=True).start()
    control.send((grpc_port, listener.getsockname()[1]))
    control.recv()  # any message, or EOF when the parent dies, means stop
    listener.close()
    server.stop(None).wait()


def _grpc(
    port: int, tensors: Mapping[str, torch.Tensor], config: StreamConfig
) -> tuple[list[float], list[float]]:
    push_s: list[float] = []
    pull_s: list[float] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
        stub = service_pb2_grpc.ParameterServerStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        codec = get_codec("fp32")
        for i in range(_WARMUP + _REPEATS):
            info = StreamOpenInfo(upload_id=f"bench-{i}", sender_id="bench")
            t0 = time.perf_counter()
            receipt = stub.PushUpdate(
                encode_stream(tensors, open_info=info, codec=codec, config=config), timeout=300
            )
            push_s.append(time.perf_counter() - t0)
            if not receipt.digest:
                raise CommitMismatchError("push was not committed")
            t0 = time.perf_counter()
            _, pulled = receive_stream(stub.PullBody(service_pb2.PullRequest(round_idx=i), timeout=300))
            pull_s.append(time.perf_counter() - t0)
            if len(pulled) != len(tensors):
                raise CommitMismatchError(f"pulled {len(pulled)} tensors, sent {len(tensors)}")
            del pulled
    return push_s[_WARMUP:], pull_s[_WARMUP:]


def _tcp(port: int, payload: memoryview) -> list[float]:
    out: list[float] = []
    for _ in range(_WARMUP + _REPEATS):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(payload)
            if conn.recv(1) != b"k":
                raise ConnectionError("tcp sink did not acknowledge")
        out.append(time.perf_counter() - t0)
    return out[_WARMUP:]


def run(quick: bool = False) -> dict[str, Any]:
    """Push and pull 256 MiB (quick: 32 MiB) of float32 over loopback gRPC and TCP; best of 3 each.

    The server (gRPC servicer and TCP sink) runs in a child process, the client here, so the two
    sides do not share one GIL. gRPC push ends when the server has verified the commit; pull ends
    when ``receive_stream`` has decoded every tensor. TCP sends the same bytes with ``sendall``
    into a preallocated buffer. Setting ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` before start
    may speed up both gRPC sides (fewer page faults); it is reported, not required.
    """
    size = (32 if quick else 256) << 20
    config = StreamConfig()
    tensors = _tensors(size)
    size = sum(t.numel() * 4 for t in tensors.values())
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_serve, args=(child, size, config.chunk_bytes), daemon=True)
    proc.start()
    try:
        if not parent.poll(120):
            raise TimeoutError("benchmark server did not start within 120 s")
        grpc_port, tcp_port = parent.recv()
        tcp_s = _tcp(tcp_port, flat.view(torch.uint8).numpy().data)
        push_s, pull_s = _grpc(grpc_port, tensors, config)
    finally:
        parent.send("stop")
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    mbps = {k: size / min(v) / 1e6 for k, v in (("push", push_s), ("pull", pull_s), ("tcp", tcp_s))}
    logger.info("wire push_s=%s pull_s=%s tcp_s=%s", push_s, pull_s, tcp_s)
    return {
        "size_bytes": size,
        "chunk_bytes": config.chunk_bytes,
        "num_tensors": len(tensors),
        "grpc_push_MBps": round(mbps["push"], 1),
        "grpc_pull_MBps": round(mbps["pull"], 1),
        "tcp_MBps": round(mbps["tcp"], 1),
        "push_vs_tcp": round(mbps["push"] / mbps["tcp"], 3),
        "pull_vs_tcp": round(mbps["pull"] / mbps["tcp"], 3),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
