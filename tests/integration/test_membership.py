"""Membership and load against a real server: the norm guard, --max-workers, --heartbeat-timeout,
WatchRounds streams that hold no RPC thread, and overload refusals the worker client retries."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dept_comm.errors import MembershipFullError, OutlierUpdateError
from dept_comm.frames import as_message
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_comm.pb import tensor_pb2 as pb
from tests.e2e.harness import wait_for
from tests.integration.servers import Joined, join_and_pull, random_delta, serving, worker_upload


def clients(port: int, n: int) -> list[ServerClient]:
    """One client per worker: each holds its own worker's session credential."""
    return [ServerClient(f"127.0.0.1:{port}", timeout_s=20) for _ in range(n)]


def push_and_commit(client: ServerClient, joined: Joined, scale: float, seed: int) -> None:
    upload = joined.sender().upload(random_delta(joined.body, seed, scale), info=joined.info)
    client.push(upload.messages[:-1])
    client.commit(upload.commit_request(joined.worker_id, 0))


def test_an_outlier_update_is_refused_and_the_round_still_closes(tmp_path: Path) -> None:
    with serving(tmp_path, workers=3, min_workers=2, max_update_norm_ratio=5.0) as server:
        cs = clients(server.port, 3)
        try:
            a, b, c = (join_and_pull(cl, s) for cl, s in zip(cs, ("a", "b", "c"), strict=True))
            push_and_commit(cs[0], a, 0.01, seed=1)
            push_and_commit(cs[1], b, 0.01, seed=2)
            assert server.app.model.version == 0  # the round waits for c
            with pytest.raises(OutlierUpdateError, match="max-update-norm-ratio"):
                push_and_commit(cs[2], c, 1.0, seed=3)  # 100x the others' norm
            # Refused, not counted, and the round no longer waits for c: it closes with a and b.
            wait_for(lambda: server.app.model.version == 1, 10, "the round to close without the outlier")
            record = server.app.records[-1]
            assert record.num_workers == 2
            assert server.app.staged_upload_bytes == 0  # the refused upload's staging is freed
            info = cs[2].heartbeat(service_pb2.HeartbeatRequest(worker_id=c.worker_id)).round
            assert info.round_idx == 1 and info.admitted_round == 1  # c takes part in the next round
        finally:
            for cl in cs:
                cl.close()


def test_max_workers_refuses_a_further_join_clearly(tmp_path: Path) -> None:
    with serving(tmp_path, workers=1, max_workers=2) as server:
        cs = clients(server.port, 3)
        try:
            replies = [
                cs[i].join(service_pb2.JoinRequest(source_id="sw", worker_name=f"w{i}")) for i in range(2)
            ]
            started = time.monotonic()
            with pytest.raises(MembershipFullError, match="--max-workers"):
                cs[2].join(service_pb2.JoinRequest(source_id="sw", worker_name="w2"))
            assert time.monotonic() - started < 5  # refused at once, not retried as an overload
            cs[0].leave(service_pb2.LeaveRequest(worker_id=replies[0].worker_id))
            assert cs[2].join(service_pb2.JoinRequest(source_id="sw", worker_name="w2")).session
        finally:
            for cl in cs:
                cl.close()


def test_a_silent_worker_is_dropped_within_the_heartbeat_timeout(tmp_path: Path) -> None:
    with serving(tmp_path, workers=2, min_workers=1, heartbeat_timeout_s=2.0) as server:
        cs = clients(server.port, 2)
        try:
            a = join_and_pull(cs[0], "a")
            reply = cs[1].join(service_pb2.JoinRequest(source_id="b", worker_name="b"))  # then silent
            assert reply.heartbeat_interval_ms == 666  # a third of the timeout
            push_and_commit(cs[0], a, 0.01, seed=1)
            committed = time.monotonic()
            assert server.app.model.version == 0  # b is a live member: the round waits for it
            wait_for(
                lambda: server.app.model.version == 1, 10, "the round to close without the silent worker"
            )
            assert time.monotonic() - committed >= 1.0  # it waited for b until b went silent too long
            assert server.app.records[-1].num_workers == 1
        finally:
            for cl in cs:
                cl.close()


