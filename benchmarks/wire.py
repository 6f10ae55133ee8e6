"""Wire throughput on loopback: gRPC push and pull of float32 tensors against a plain TCP socket."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from multiprocessing.connection import Connection
from typing import Any

import grpc
import torch

from dept_comm.channel import bind, build_server, channel_options
from dept_comm.codecs import get_codec
from dept_comm.digest import tensors_digest
from dept_comm.errors import CommitMismatchError, DeptError
from dept_comm.frames import StreamItem, WireItem, read_wire, to_wire
from dept_comm.memory import keep_freed_memory
from dept_comm.pb import service_pb2
from dept_comm.service import ParameterServerStub
from dept_comm.streaming import (
    PULL_LIMITS,
    StreamConfig,
    StreamOpenInfo,
    StreamReceiver,
    encode_stream,
    receive_stream,
)

logger = logging.getLogger(__name__)

_TENSOR_BYTES = 4 << 20  # a model body is many tensors of a few MiB each
_REPEATS = 11
_RAW_SERVICE = "dept.bench.Raw"
# Untimed first pass: fresh pages cost ~1.5 ms/MiB in this sandbox; later passes reuse freed memory,
# as a long-running server and worker do.
_WARMUP = 1


def _tensors(size_bytes: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n = max(1, size_bytes // _TENSOR_BYTES)
    return {f"layer{i:03d}.weight": torch.randn(_TENSOR_BYTES // 4, generator=gen) for i in range(n)}


def _handler(body: Mapping[str, torch.Tensor], config: StreamConfig) -> grpc.GenericRpcHandler[Any, Any]:
    """PushUpdate stages and verifies the commit; PullBody streams ``body``."""

    def push(requests: Iterator[WireItem], context: grpc.ServicerContext) -> service_pb2.PushReceipt:
        rx = StreamReceiver()
        for msg in requests:
            rx.add(msg)
        if not rx.committed:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream ended without a commit")
        return rx.push_receipt()

    def pull(request: service_pb2.PullRequest, context: grpc.ServicerContext) -> Iterator[StreamItem]:
        info = StreamOpenInfo(upload_id=f"pull-{request.round_idx}", sender_id="server")
        yield from encode_stream(body, open_info=info, codec=get_codec("fp32"), config=config)

    return grpc.method_handlers_generic_handler(
        "dept.v1.ParameterServer",
        {
            "PushUpdate": grpc.stream_unary_rpc_method_handler(
                push,
                request_deserializer=read_wire,
                response_serializer=service_pb2.PushReceipt.SerializeToString,
            ),
            "PullBody": grpc.unary_stream_rpc_method_handler(
                pull,
                request_deserializer=service_pb2.PullRequest.FromString,
                response_serializer=to_wire,
            ),
        },
    )


def _raw_pieces(body: Mapping[str, torch.Tensor], chunk_bytes: int) -> list[bytes]:
    flat = torch.cat([t.reshape(-1) for t in body.values()]).view(torch.uint8).numpy().data
    return [bytes(flat[i : i + chunk_bytes]) for i in range(0, len(flat), chunk_bytes)]


def _raw_handler(pieces: list[bytes]) -> grpc.GenericRpcHandler[Any, Any]:
    """gRPC's own floor: the same bytes as prebuilt messages, no protobuf, no checks."""

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return sum(len(r) for r in requests).to_bytes(8, "little")

    def pull(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from pieces

    return grpc.method_handlers_generic_handler(
        _RAW_SERVICE,
        {
            "Push": grpc.stream_unary_rpc_method_handler(push),
            "Pull": grpc.unary_stream_rpc_method_handler(pull),
        },
    )


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


def _serve(control: Connection, size_bytes: int, chunk_bytes: int, tuned: bool) -> None:
    """Server process: a gRPC server and a TCP sink on loopback, until told to stop."""
    if tuned:
        keep_freed_memory(max_arenas=0)  # what dept-server and dept-worker do at start
    torch.set_num_threads(1)
    config = StreamConfig(chunk_bytes=chunk_bytes)
    body = _tensors(size_bytes)
    server = build_server(4)
    server.add_generic_rpc_handlers((_handler(body, config), _raw_handler(_raw_pieces(body, chunk_bytes))))
    grpc_port = bind(server, "127.0.0.1", 0)
    server.start()
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_tcp_sink, args=(listener, size_bytes), name="tcp-sink", daemon=True).start()
    control.send((grpc_port, listener.getsockname()[1]))
    try:
        while control.recv() == "cpu":
            control.send(time.process_time())
    except EOFError:
        pass  # the parent died; stop
    listener.close()
    server.stop(None).wait()


