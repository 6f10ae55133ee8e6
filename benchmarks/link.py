"""``dept-bench link``: push and pull a body through an emulated slow link, against the ideal time.

Three processes: the wire benchmark's server (``wire._serve``: PushUpdate stages and verifies the
commit, PullBody streams the body), the userspace ``LinkEmulator`` (rate cap and one-way delay of
RTT/2, both ways; its own process so that its relay threads do not share a GIL with either end),
and this process as the client, which pushes and pulls with the project's own stream code and
channel options. ``comm_s`` is the best of ``repeats`` transfers (a push ends when the server has
verified the commit; a pull when every tensor is decoded and the digest matches); ``ideal_s`` is
``payload_bytes * 8 / rate``, which no transfer can beat (it ignores the RTT and framing).

Links: 100 Mbit/s at 1 ms and 50 ms RTT with a 16 MiB fp32 body, 1 Gbit/s at 50 ms with 64 MiB.
``--quick``: 200 Mbit/s at 10 ms with 4 MiB. ``emulator`` says which link carried the bytes
("userspace": ``dept_bench.linkemu``).
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


def _emulate(control: Connection, target: tuple[str, int], spec: LinkSpec) -> None:
    with LinkEmulator(target, spec) as emu:
        control.send(emu.port)
        with contextlib.suppress(EOFError):
            control.recv()


def _one_link(rate_mbit: float, rtt_ms: float, size: int, repeats: int) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    config = StreamConfig()
    s_parent, s_child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(s_child, size, config.chunk_bytes, True), daemon=True)
    server.start()
    e_parent, e_child = ctx.Pipe()
    emulator: mp.process.BaseProcess | None = None
    try:
        if not s_parent.poll(120):
            raise TimeoutError("link benchmark server did not start within 120 s")
        grpc_port, _ = s_parent.recv()
        spec = LinkSpec(rate_bps=rate_mbit * 1e6, delay_s=rtt_ms / 2e3)
        emulator = ctx.Process(target=_emulate, args=(e_child, ("127.0.0.1", grpc_port), spec), daemon=True)
        emulator.start()
        if not e_parent.poll(60):
            raise TimeoutError("link emulator did not start within 60 s")
        port = e_parent.recv()
        tensors = _tensors(size)
        payload = sum(t.numel() * 4 for t in tensors.values())
        expected = tensors_digest(tensors)
        rows = []
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
            stub = ParameterServerStub(channel)
            grpc.channel_ready_future(channel).result(timeout=30)
            transfers: dict[str, Callable[[], float]] = {
                "push": lambda: _push(stub, tensors, config),
                "pull": lambda: _pull(stub, expected),
            }
            for direction, once in transfers.items():
                times = [once() for _ in range(repeats)]
                ideal = payload * 8 / (rate_mbit * 1e6)
                rows.append(
                    {
                        "rate_mbit": rate_mbit,
                        "rtt_ms": rtt_ms,
                        "codec": "fp32",
                        "direction": direction,
                        "payload_bytes": payload,
                        "comm_s": round(min(times), 3),
                        "ideal_s": round(ideal, 3),
                        "comm_vs_ideal": round(min(times) / ideal, 3),
                        "all_s": [round(t, 3) for t in times],
                        "emulator": "userspace",
                    }
                )
                logger.info("link %s", rows[-1])
        return rows
    finally:
        s_parent.send("stop")
        e_parent.send("stop")
        for proc in (server, emulator):
            if proc is not None:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()


def run(quick: bool = False) -> dict[str, Any]:
    started = time.monotonic()
    links = QUICK_LINKS if quick else LINKS
    rows: list[dict[str, Any]] = []
    for rate, rtt, size in links:
        rows += _one_link(rate, rtt, size, 1 if quick else REPEATS)
    return {
        "benchmark": "link",
        "channel_options": {k: v for k, v in channel_options()},
        "chunk_bytes": StreamConfig().chunk_bytes,
        "links": rows,
        "wall_s": round(time.monotonic() - started, 1),
    }
