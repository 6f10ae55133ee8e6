"""The server frees the staging of uploads that can never count, and refuses a second contribution."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dept_comm.errors import ConflictError, NotFoundError
from dept_comm.frames import StreamItem, as_message, chunk_of
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.server.run import RunningServer
from tests.e2e.harness import wait_for
from tests.integration.servers import join_and_pull, random_delta, serving

CHUNK_BYTES = 4 << 10  # many chunks from the tiny model's int8 body (about 100 KB)


@pytest.fixture
def running(tmp_path) -> Iterator[RunningServer]:
    with serving(tmp_path, workers=2) as server:  # two expected: a commit leaves the round open
        yield server


def staged_bytes(items: list[StreamItem]) -> int:
    """The chunk payload bytes of ``items``: what the server stages for them."""
    return sum(len(chunk.data) for chunk in (chunk_of(m) for m in items) if chunk is not None)


def test_superseded_and_abandoned_uploads_are_freed(running: RunningServer) -> None:
    app = running.app
    client = ServerClient(f"127.0.0.1:{running.port}", timeout_s=20)
    try:
        joined = join_and_pull(client)
        worker_id, sender = joined.worker_id, joined.sender()
        first, second = (
            sender.upload(random_delta(joined.body, seed), info=joined.info, chunk_bytes=CHUNK_BYTES).messages
            for seed in (1, 2)
        )
        half = len(first) // 2

        receipt = client.push(first[:half])  # open + some chunks, then the stream ends
        assert receipt.num_chunks == half - 1
        staged_first = app.staged_upload_bytes
        assert staged_first > 0

        client.push(second[:half])  # a new upload id from the same worker supersedes the first
        # The first's bytes went, the second's came.
        assert staged_first == staged_bytes(first[:half])
        assert app.staged_upload_bytes == staged_bytes(second[:half])
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
        wait_for(lambda: app.staged_upload_bytes == 0, 30, "the ticker to free the left worker's upload")
    finally:
        client.close()


def test_second_upload_after_a_commit_is_refused_before_staging(running: RunningServer) -> None:
    app = running.app
    client = ServerClient(f"127.0.0.1:{running.port}", timeout_s=20)
    try:
        joined = join_and_pull(client)
        worker_id, sender = joined.worker_id, joined.sender()
        counted = sender.upload(
            random_delta(joined.body, 1), info=joined.info, chunk_bytes=CHUNK_BYTES
        ).messages
        client.push(counted[:-1])
        request = service_pb2.CommitUpdateRequest(
            commit=as_message(counted[-1]).commit, worker_id=worker_id, round_idx=0
        )
        assert client.commit(request).accepted
        assert app.staged_upload_bytes == 0

        again = sender.upload(
            random_delta(joined.body, 2), info=joined.info, chunk_bytes=CHUNK_BYTES
        ).messages
        with pytest.raises(ConflictError, match="already committed"):
            client.push(again[:-1])
        assert app.staged_upload_bytes == 0
        assert client.commit(request).accepted  # the counted one's retried commit: same answer
        record = app.coordinator.round_record()
        assert [c.upload_id for c in record.commits] == [as_message(counted[0]).open.upload_id]
    finally:
        client.close()
