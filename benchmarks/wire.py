"""Wire throughput on loopback: gRPC push and pull of float32 tensors against a plain TCP socket."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import grpc
import torch

from dept_comm.channel import bind, build_server, channel_options
from dept_comm.codecs import get_codec
from dept_comm.digest import tensors_digest
from dept_comm.errors import CommitMismatchError, DeptError
from dept_comm.frames import ChunkFrame, StreamItem, WireItem, from_wire, read_wire, to_wire
from dept_comm.grpc_env import transport
from dept_comm.manifest import chunk_checksums, tensor_payload
from dept_comm.memory import keep_freed_memory
from dept_comm.parallel import DEFAULT_STREAMS
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.pipeline import PipelinedUpload
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
_STREAM_COUNTS = (1, 2, 4)  # DEFAULT_STREAMS among them


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
    """Push and pull 256 MiB (quick: 32 MiB) of float32 over loopback against the real dept-server,
    with 1, 2 and 4 concurrent streams, next to one raw TCP socket and raw gRPC; best of 11 each.

    Three processes: this benchmark's client, the real dept-server (``dept_bench.wire_server``:
    ServerApp, servicer, admission, staging, down-link frames, fp32 both ways) and a minimal server
    (``_serve``) with the TCP sink and gRPC's own floor (``grpc_raw_*``: the same bytes as prebuilt
    1 MiB messages, no protobuf and no checks). The client is ``dept_comm.participant.client.ServerClient``
    as dept-worker uses it: a push encodes the update on a background thread while it streams it
    (``PipelinedUpload``, timed from the start of the encode) until the server's receipt holds
    every chunk (staged, every chunk checksum verified; the commit's digest check is
    CommitUpdate's, not timed), and ``push_serial`` encodes first, then sends; a pull streams the
    whole body, merges its stripes and decodes every tensor with ``receive_stream`` (checksums,
    tensor digests, commit digest), then checks the body digest against the server's (untimed,
    but in the CPU figures). All runs are interleaved, after
    one untimed warm-up pass.

    ``streams`` is dept-worker's default (``dept_comm.parallel.DEFAULT_STREAMS``); the top-level
    push and pull figures are for it, ``by_streams`` has every count. ``cpu_ms_per_MiB`` is the
    least CPU time each process spent per MiB (all threads; the server's from its threads'
    schedstat), which a loaded machine distorts far less than wall time; its ``phases`` are the
    single-thread cost per MiB of each step of ours on the same data, measured apart in this
    process, and ``grpc_and_rest`` is the side's total less those (gRPC, its threads, our
    per-message glue). ``grpc_transport`` is gRPC's transport on each end (``dept_comm.grpc_env``).
    """
    size = (32 if quick else 256) << 20
    out: dict[str, Any] = {"size_bytes": size, "chunk_bytes": StreamConfig().chunk_bytes, "repeats": _REPEATS}
    out |= _in_process(size, tuned=True)
    out["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
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


def _server_cpu(pid: int) -> float:
    """CPU seconds of every live thread of process ``pid`` (ns resolution, from schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended meanwhile
    return total / 1e9


def _start_real_server(size: int) -> tuple[subprocess.Popen[str], int, str]:
    """The real dept-server in a process of its own: the process, its port and its gRPC transport."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dept_bench.wire_server", "--body-mib", str(size >> 20)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise TimeoutError("dept-server did not start")
    ready = json.loads(line)
    return proc, int(ready["port"]), str(ready["grpc_transport"])


class _Worker:
    """A joined worker of the real server, pushing and pulling as dept-worker does."""

    def __init__(self, port: int) -> None:
        self.client = ServerClient(f"127.0.0.1:{port}", timeout_s=120, progress_interval_s=3600)
        join = service_pb2.JoinRequest(
            source_id="bench",
            worker_name="bench",
            attributes={"dept.vocab_digest": ""},
            attributes_schema="dept/1",
        )
        reply = self.client.join(join)
        self.worker_id = reply.worker_id
        self.round_idx = reply.round.round_idx
        self.request = service_pb2.PullRequest(worker_id=self.worker_id, full=True)
        self.info, self.body = receive_stream(self.client.pull(self.request), limits=PULL_LIMITS)

    def push(self, streams: int, *, pipelined: bool = True) -> float:
        """One upload as dept-worker sends it: encoded on a background thread while it is sent
        (``PipelinedUpload``, the worker's default), or (``pipelined=False``) encoded first."""
        self.client.streams = streams
        info = StreamOpenInfo(
            upload_id=f"bench-{time.monotonic_ns()}",
            sender_id=self.worker_id,
            round_idx=self.round_idx,
            base_version=self.info.target_version,
            base_digest=self.info.target_digest,
            is_delta=True,
        )
        t0 = time.perf_counter()
        stream = encode_stream(self.body, open_info=info, codec=get_codec("fp32"))
        messages: Sequence[StreamItem] = PipelinedUpload(stream) if pipelined else list(stream)[:-1]
        receipt = self.client.push(messages)
        elapsed = time.perf_counter() - t0
        if receipt.num_chunks != len(messages) - 1 or receipt.missing_seqs:
            raise CommitMismatchError(f"push held {receipt.num_chunks} of {len(messages) - 1} chunks")
        return elapsed

    def pull(self, streams: int) -> float:
        self.client.streams = streams
        t0 = time.perf_counter()
        info, pulled = receive_stream(self.client.pull(self.request), limits=PULL_LIMITS)
        elapsed = time.perf_counter() - t0
        if tensors_digest(pulled) != info.target_digest:
            raise CommitMismatchError("pulled tensors differ from the server's")
        return elapsed


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
    real, real_port, real_transport = _start_real_server(size)
    try:
        if not parent.poll(120):
            raise TimeoutError("benchmark server did not start within 120 s")
        grpc_port, tcp_port = parent.recv()
        payload = flat.view(torch.uint8).numpy().data
        worker = _Worker(real_port)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=channel_options()) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            pieces = _raw_pieces(tensors, config.chunk_bytes)
            runs: dict[str, Callable[[], float]] = {"tcp": lambda: _tcp(tcp_port, payload)}
            for n in _STREAM_COUNTS:
                runs[f"push{n}"] = lambda n=n: worker.push(n)  # type: ignore[misc]
                runs[f"pull{n}"] = lambda n=n: worker.pull(n)  # type: ignore[misc]
            runs["push_serial"] = lambda: worker.push(DEFAULT_STREAMS, pipelined=False)
            runs["raw_push"] = lambda: _raw_push(channel, pieces)
            runs["raw_pull"] = lambda: _raw_pull(channel, size)
            samples = _measure(runs, lambda: _server_cpu(real.pid), lambda: _server_cpu(proc.pid or 0))
        worker.client.close()
    finally:
        parent.send("stop")
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
        if real.stdin is not None:
            real.stdin.close()
        try:
            real.wait(timeout=30)
        except subprocess.TimeoutExpired:
            real.kill()
    logger.info("wire tuned=%s samples=%s", tuned, samples)
    out = {"num_tensors": len(tensors)} | _figures(size, samples, _phases(tensors, config))
    # gRPC's transport on each end (dept_comm.grpc_env): the figures depend on it
    out["grpc_transport"] = {"client": transport().describe(), "server": real_transport}
    return out | ({"applied": applied} if tuned else {})


Sample = tuple[float, float, float]  # wall seconds, client CPU seconds, server CPU seconds


def _measure(
    runs: Mapping[str, Callable[[], float]],
    real_cpu: Callable[[], float],
    raw_cpu: Callable[[], float],
) -> dict[str, list[Sample]]:
    # Interleaved so that all see the same background load; the first pass is untimed. CPU time
    # (all threads of each process) is steadier than wall time on a shared machine.
    samples: dict[str, list[Sample]] = {name: [] for name in runs}
    for i in range(_WARMUP + _REPEATS):
        for name, one in runs.items():
            server_cpu = real_cpu if name.startswith(("push", "pull")) else raw_cpu
            s0, c0 = server_cpu(), time.process_time()
            elapsed = one()
            c1, s1 = time.process_time(), server_cpu()
            if i >= _WARMUP:
                samples[name].append((elapsed, c1 - c0, s1 - s0))
    return samples


def _phases(tensors: Mapping[str, torch.Tensor], config: StreamConfig) -> dict[str, float]:
    """CPU ms per MiB of each step of ours, one thread, least of 3 (the same data as the runs)."""
    step = config.chunk_bytes
    fp32 = get_codec("fp32")
    mib = sum(t.numel() * 4 for t in tensors.values()) / (1 << 20)
    payloads = [memoryview(tensor_payload(k, x, fp32, None)).cast("B") for k, x in tensors.items()]
    checksums = [chunk_checksums(p, step) for p in payloads]
    info = StreamOpenInfo(upload_id="phases")
    items = [read_wire(to_wire(m)) for m in encode_stream(tensors, open_info=info, codec=fp32, config=config)]
    wires = [to_wire(m) for m in items]  # type: ignore[arg-type]

    def best(fn: Callable[[], object]) -> float:
        least = math.inf
        for _ in range(3):
            t0 = time.thread_time()
            fn()
            least = min(least, time.thread_time() - t0)
        return round(1e3 * least / mib, 3)

    def frame() -> None:
        for p, sums in zip(payloads, checksums, strict=True):
            for k, checksum in enumerate(sums):
                ChunkFrame.build(
                    upload_id="phases", seq=k, tensor_idx=0, chunk_idx=k, header=None,
                    data=p[k * step : (k + 1) * step], checksum=checksum,
                )  # fmt: skip

    receive = decode = math.inf
    for _ in range(3):  # each pass drops the last one's tensors first, as a worker's pulls do
        t0 = time.thread_time()
        rx = StreamReceiver(limits=PULL_LIMITS)
        for m in items:
            rx.add(m)  # checks, checksum and the copy into staging
        t1 = time.thread_time()
        decoded = rx.decode_all()
        t2 = time.thread_time()
        del rx, decoded
        receive, decode = min(receive, t1 - t0), min(decode, t2 - t1)
    out = {
        "checksum": best(lambda: [chunk_checksums(p, step) for p in payloads]),
        "frame": best(frame),
        "parse": best(lambda: [from_wire(w) for w in wires]),
        "receive": round(1e3 * receive / mib, 3),
        "decode": round(1e3 * decode / mib, 3),
        "digest": best(lambda: tensors_digest(tensors)),
    }
    out["stage"] = round(max(0.0, out.pop("receive") - out["checksum"]), 3)
    return out


# Our steps on each side of a transfer (fp32: the payload is the tensor's memory, no encode).
_SIDES = {
    ("push", "client"): ("checksum", "frame"),
    ("push", "server"): ("parse", "checksum", "stage"),
    ("pull", "server"): ("frame",),  # checksums are computed once per version, not per pull
    ("pull", "client"): ("parse", "checksum", "stage", "decode", "digest"),
}


def _figures(size: int, samples: Mapping[str, list[Sample]], phases: Mapping[str, float]) -> dict[str, Any]:
    mib = size / (1 << 20)
    mbps = {k: size / min(x[0] for x in v) / 1e6 for k, v in samples.items()}
    median = {k: size / statistics.median(x[0] for x in v) / 1e6 for k, v in samples.items()}
    cpu = {
        k: {
            "client": round(1e3 * min(x[1] for x in v) / mib, 3),
            "server": round(1e3 * min(x[2] for x in v) / mib, 3),
        }
        for k, v in samples.items()
    }
    tcp = mbps["tcp"]

    def side(kind: str, n: int, who: str) -> dict[str, Any]:
        total = cpu[f"{kind}{n}"][who]
        ours = {p: phases[p] for p in _SIDES[(kind, who)]}
        return {"total": total, "phases": ours, "grpc_and_rest": round(total - sum(ours.values()), 3)}

    by_streams: dict[str, dict[str, Any]] = {
        str(n): {
            "push_MBps": round(mbps[f"push{n}"], 1),
            "pull_MBps": round(mbps[f"pull{n}"], 1),
            "push_median_MBps": round(median[f"push{n}"], 1),
            "pull_median_MBps": round(median[f"pull{n}"], 1),
            "push_vs_tcp": round(mbps[f"push{n}"] / tcp, 3),
            "pull_vs_tcp": round(mbps[f"pull{n}"] / tcp, 3),
            "cpu_ms_per_MiB": {
                kind: {who: side(kind, n, who) for who in ("client", "server")} for kind in ("push", "pull")
            },
        }
        for n in _STREAM_COUNTS
    }
    chosen = by_streams[str(DEFAULT_STREAMS)]
    return {
        "streams": DEFAULT_STREAMS,
        "push_MBps": chosen["push_MBps"],
        "pull_MBps": chosen["pull_MBps"],
        "tcp_MBps": round(tcp, 1),
        "tcp_median_MBps": round(median["tcp"], 1),
        "push_vs_tcp": chosen["push_vs_tcp"],
        "pull_vs_tcp": chosen["pull_vs_tcp"],
        "one_stream": {
            k: by_streams["1"][k] for k in ("push_MBps", "pull_MBps", "push_vs_tcp", "pull_vs_tcp")
        },
        "push_serial_MBps": round(mbps["push_serial"], 1),
        "push_serial_vs_tcp": round(mbps["push_serial"] / tcp, 3),
        "grpc_raw_push_MBps": round(mbps["raw_push"], 1),
        "grpc_raw_pull_MBps": round(mbps["raw_pull"], 1),
        "raw_push_vs_tcp": round(mbps["raw_push"] / tcp, 3),
        "raw_pull_vs_tcp": round(mbps["raw_pull"] / tcp, 3),
        "cpu_ms_per_MiB": chosen["cpu_ms_per_MiB"]
        | {k: cpu[k] for k in ("tcp", "push_serial", "raw_push", "raw_pull")}
        | {"phases": dict(phases)},
        "by_streams": by_streams,
    }
