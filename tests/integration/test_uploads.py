"""The server frees the staging of uploads that can never count, and refuses a second contribution."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from dept_comm.errors import ConflictError, NotFoundError
from dept_comm.frames import as_message
from dept_comm.pb import service_pb2
from dept_server.run import RunningServer
from dept_worker.client import ServerClient
from tests.integration.servers import delta_upload, join_and_pull, serving

CHUNK_BYTES = 16 << 10


@pytest.fixture
def running(tmp_path) -> Iterator[RunningServer]:
    with serving(tmp_path, workers=2) as server:  # two expected: a commit leaves the round open
        yield server


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_superseded_and_abandoned_uploads_are_freed(running: RunningServer) -> None:
    app = running.app
    client = ServerClient(f"127.0.0.1:{running.port}", timeout_s=20)
    try:
        worker_id, info, body = join_and_pull(client)
        first, second = (
            delta_upload(worker_id, info, body, chunk_bytes=CHUNK_BYTES),
            delta_upload(worker_id, info, body, chunk_bytes=CHUNK_BYTES),
        )
        half = len(first) // 2

        receipt = client.push(first[:half])  # open + some chunks, then the stream ends
        assert receipt.num_chunks == half - 1
        staged_first = app.staged_upload_bytes
        assert staged_first > 0

        client.push(second[:half])  # a new upload id from the same worker supersedes the first
        assert app.staged_upload_bytes == staged_first  # the first's bytes went, the second's came
        first_id = as_message(first[0]).open.upload_id
        with pytest.raises(NotFoundError):
            client.query_upload(worker_id, first_id)  # the superseded upload is gone
        second_id = as_message(second[0]).open.upload_id
        assert client.query_upload(worker_id, second_id).num_chunks == half - 1
        with pytest.raises(NotFoundError):
            client.commit(
                service_pb2.CommitUpdateRequest(
                    commit=as_message(first[-1]).commit, worker_id=worker_id, round_idx=0
                )
            )

        client.leave(service_pb2.LeaveRequest(worker_id=worker_id, reason="test"))
        assert _wait_for(lambda: app.staged_upload_bytes == 0), "the ticker frees a left worker's upload"
    finally:
        client.close()


def test_second_upload_after_a_commit_is_refused_before_staging(running: RunningServer) -> None:
    app = running.app
    client = ServerClient(f"127.0.0.1:{running.port}", timeout_s=20)
    try:
        worker_id, info, body = join_and_pull(client)
        counted = delta_upload(worker_id, info, body, chunk_bytes=CHUNK_BYTES)
        client.push(counted[:-1])
        request = service_pb2.CommitUpdateRequest(
            commit=as_message(counted[-1]).commit, worker_id=worker_id, round_idx=0
        )
        assert client.commit(request).accepted
        assert app.staged_upload_bytes == 0

        again = delta_upload(worker_id, info, body, chunk_bytes=CHUNK_BYTES)
        with pytest.raises(ConflictError, match="already committed"):
            client.push(again[:-1])
        assert app.staged_upload_bytes == 0
        assert client.commit(request).accepted  # the counted one's retried commit: same answer
        record = app.coordinator.round_record()
        assert [c.upload_id for c in record.commits] == [as_message(counted[0]).open.upload_id]
    finally:
        client.close()