def _push(stub: ParameterServerStub, tensors: Mapping[str, torch.Tensor], config: StreamConfig) -> float:
    info = StreamOpenInfo(upload_id=f"bench-{time.monotonic_ns()}", sender_id="bench")
    t0 = time.perf_counter()
    receipt = stub.PushUpdate(
        encode_stream(tensors, open_info=info, codec=get_codec("fp32"), config=config), timeout=300
    )
    elapsed = time.perf_counter() - t0
    if not receipt.digest:
        raise CommitMismatchError("push was not committed")
    return elapsed


def _pull(stub: ParameterServerStub, expected_digest: bytes) -> float:
    t0 = time.perf_counter()
    # As a worker pulls: the body digest (checked below) proves it equals the server's, whose
    # updates were each checked finite on arrival, so the pull skips its own finiteness pass.
    _, pulled = receive_stream(stub.PullBody(service_pb2.PullRequest(), timeout=300), limits=PULL_LIMITS)
    elapsed = time.perf_counter() - t0
    if tensors_digest(pulled) != expected_digest:
        raise CommitMismatchError("pulled tensors differ from the server's")
    return elapsed


def _raw_push(channel: grpc.Channel, pieces: list[bytes]) -> float:
    t0 = time.perf_counter()
    call = channel.stream_unary(f"/{_RAW_SERVICE}/Push", request_serializer=None, response_deserializer=None)
    reply = call(iter(pieces), timeout=300)
    elapsed = time.perf_counter() - t0
    if int.from_bytes(reply, "little") != sum(len(p) for p in pieces):
        raise ConnectionError("raw push lost bytes")
    return elapsed


def _raw_pull(channel: grpc.Channel, size: int) -> float:
    t0 = time.perf_counter()
    call = channel.unary_stream(f"/{_RAW_SERVICE}/Pull", request_serializer=None, response_deserializer=None)
    got = 0
    for message in call(b"", timeout=300):
        got += len(message)
    elapsed = time.perf_counter() - t0
    if got != size:
        raise ConnectionError(f"raw pull got {got} of {size} bytes")
    return elapsed


def _tcp(port: int, payload: memoryview) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(payload)
        if conn.recv(1) != b"k":
            raise ConnectionError("tcp sink did not acknowledge")
    return time.perf_counter() - t0


