"""``dept-bench link``: push and pull a body through an emulated slow link, against the ideal time.

Three processes: the wire benchmark's server (``wire._serve``: PushUpdate stages and verifies the
commit, PullBody streams the body), the userspace ``LinkEmulator`` (rate cap and one-way delay of
RTT/2, both ways; its own process so that its relay threads do not share a GIL with either end),
and this process as the client, which pushes and pulls with the project's own stream code and
channel options. ``comm_s`` is the best of ``repeats`` transfers (a push ends when the server has
verified the commit; a pull when every tensor is decoded and the digest matches); ``ideal_s`` is
``payload_bytes * 8 / rate``, which no transfer can beat (it ignores the RTT and framing).

Links: 100 Mbit/s at 1 ms and 50 ms RTT with a 16 MiB fp32 body, 1 Gbit/s at 50 ms with 64 MiB.
``--quick``: 200 Mbit/s at 10 ms with 4 MiB. ``emulator`` says which link carried the bytes:
"userspace" (``dept_bench.linkemu`` caps the rate and adds the delay) or, where root and ``ip
netns`` are available, "netns+tbf": server and client in two network namespaces joined by veth,
the rate held by ``tbf`` in the kernel and the delay added by the relay inside the server's
namespace (this kernel has no ``netem``); the 100 Mbit/s links run both ways, the JSON's
``netns_skipped`` says why namespaces were not used where they were not. The client runs in its
own process too (it must enter the client namespace before it opens a socket).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import grpc

from dept_comm.channel import channel_options
from dept_comm.digest import tensors_digest
from dept_comm.service import ParameterServerStub
from dept_comm.streaming import StreamConfig

from . import netns
from .linkemu import LinkEmulator, LinkSpec
from .wire import _pull, _push, _serve, _tensors

logger = logging.getLogger(__name__)

LINKS: tuple[tuple[float, float, int], ...] = (  # rate Mbit/s, RTT ms, body bytes
    (100, 1, 16 << 20),
    (100, 50, 16 << 20),
    (1000, 50, 64 << 20),
)
QUICK_LINKS: tuple[tuple[float, float, int], ...] = ((200, 10, 4 << 20),)
REPEATS = 2


def _emulate(control: Connection, target: tuple[str, int], spec: LinkSpec, ns: str | None, host: str) -> None:
    if ns is not None:
        netns.enter(ns)
    with LinkEmulator(target, spec, host=host) as emu:
        control.send(emu.port)
        with contextlib.suppress(EOFError):
            control.recv()


def _serve_in(control: Connection, size: int, chunk_bytes: int, ns: str | None) -> None:
    if ns is not None:
        netns.enter(ns)  # before any socket or thread: later threads inherit the namespace
    _serve(control, size, chunk_bytes, True)


def _client(conn: Connection, address: str, size: int, repeats: int, ns: str | None) -> None:
    """Push and pull ``repeats`` times each through ``address``; send the times back."""
    try:
        if ns is not None:
            netns.enter(ns)
        config = StreamConfig()
        tensors = _tensors(size)
        expected = tensors_digest(tensors)
        with grpc.insecure_channel(address, options=channel_options()) as channel:
            stub = ParameterServerStub(channel)
            grpc.channel_ready_future(channel).result(timeout=30)
            transfers: dict[str, Callable[[], float]] = {
                "push": lambda: _push(stub, tensors, config),
                "pull": lambda: _pull(stub, expected),
            }
            conn.send({d: [once() for _ in range(repeats)] for d, once in transfers.items()})
    except (OSError, grpc.RpcError, TimeoutError, grpc.FutureTimeoutError) as err:
        conn.send({"error": f"{type(err).__name__}: {err}"})


def _start(ctx: Any, target: Callable[..., None], *args: Any) -> tuple[mp.process.BaseProcess, Connection]:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return proc, parent


def _recv(conn: Connection, what: str, timeout_s: float) -> Any:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"{what} gave nothing within {timeout_s:.0f} s")
    return conn.recv()


def _one_link(
    rate_mbit: float, rtt_ms: float, size: int, repeats: int, link: netns.TbfLink | None = None
) -> list[dict[str, Any]]:
    """Rows for one link: userspace rate and delay, or (``link``) tbf rate and userspace delay."""
    ctx = mp.get_context("spawn")
    procs: list[tuple[mp.process.BaseProcess, Connection]] = []
    try:
        procs.append(_start(ctx, _serve_in, size, StreamConfig().chunk_bytes, link and link.server_ns))
        grpc_port, _ = _recv(procs[0][1], "link benchmark server", 120)
        if link is None:
            spec = LinkSpec(rate_bps=rate_mbit * 1e6, delay_s=rtt_ms / 2e3)
            host, kind = "127.0.0.1", "userspace"
        else:  # tbf shapes the rate; the relay adds the delay only (no netem in this kernel)
            spec = LinkSpec(delay_s=rtt_ms / 2e3, queue_bytes=64 << 20)
            host, kind = link.server_ip, "netns+tbf (delay: userspace relay)"
        procs.append(_start(ctx, _emulate, ("127.0.0.1", grpc_port), spec, link and link.server_ns, host))
        port = _recv(procs[1][1], "link emulator", 60)
        procs.append(_start(ctx, _client, f"{host}:{port}", size, repeats, link and link.client_ns))
        times = _recv(procs[2][1], "link benchmark client", 600)
        if "error" in times:
            raise RuntimeError(f"link benchmark client failed: {times['error']}")
    finally:
        for _, conn in procs:
            with contextlib.suppress(OSError):
                conn.send("stop")
        for proc, _ in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    payload = sum(t.numel() * 4 for t in _tensors(size).values())
    ideal = payload * 8 / (rate_mbit * 1e6)
    rows = []
    for direction, ts in times.items():
        rows.append(
            {
                "rate_mbit": rate_mbit,
                "rtt_ms": rtt_ms,
                "codec": "fp32",
                "direction": direction,
                "payload_bytes": payload,
                "comm_s": round(min(ts), 3),
                "ideal_s": round(ideal, 3),
                "comm_vs_ideal": round(min(ts) / ideal, 3),
                "all_s": [round(t, 3) for t in ts],
                "emulator": kind,
            }
        )
        logger.info("link %s", rows[-1])
    return rows


def run(quick: bool = False) -> dict[str, Any]:
    started = time.monotonic()
    links = QUICK_LINKS if quick else LINKS
    rows: list[dict[str, Any]] = []
    for rate, rtt, size in links:
        rows += _one_link(rate, rtt, size, 1 if quick else REPEATS)
    why_not = netns.unavailable()
    if why_not is None:
        for rate, rtt, size in links:
            if rate <= 100 or quick:  # tbf at 1 Gbit/s is CPU-bound on a small host
                with netns.tbf_link(rate) as link:
                    rows += _one_link(rate, rtt, size, 1 if quick else REPEATS, link)
    else:
        logger.warning("netns+tbf rows skipped: %s", why_not)
    return {
        "benchmark": "link",
        "channel_options": {k: v for k, v in channel_options()},
        "chunk_bytes": StreamConfig().chunk_bytes,
        "netns_skipped": why_not,
        "links": rows,
        "wall_s": round(time.monotonic() - started, 1),
    }