def test_round_watchers_hold_no_rpc_thread(tmp_path: Path) -> None:
    """Twenty WatchRounds streams on a server with three RPC threads: calls still run, and every
    stream hears the round close."""
    with serving(tmp_path, workers=1, max_workers_threads=3) as server:
        client = ServerClient(f"127.0.0.1:{server.port}", timeout_s=20)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            joined = join_and_pull(client, "sw")
            stub = service_pb2_grpc.ParameterServerStub(channel)
            request = service_pb2.WatchRoundsRequest(worker_id=joined.worker_id)
            streams = [stub.WatchRounds(request, metadata=joined.metadata(), timeout=60) for _ in range(20)]
            assert all(next(s).round.round_idx == 0 for s in streams)  # the current round at once
            wait_for(lambda: len(server.app.watchers) == 20, 10, "20 open watchers")
            for _ in range(5):  # short calls still get a thread
                beat = client.heartbeat(service_pb2.HeartbeatRequest(worker_id=joined.worker_id))
                assert beat.round.round_idx == 0
            push_and_commit(client, joined, 0.01, seed=1)
            events = [next(s) for s in streams]
            assert all(e.round.round_idx == 1 and e.round.version == 1 for e in events)
            for s in streams:
                s.cancel()
            wait_for(lambda: len(server.app.watchers) == 0, 10, "cancelled watchers to be forgotten")
        finally:
            channel.close()
            client.close()


def _held(items: list[pb.StreamMessage], release: threading.Event) -> Iterator[pb.StreamMessage]:
    yield from items
    release.wait(30)


def test_a_stream_over_max_streams_is_refused_with_a_hint_and_retried(tmp_path: Path) -> None:
    with serving(tmp_path, workers=2, max_streams=1) as server:
        cs = clients(server.port, 2)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        release = threading.Event()
        try:
            a = join_and_pull(cs[0], "a")
            upload = worker_upload(a, chunk_bytes=4 << 10)
            first = [as_message(m) for m in upload.messages[:2]]
            stub = service_pb2_grpc.ParameterServerStub(channel)
            held = stub.PushUpdate.future(_held(first, release), metadata=a.metadata(), timeout=60)
            wait_for(lambda: server.app.streams.held == 1, 10, "a's push to hold the one stream slot")
            # b's pull is refused (RESOURCE_EXHAUSTED with a hint) and retried until the slot frees.
            threading.Timer(1.5, release.set).start()
            b = join_and_pull(cs[1], "b")
            assert server.app.streams.refused >= 1
            assert b.info.target_digest == server.app.model.digest
            assert held.result(timeout=30).num_chunks == 1
        finally:
            release.set()
            channel.close()
            for cl in cs:
                cl.close()


def test_norm_guard_reference_is_the_rounds_median() -> None:
    from dept_comm.server.norm_guard import NormGuard

    guard = NormGuard(4.0)
    guard.check("w", 0, 35.0, body_norm=10.0)  # no update seen yet: compared with the body (40 allowed)
    with pytest.raises(OutlierUpdateError):
        guard.check("w", 0, 41.0, body_norm=10.0)
    guard.accept(0, 1.0)
    guard.accept(0, 1.2)
    with pytest.raises(OutlierUpdateError, match="median of 2 accepted updates this round"):
        guard.check("w", 0, 5.0, body_norm=10.0)
    guard.check("w", 1, 4.0, body_norm=10.0)  # round 1 starts from round 0's median (1.1)
    with pytest.raises(OutlierUpdateError, match="round 0"):
        guard.check("w", 1, 4.5, body_norm=10.0)
    NormGuard(0).check("w", 0, 1e30, body_norm=1.0)  # 0: off
