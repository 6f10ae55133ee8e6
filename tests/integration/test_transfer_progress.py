"""Progress over real gRPC: the worker client's pull and push log progress lines, and the server's
--metrics-port shows the bytes of a push held open mid-stream, and none once it ended."""

from __future__ import annotations

import logging
import re
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dept_comm.channel import open_channel
from dept_comm.frames import StreamItem
from dept_comm.participant.client import ServerClient
from dept_comm.service import ParameterServerStub
from tests.e2e.harness import wait_for
from tests.integration.servers import join_and_pull, serving, worker_upload

CHUNK_BYTES = 4 << 10  # many chunks from the tiny model's int8 body (about 100 KB)


def progress_lines(caplog: pytest.LogCaptureFixture, direction: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"transfer_progress direction={direction} ")
    ]


def test_worker_client_pull_and_push_log_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dept_comm.progress")
    with serving(tmp_path, workers=2) as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20, progress_interval_s=1e-9)
        try:
            joined = join_and_pull(client)
            pulled = progress_lines(caplog, "pull")
            assert pulled, "a pull with a tiny interval logs progress"
            done = [int(re.search(r" done=(\d+) ", line).group(1)) for line in pulled]  # type: ignore[union-attr]
            assert done == sorted(done) and done[-1] > 0
            # dept-server announces the pull's payload bytes in its open: a total and an ETA.
            totals = {int(re.search(r" total=(\d+) ", line).group(1)) for line in pulled}  # type: ignore[union-attr]
            assert len(totals) == 1 and 0 < totals.pop() <= done[-1]
            assert all(" eta_s=unknown" not in line for line in pulled)
            assert re.search(r" tensors=\d+/\d+$", pulled[-1])

            upload = worker_upload(joined, chunk_bytes=CHUNK_BYTES)
            stream = upload.messages[:-1]  # the commit goes with CommitUpdate
            total = sum(m.ByteSize() for m in stream)
            receipt = client.push(stream)
            assert receipt.num_chunks == len(upload.messages) - 2  # all chunks: not the open, not the commit
            pushed = progress_lines(caplog, "push")
            assert pushed
            assert all(f" total={total} " in line and " eta_s=unknown" not in line for line in pushed)
        finally:
            client.close()


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(r"^(dept_inflight_\S+) (\S+)$", text, flags=re.MULTILINE)
    return {name: float(value) for name, value in found}


def test_metrics_show_inflight_push_bytes_while_a_push_is_held_open(tmp_path: Path) -> None:
    with serving(tmp_path, workers=2, metrics_port=0) as server:
        assert server.metrics_port is not None
        assert metrics(server.metrics_port)["dept_inflight_push_bytes"] == 0
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
        channel = open_channel(f"127.0.0.1:{server.port}")
        release = threading.Event()
        try:
            joined = join_and_pull(client)
            upload = worker_upload(joined, chunk_bytes=CHUNK_BYTES)
            stream = upload.messages[:-1]  # the commit goes with CommitUpdate
            held = 4  # the open and three chunks go; then the stream waits

            def requests() -> Iterator[StreamItem]:
                yield from stream[:held]
                release.wait(60)
                yield from stream[held:]

            future = ParameterServerStub(channel).PushUpdate.future(requests(), metadata=joined.metadata())
            sent = sum(m.ByteSize() for m in stream[:held])
            wait_for(
                lambda: metrics(server.metrics_port)["dept_inflight_push_bytes"] == sent,  # type: ignore[arg-type]
                30,
                "the held push's bytes on the metrics endpoint",
            )
            mid = metrics(server.metrics_port)
            assert mid['dept_inflight_streams{direction="push"}'] == 1
            assert mid["dept_inflight_pull_bytes"] == 0
            release.set()
            assert future.result(timeout=60).num_chunks == len(upload.messages) - 2
            after = metrics(server.metrics_port)
            assert after["dept_inflight_push_bytes"] == 0
            assert after['dept_inflight_streams{direction="push"}'] == 0
        finally:
            release.set()
            channel.close()
            client.close()