def run(quick: bool = False) -> dict[str, Any]:
    """Push and pull 256 MiB (quick: 32 MiB) of float32 over loopback gRPC and TCP; best of 11 each.

    The server (gRPC servicer and TCP sink) and the client run in two fresh processes, so the
    sides do not share one GIL. gRPC push ends when the server has verified the commit; pull ends
    when ``receive_stream`` has decoded every tensor. TCP sends the same bytes with ``sendall``
    into a preallocated buffer. ``grpc_raw_*`` is gRPC's own floor on the same channel: the same
    bytes as prebuilt 1 MiB messages, no protobuf and no checks. All are interleaved, after one
    untimed warm-up pass. ``cpu_ms_per_MiB`` is the least CPU time each process spent per MiB
    (all its threads), which a loaded machine distorts far less than wall time; the pull client's
    includes one digest pass that checks the pulled tensors against the server's.

    Chunks travel as ``dept_comm.frames.ChunkFrame``s, as in dept-server and dept-worker: built with
    one copy of the payload, read in place, one XXH3-64 pass per side for checksums and digests.

    The top-level figures use the allocator setting dept-server and dept-worker use
    (``dept_comm.memory.keep_freed_memory(max_arenas=0)``); ``default_allocator`` repeats all of
    it in two new processes with glibc's defaults.
    """
    size = (32 if quick else 256) << 20
    out: dict[str, Any] = {"size_bytes": size, "chunk_bytes": StreamConfig().chunk_bytes, "repeats": _REPEATS}
    out |= _in_process(size, tuned=True)
    out["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    out["default_allocator"] = _in_process(size, tuned=False)
    return out


def _in_process(size: int, *, tuned: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_client, args=(child, size, tuned))  # not daemonic: it starts the server
    proc.start()
    try:
        if not parent.poll(600):
            raise TimeoutError("wire benchmark client gave no result within 600 s")
        result: dict[str, Any] = parent.recv()
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if "error" in result:
        raise RuntimeError(f"wire benchmark client failed: {result['error']}")
    return result


def _client(conn: Connection, size: int, tuned: bool) -> None:
    """Client process: start the server process, measure, send the figures back."""
    try:
        conn.send(_client_measure(size, tuned))
    except (OSError, grpc.RpcError, DeptError, TimeoutError) as err:
        conn.send({"error": f"{type(err).__name__}: {err}"})


def _client_measure(size: int, tuned: bool) -> dict[str, Any]:
    applied = keep_freed_memory(max_arenas=0) if tuned else False
    config = StreamConfig()
    tensors = _tensors(size)
    size = sum(t.numel() * 4 for t in tensors.values())
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, size, config.chunk_bytes, tuned), daemon=True)
    proc.start()
    try:
        if not parent.poll(120):
            raise TimeoutError("benchmark server did not start within 120 s")
        grpc_port, tcp_port = parent.recv()
        payload = flat.view(torch.uint8).numpy().data
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=channel_options()) as channel:
            stub = ParameterServerStub(channel)
            grpc.channel_ready_future(channel).result(timeout=30)
            pieces = _raw_pieces(tensors, config.chunk_bytes)
            expected = tensors_digest(tensors)
            runs: dict[str, Callable[[], float]] = {
                "tcp": lambda: _tcp(tcp_port, payload),
                "push": lambda: _push(stub, tensors, config),
                "pull": lambda: _pull(stub, expected),
                "raw_push": lambda: _raw_push(channel, pieces),
                "raw_pull": lambda: _raw_pull(channel, size),
            }

            def server_cpu() -> float:
                parent.send("cpu")
                return float(parent.recv())

            samples = _measure(runs, server_cpu)
    finally:
        parent.send("stop")
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    logger.info("wire tuned=%s samples=%s", tuned, samples)
    return {"num_tensors": len(tensors)} | _figures(size, samples) | ({"applied": applied} if tuned else {})


Sample = tuple[float, float, float]  # wall seconds, client CPU seconds, server CPU seconds


def _measure(
    runs: Mapping[str, Callable[[], float]], server_cpu: Callable[[], float]
) -> dict[str, list[Sample]]:
    # Interleaved so that all see the same background load; the first pass is untimed. CPU time
    # (all threads of each process) is steadier than wall time on a shared machine.
    samples: dict[str, list[Sample]] = {name: [] for name in runs}
    for i in range(_WARMUP + _REPEATS):
        for name, one in runs.items():
            s0, c0 = server_cpu(), time.process_time()
            elapsed = one()
            c1, s1 = time.process_time(), server_cpu()
            if i >= _WARMUP:
                samples[name].append((elapsed, c1 - c0, s1 - s0))
    return samples


def _figures(size: int, samples: Mapping[str, list[Sample]]) -> dict[str, Any]:
    mbps = {k: size / min(x[0] for x in v) / 1e6 for k, v in samples.items()}
    mib = size / (1 << 20)
    cpu = {
        k: {
            "client": round(1e3 * min(x[1] for x in v) / mib, 3),
            "server": round(1e3 * min(x[2] for x in v) / mib, 3),
        }
        for k, v in samples.items()
    }
    return {
        "grpc_push_MBps": round(mbps["push"], 1),
        "grpc_pull_MBps": round(mbps["pull"], 1),
        "tcp_MBps": round(mbps["tcp"], 1),
        "push_vs_tcp": round(mbps["push"] / mbps["tcp"], 3),
        "pull_vs_tcp": round(mbps["pull"] / mbps["tcp"], 3),
        "grpc_raw_push_MBps": round(mbps["raw_push"], 1),
        "grpc_raw_pull_MBps": round(mbps["raw_pull"], 1),
        "raw_push_vs_tcp": round(mbps["raw_push"] / mbps["tcp"], 3),
        "raw_pull_vs_tcp": round(mbps["raw_pull"] / mbps["tcp"], 3),
        "cpu_ms_per_MiB": cpu,
    }
