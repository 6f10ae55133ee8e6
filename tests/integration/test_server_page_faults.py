"""A dept-server process with the CLI's allocator settings (``dept_comm.server.run.tune_malloc``)
sends a pull without page-faulting each message's buffer in: gRPC copies every 1 MiB chunk frame
into a buffer of its own, which must come back from the heap, not be mapped afresh per message
(a fresh map costs ~0.5 ms per MiB here, more than the rest of the send)."""

from __future__ import annotations

import sys

import pytest

from dept_bench.wire import _start_real_server, _Worker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

BODY_MIB = 32


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_pulls_from_a_fresh_server_reuse_their_message_buffers():
    server, port = _start_real_server(BODY_MIB << 20)
    worker = None
    try:
        worker = _Worker(port)  # joins and makes the first pull (warms the down-link frames)
        before = _minor_faults(server.pid)
        for _ in range(2):
            worker.pull(1)
        faults = _minor_faults(server.pid) - before
        body_pages = 2 * (BODY_MIB << 20) // 4096  # two pulls
        # Mapped afresh per message, each pull faulted in twice its size (measured: ~131,500
        # faults per 256 MiB pull); from the heap, a few pages.
        assert faults < body_pages // 16, faults
    finally:
        if worker is not None:
            worker.client.close()
        assert server.stdin is not None
        server.stdin.close()
        server.wait(30)
