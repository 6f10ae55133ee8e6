"""grpc.health.v1.Health on dept-server: open to probes without a token, never starved, NOT_SERVING on stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dept_comm.errors import NotFoundError
from dept_comm.frames import as_message
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2, service_pb2_grpc, tensor_pb2
from dept_comm.server.run import RunningServer
from dept_comm.service import SERVICE_NAME
from dept_server.config import ServerConfig
from dept_server.serve import start_dept_server
from tests.e2e.harness import wait_for
from tests.integration.servers import join_and_pull, worker_upload

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def start(**overrides: object) -> RunningServer:
    settings: dict[str, object] = {"port": 0, "rounds": 1, "workers": 1, "model": "tiny", "token": TOKEN}
    settings.update(overrides)
    return start_dept_server(ServerConfig(**settings))  # type: ignore[arg-type]


@pytest.fixture
def running() -> Iterator[RunningServer]:
    server = start()
    yield server
    server.stop(None)


@pytest.fixture
def channel(running: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        yield ch


def check(channel: grpc.Channel, service: str, timeout: float = 10) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status)


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()


def test_health_answers_without_a_token_and_nothing_else_does(channel: grpc.Channel) -> None:
    assert check(channel, "") == SERVING
    assert check(channel, SERVICE_NAME) == SERVING
    assert code_of(lambda: check(channel, "no.such.Service")) == grpc.StatusCode.NOT_FOUND

    stub = service_pb2_grpc.ParameterServerStub(channel)
    join = service_pb2.JoinRequest(source_id="sw", worker_name="sw")
    assert code_of(lambda: stub.Join(join, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Join(join, metadata=AUTH, timeout=10).worker_id
    # Only the Health service's own path is open: a look-alike is refused like any other method.
    lookalike = channel.unary_unary(
        "/grpc.health.v1.HealthCheck/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    assert code_of(lambda: lookalike(health_pb2.HealthCheckRequest(), timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def held_open(
    items: list[tensor_pb2.StreamMessage], release: threading.Event
) -> Iterator[tensor_pb2.StreamMessage]:
    """An upload's first messages, then nothing until ``release``: its handler holds an RPC thread."""
    yield from items
    release.wait(60)


@pytest.mark.timeout(180)  # joins and pulls, a 30 s wait for the held pushes, 30 s for their receipts
def test_health_answers_while_every_rpc_thread_is_busy() -> None:
    server = start(max_workers_threads=2, workers=2)
    release = threading.Event()
    client = ServerClient(f"127.0.0.1:{server.port}", token=TOKEN, timeout_s=10)
    try:
        # Two workers (a worker's second upload would supersede its first), each pushing the
        # open and first chunk of a real upload, then holding the stream open.
        uploads = {}
        sessions = {}
        for source in ("sw", "en"):
            joined = join_and_pull(client, source)
            sessions[joined.worker_id] = joined.metadata(TOKEN)
            uploads[joined.worker_id] = [
                as_message(m) for m in worker_upload(joined, chunk_bytes=4 << 10).messages[:2]
            ]
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = service_pb2_grpc.ParameterServerStub(channel)
        pushes = [
            stub.PushUpdate.future(held_open(items, release), metadata=sessions[w], timeout=60)
            for w, items in uploads.items()
        ]

        def both_held() -> bool:  # the server staged both chunks: each handler waits for more
            try:
                return all(
                    server.app.query_upload(
                        service_pb2.QueryUploadRequest(
                            worker_id=w, upload_id=as_message(items[0]).open.upload_id
                        )
                    ).num_chunks
                    == 1
                    for w, items in uploads.items()
                )
            except NotFoundError:
                return False

        wait_for(both_held, 30, "both held pushes to be inside the server's push handler")
        # The pool is full: a further call queues behind the held pushes and runs out of time...
        beat = service_pb2.HeartbeatRequest(worker_id=next(iter(uploads)))
        with pytest.raises(grpc.RpcError) as queued:
            stub.Heartbeat(beat, metadata=sessions[beat.worker_id], timeout=2)
        assert queued.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # ...while health, on its own threads, still answers.
        assert check(channel, "", timeout=10) == SERVING
        assert check(channel, SERVICE_NAME, timeout=10) == SERVING
        release.set()
        for push in pushes:  # the stream ends after one chunk: a receipt for what it holds
            assert push.result(timeout=30).num_chunks == 1
        assert stub.Heartbeat(beat, metadata=sessions[beat.worker_id], timeout=10).round.round_idx == 0
        channel.close()
    finally:
        release.set()
        client.close()
        server.stop(0)


def test_graceful_stop_reports_not_serving_and_lets_in_flight_calls_finish(
    running: RunningServer, channel: grpc.Channel
) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == SERVING

    stub = service_pb2_grpc.ParameterServerStub(channel)
    reply = stub.Join(service_pb2.JoinRequest(source_id="sw"), metadata=AUTH, timeout=10)
    worker_id, session = reply.worker_id, (*AUTH, ("dept-session", reply.session))
    poll = service_pb2.WaitRoundRequest(worker_id=worker_id, round_idx=0, timeout_ms=1_500)
    in_flight = stub.WaitRound.future(poll, metadata=session, timeout=30)
    # A served heartbeat after the poll was sent: the poll reached the server before the stop.
    stub.Heartbeat(service_pb2.HeartbeatRequest(worker_id=worker_id), metadata=session, timeout=10)

    stopper = threading.Thread(target=running.stop, args=(20.0,))
    stopper.start()
    try:
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # an open Watch is in flight too: it would hold the stop for the whole grace
        # The long poll ends on its own timeout, inside the grace period, with an answer.
        assert in_flight.result(timeout=20).round_idx == 0
    finally:
        stopper.join(timeout=30)
    assert not stopper.is_alive()
    assert code_of(lambda: check(channel, "", timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_a_stop_request_cuts_the_wait_for_departing_workers_short(running: RunningServer) -> None:
    """After the last round the server waits for workers to leave; SIGTERM must not wait it out."""
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    running.app.wait_all_left(600, stop=stop)  # no worker ever joined: only the stop ends this
    assert stop.is_set() and time.monotonic() - started < 60
