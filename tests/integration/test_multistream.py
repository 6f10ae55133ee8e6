"""Transfers over several concurrent streams (``dept_comm.parallel``) against a real dept-server."""

from __future__ import annotations

import grpc
import pytest

from dept_comm.digest import tensors_digest
from dept_comm.errors import InvalidInputError
from dept_comm.frames import WireItem, kind_of
from dept_comm.parallel import merge_stripes, run_all, split_push, stripe_request
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.pull_resume import PullProgress
from dept_comm.streaming import PULL_LIMITS, PullReceiver, receive_stream
from tests.integration.servers import (
    cut_first_pull,
    join_and_pull,
    pull_until,
    raw_peer,
    seqs,
    serving,
    worker_upload,
)


@pytest.mark.parametrize("streams", [2, 3, 7])
def test_a_striped_pull_is_bit_identical_to_one_stream(tmp_path, streams):
    with serving(tmp_path) as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
        try:
            joined = join_and_pull(client)
            request = service_pb2.PullRequest(worker_id=joined.worker_id, full=True)
            whole = client.pull(request)
            client.streams = streams
            merged = client.pull(request)
            assert seqs(merged) == seqs(whole) == list(range(len(seqs(whole))))
            info1, one = receive_stream(whole, limits=PULL_LIMITS)
            info2, many = receive_stream(merged, limits=PULL_LIMITS)
            assert info1 == info2
            assert one.keys() == many.keys()
            for k in one:
                assert torch_equal_bits(one[k], many[k]), k
            assert tensors_digest(many) == tensors_digest(one) == info1.target_digest
        finally:
            client.close()


def test_a_striped_pull_into_a_decoding_sink_gives_the_same_tensors(tmp_path):
    """The participant's pull path: a sink that decodes as messages come (PullReceiver), over 3 stripes."""
    with serving(tmp_path) as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20, streams=3)
        try:
            joined = join_and_pull(client)
            sink = PullReceiver(limits=PULL_LIMITS)
            got = client.pull(service_pb2.PullRequest(worker_id=joined.worker_id, full=True), sink=sink)
            assert [kind_of(m) for m in got] == ["open", "commit"]  # merged into the sink as they came
            info, tensors = sink.result()
            assert info.target_digest == joined.info.target_digest
            assert tensors_digest(tensors) == tensors_digest(joined.body) == info.target_digest
        finally:
            client.close()


def test_a_striped_pull_into_a_sink_resumes_a_cut_stripe(tmp_path, monkeypatch):
    """Stripe 1 of 2 is cut after its open and first chunk (UNAVAILABLE, as a dropped link): it
    alone goes on from its next seq, and the sink gets the whole stream once, in order."""
    with serving(tmp_path) as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20, streams=2)
        try:
            joined = join_and_pull(client)
            requests = cut_first_pull(monkeypatch, client, 2, lambda request: request.stream_index == 1)
            sink = PullReceiver(limits=PULL_LIMITS)
            got = client.pull(service_pb2.PullRequest(worker_id=joined.worker_id, full=True), sink=sink)
            resumed = [r for r in requests if r.resume_from_seq]
            assert len(requests) == 3 and len(resumed) == 1
            assert resumed[0].stream_index == 1 and resumed[0].resume_from_seq == 2  # seq 1 was held
            assert [kind_of(m) for m in got] == ["open", "commit"]
            info, tensors = sink.result()
            assert tensors_digest(tensors) == info.target_digest == server.app.model.digest
        finally:
            client.close()


def torch_equal_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.numpy().data) == bytes(b.numpy().data)


def test_each_stripe_carries_its_seqs_and_a_cut_stripe_resumes(tmp_path):
    with raw_peer(tmp_path) as peer:
        joined, stub = peer.joined, peer.stub
        request = service_pb2.PullRequest(worker_id=joined.worker_id, full=True)
        whole = list(stub.PullBody(request, metadata=joined.metadata()))
        n = len(seqs(whole))
        assert n >= 6, "the test needs a stream of several chunks"
        count = 2
        stripes: list[list[WireItem]] = []
        for index in range(count):
            stripe = list(stub.PullBody(stripe_request(request, index, count), metadata=joined.metadata()))
            assert seqs(stripe) == list(range(index, n, count))
            stripes.append(stripe)
        # Cut stripe 1 after its second chunk (seq 3), then resume it from where it stopped.
        progress = PullProgress(stripe_request(request, 1, count))
        pull_until(peer, progress.next_request(), progress, 3)
        resumed = progress.next_request()
        assert resumed.resume_from_seq == 4 and resumed.stream_count == 2 and resumed.stream_index == 1
        again = list(stub.PullBody(resumed, metadata=joined.metadata()))
        assert seqs(again)[0] == 5, "the server skips what the stripe holds"
        for msg in again:
            progress.add(msg)
        assert seqs(progress.messages()) == list(range(1, n, 2))
        merged = merge_stripes([stripes[0], progress.messages()])
        info, body = receive_stream(merged, limits=PULL_LIMITS)
        assert tensors_digest(body) == info.target_digest == joined.info.target_digest


@pytest.mark.parametrize(("index", "count"), [(0, 0), (2, 2), (5, 3), (0, 1 << 20), (1, None)], ids=str)
def test_bad_stripe_values_are_invalid_argument(tmp_path, index, count):
    with raw_peer(tmp_path) as peer:
        joined = peer.joined
        request = service_pb2.PullRequest(worker_id=joined.worker_id, full=True, stream_index=index)
        if count is not None:
            request.stream_count = count
        with pytest.raises(grpc.RpcError) as caught:
            list(peer.stub.PullBody(request, metadata=joined.metadata()))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "stream_" in caught.value.details()
        with pytest.raises(InvalidInputError):
            peer.client.pull(request)  # the client maps it, and does not retry it


def test_a_striped_push_is_held_once_and_commits_once(tmp_path):
    with serving(tmp_path, codec_up="fp32") as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20, streams=3)
        try:
            joined = join_and_pull(client)
            upload = worker_upload(joined, chunk_bytes=4096)
            chunks = upload.messages[:-1]
            total = len(chunks) - 1
            assert total >= 9
            # Two whole striped pushes of the same upload at once: every chunk arrives twice or more.
            receipts = run_all([lambda: client.push(chunks), lambda: client.push(chunks)])
            for r in receipts:
                assert r.upload_id == upload.upload_id
                assert not r.missing_seqs
            final = client.query_upload(joined.worker_id, upload.upload_id)
            assert final.num_chunks == total and not final.missing_seqs
            reply = client.commit(upload.commit_request(joined.worker_id, 0))
            assert reply.accepted
            again = client.commit(upload.commit_request(joined.worker_id, 0))
            assert again.accepted and again.upload_id == reply.upload_id  # counted once
        finally:
            client.close()


def test_a_striped_push_after_a_partial_one_sends_the_rest(tmp_path):
    with raw_peer(tmp_path, streams=2, codec_up="fp32") as peer:
        joined, client = peer.joined, peer.client
        upload = worker_upload(joined, chunk_bytes=4096)
        chunks = upload.messages[:-1]
        total = len(chunks) - 1
        # One stripe of three arrives alone (another worker process's cut multi-stream push).
        first = split_push(chunks, 3)[1]
        partial = peer.stub.PushUpdate(iter(first), metadata=joined.metadata())
        assert partial.num_chunks == len(first) - 1 and partial.missing_seqs
        receipt = client.push(chunks)
        assert receipt.num_chunks == total and not receipt.missing_seqs
        assert client.commit(upload.commit_request(joined.worker_id, 0)).accepted
