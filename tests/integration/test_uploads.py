"""The server frees the staging of uploads that can never count, and refuses a second contribution."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import torch

from dept_comm.codecs import get_codec
from dept_comm.errors import ConflictError, NotFoundError
from dept_comm.frames import StreamItem, as_message
from dept_comm.pb import service_pb2
from dept_comm.streaming import PULL_LIMITS, StreamConfig, StreamOpenInfo, encode_stream, receive_stream
from dept_server.config import ServerConfig
from dept_server.run import RunningServer, start_server
from dept_worker.client import ServerClient


@pytest.fixture
def running(tmp_path) -> Iterator[RunningServer]:
    config = ServerConfig(
        port=0, rounds=2, workers=2, variant="spec", model="tiny", codec_up="int8", codec_down="int8",
        checkpoint_dir=tmp_path / "ckpt",
    )  # fmt: skip
    server = start_server(config)
    yield server
    server.stop(None)


def _upload(worker_id: str, info: StreamOpenInfo, body: dict[str, torch.Tensor]) -> list[StreamItem]:
    open_info = StreamOpenInfo(
        upload_id=f"u-{uuid.uuid4().hex}",
        sender_id=worker_id,
        round_idx=0,
        base_version=info.target_version,
        base_digest=info.target_digest,
        is_delta=True,
    )
    delta = {k: torch.full_like(v, 0.01) for k, v in body.items()}
    config = StreamConfig(chunk_bytes=16 << 10)
    return list(encode_stream(delta, open_info=open_info, codec=get_codec("fp32"), config=config))


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
        worker_id = client.join(service_pb2.JoinRequest(source_id="sw", worker_name="sw")).worker_id
        info, body = receive_stream(
            client.pull(service_pb2.PullRequest(worker_id=worker_id, full=True)), limits=PULL_LIMITS
        )
        first, second = _upload(worker_id, info, body), _upload(worker_id, info, body)
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
        worker_id = client.join(service_pb2.JoinRequest(source_id="sw", worker_name="sw")).worker_id
        info, body = receive_stream(
            client.pull(service_pb2.PullRequest(worker_id=worker_id, full=True)), limits=PULL_LIMITS
        )
        counted = _upload(worker_id, info, body)
        client.push(counted[:-1])
        request = service_pb2.CommitUpdateRequest(
            commit=as_message(counted[-1]).commit, worker_id=worker_id, round_idx=0
        )
        assert client.commit(request).accepted
        assert app.staged_upload_bytes == 0

        again = _upload(worker_id, info, body)
        with pytest.raises(ConflictError, match="already committed"):
            client.push(again[:-1])
        assert app.staged_upload_bytes == 0
        assert client.commit(request).accepted  # the counted one's retried commit: same answer
        record = app.coordinator.round_record()
        assert [c.upload_id for c in record.commits] == [as_message(counted[0]).open.upload_id]
    finally:
        client.close()
