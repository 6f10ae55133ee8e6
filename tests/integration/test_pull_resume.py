"""A pull cut at a random chunk goes on from that chunk, and the result verifies (real gRPC server)."""

from __future__ import annotations

import random

import pytest

from dept_comm.digest import tensors_digest
from dept_comm.frames import as_message, kind_of
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.pull_resume import PullProgress
from dept_comm.streaming import PULL_LIMITS, PullReceiver, receive_stream
from tests.integration.servers import (
    cut_first_pull,
    join_and_pull,
    pull_until,
    random_delta,
    raw_peer,
    seqs,
    serving,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_pull_cut_at_a_random_chunk_resumes_there_and_verifies(tmp_path, seed):
    with raw_peer(tmp_path) as peer:
        joined = peer.joined
        request = service_pb2.PullRequest(worker_id=joined.worker_id, full=True)
        whole = list(peer.stub.PullBody(request, metadata=joined.metadata()))
        n = len(seqs(whole))
        assert n >= 4, "the test needs a stream of several chunks"
        k = random.Random(seed).randrange(0, n - 2)

        progress = PullProgress(request)
        pull_until(peer, request, progress, k)
        assert progress.next_seq == k + 1
        resumed = list(peer.stub.PullBody(progress.next_request(), metadata=joined.metadata()))
        assert seqs(resumed) == list(range(k + 1, n)), "the server resent chunks the worker held"
        for msg in resumed:
            progress.add(msg)
        info, body = receive_stream(progress.messages(), limits=PULL_LIMITS)
        assert info.target_digest == peer.server.app.model.digest == tensors_digest(body)
        assert all(body[name].equal(t) for name, t in joined.body.items())


def test_a_resume_of_a_stream_that_is_gone_gets_the_new_stream_whole(tmp_path):
    """A round closed between the cut and the retry: the server sends the new version from chunk
    0 under another id, the held chunks are dropped, and the result verifies against it."""
    with raw_peer(tmp_path, workers=1) as peer:
        joined, client = peer.joined, peer.client
        request = service_pb2.PullRequest(worker_id=joined.worker_id, full=True)
        progress = PullProgress(request)
        pull_until(peer, request, progress, 1)
        upload = joined.sender().upload(random_delta(joined.body, 3), info=joined.info)
        client.push(upload.messages[:-1])
        client.commit(upload.commit_request(joined.worker_id, 0))  # closes round 0: version 1
        assert peer.server.app.model.version == 1
        resumed = list(peer.stub.PullBody(progress.next_request(), metadata=joined.metadata()))
        assert seqs(resumed)[0] == 0
        for msg in resumed:
            progress.add(msg)
        info, body = receive_stream(progress.messages(), limits=PULL_LIMITS)
        assert info.target_version == 1 and info.target_digest == tensors_digest(body)


def test_a_resume_naming_another_stream_is_not_skipped(tmp_path):
    """A forged or stale resume (wrong target digest) cannot make the server skip chunks."""
    with raw_peer(tmp_path) as peer:
        joined = peer.joined
        request = service_pb2.PullRequest(
            worker_id=joined.worker_id,
            full=True,
            resume_from_seq=3,
            resume_upload_id=joined.info.upload_id,
            resume_target_digest=b"\0" * 16,
        )
        items = list(peer.stub.PullBody(request, metadata=joined.metadata()))
        assert seqs(items)[0] == 0 and kind_of(items[0]) == "open"
        assert as_message(items[0]).open.upload_id == joined.info.upload_id


@pytest.mark.parametrize("into_sink", [False, True])
def test_the_worker_client_resumes_a_pull_cut_by_the_network(tmp_path, monkeypatch, into_sink):
    """ServerClient.pull: a stream cut mid-way (UNAVAILABLE) is retried from its first missing
    chunk, and the worker receives the whole stream once. Into a sink (the participant's pull,
    decoding as chunks arrive), the client holds no chunk itself."""
    with serving(tmp_path) as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
        try:
            joined = join_and_pull(client)
            requests = cut_first_pull(monkeypatch, client, 3)
            request = service_pb2.PullRequest(worker_id=joined.worker_id, full=True)
            sink = PullReceiver(limits=PULL_LIMITS) if into_sink else None
            items = client.pull(request, sink=sink)
            assert len(requests) == 2 and requests[1].resume_from_seq == 2  # open, chunks 0 and 1 held
            if sink is not None:
                assert [kind_of(m) for m in items] == ["open", "commit"]  # the chunks went to the sink
                info, body = sink.result()
            else:
                assert seqs(items) == list(range(len(seqs(items))))
                info, body = receive_stream(items, limits=PULL_LIMITS)
            assert info.target_digest == tensors_digest(body) == server.app.model.digest
            assert all(body[name].equal(t) for name, t in joined.body.items())
        finally:
            client.close()
