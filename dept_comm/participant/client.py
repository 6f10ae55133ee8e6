"""ServerClient: every call to the parameter server (dept-server), each with a deadline (streams: per message), retries where safe."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import grpc

from dept_comm.channel import (
    SESSION_METADATA_KEY,
    call_with_retry,
    chunk_timeout_s,
    error_from_rpc,
    open_channel,
    retry_after_hint,
)
from dept_comm.errors import DeptError, ServerUnreachableError
from dept_comm.frames import StreamItem, WireItem, as_message
from dept_comm.parallel import check_streams, pull_striped, push_striped
from dept_comm.pb import service_pb2
from dept_comm.pipeline import PipelinedUpload
from dept_comm.progress import DEFAULT_INTERVAL_S, TransferProgress, size_of
from dept_comm.pull_resume import PullProgress
from dept_comm.service import ParameterServerStub
from dept_comm.stall import StallGuard
from dept_comm.streaming import unsent
from dept_comm.stripe_merge import PullSink, pull_striped_into

logger = logging.getLogger(__name__)
T = TypeVar("T")
WATCH_REOPEN_S = 60.0  # a WatchRounds stream is reopened this often (it first sends the current round)
_current_session: list[str] = []  # this process's latest session credential, for a Leave on a signal


def current_session() -> str | None:
    """The session credential of this process's latest join (None before one)."""
    return _current_session[-1] if _current_session else None


def stream_idle_for(min_bandwidth_mbps: float) -> float:
    """How long a pull or push may move no message: 3x what a 1 MiB chunk needs at this rate,
    within [5, 300] s."""
    return chunk_timeout_s(1 << 20, min_bandwidth_bps=min_bandwidth_mbps * 125e3)


class ServerClient:
    """A channel to dept-server; DeptErrors come back as the same classes the server raised."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        retry_attempts: int = 8,
        retry_for_s: float = 0.0,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        stream_idle_s: float | None = None,
        progress_interval_s: float = DEFAULT_INTERVAL_S,
        streams: int = 1,
    ) -> None:
        """Open the channel: TLS with ``credentials`` (``server_name`` overrides the name the server
        certificate must carry), plaintext without; ``token`` goes along as a bearer token either way.

        Pulls and pushes have no deadline as a whole (a large model over a slow link may take
        hours); one is cancelled and retried once no message moved for ``stream_idle_s`` (default:
        what a 1 MiB chunk needs at 1 Mbit/s, with 3x slack: 25 s). A pull or push that lasts
        longer than ``progress_interval_s`` logs its bytes, rate and ETA that often
        (``dept_comm.progress``). ``streams`` > 1 spreads each pull and push over that many
        concurrent streams (``dept_comm.parallel``).
        """
        check_streams(streams)
        self.streams = streams
        self.target = target
        self._channel = open_channel(target, credentials=credentials, server_name=server_name)
        self._stub = ParameterServerStub(self._channel)
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self.session: str | None = None
        self._timeout_s = timeout_s
        self._attempts = retry_attempts
        self._retry_for_s = retry_for_s
        self.stream_idle_s = stream_idle_s if stream_idle_s is not None else stream_idle_for(1.0)
        self.progress_interval_s = progress_interval_s

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The token and, once joined, the session credential: sent with every call."""
        if self.session is None:
            return self._auth
        return (*self._auth, (SESSION_METADATA_KEY, self.session))

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the channel is connected.

        Raises:
            ServerUnreachableError: no connection to the server within ``timeout_s``.
        """
        t0 = time.monotonic()
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ServerUnreachableError(self.target, time.monotonic() - t0) from None

    def _call(self, fn: Callable[[], T], *, retry: bool = True) -> T:
        """Run one call; UNAVAILABLE/DEADLINE_EXCEEDED are retried with backoff, others mapped."""
        try:
            if not retry:
                return call_with_retry(fn, attempts=1)
            return call_with_retry(fn, attempts=self._attempts, retry_for_s=self._retry_for_s)
        except grpc.RpcError as err:
            mapped = error_from_rpc(err)
            if mapped is not None:
                raise mapped from err
            raise

    def join(self, request: service_pb2.JoinRequest) -> service_pb2.JoinReply:
        """Join; the reply's session credential goes with every later call of this client."""
        reply = self._call(lambda: self._stub.Join(request, timeout=self._timeout_s, metadata=self._auth))
        self.session = reply.session or None
        _current_session[:] = [reply.session] if reply.session else []
        return reply

    def pull(self, request: service_pb2.PullRequest, *, sink: PullSink | None = None) -> list[WireItem]:
        """Receive a whole pull stream (over ``streams`` stripes at once); a cut or stalled stream
        goes on from its first missing chunk (see ``dept_comm.pull_resume``). ``sink`` gets each
        message kept as it arrives (and ``restart`` when the server began another stream), so it
        can decode while receiving; an error it raises cancels the pull and is raised. The
        stripes of a striped pull reach ``sink`` merged as they arrive, in seq order
        (``dept_comm.stripe_merge``: at most a few chunks per stripe wait in between).

        Returns the stream's messages; with a ``sink``, only the open and the commit: the chunks
        went to the sink and are not held twice (a body-sized saving)."""
        if self.streams == 1:
            return self._pull_stream(request, sink=sink)
        if sink is not None:
            return pull_striped_into(
                lambda stripe, into: self._pull_stream(stripe, sink=into), request, self.streams, sink
            )
        return pull_striped(self._pull_stream, request, self.streams)

    def _pull_stream(
        self, request: service_pb2.PullRequest, *, sink: PullSink | None = None
    ) -> list[WireItem]:
        """One pull stream (or one stripe of one), resumed after a cut; see ``pull``."""
        progress = PullProgress(request, keep_chunks=sink is None)
        watch = TransferProgress("pull", interval_s=self.progress_interval_s)

        def once() -> list[WireItem]:
            with StallGuard(self.stream_idle_s) as guard:  # a stall leaves as StalledStreamError
                call = self._stub.PullBody(progress.next_request(), metadata=self._metadata)
                guard.on_stall(call.cancel)
                try:
                    for msg in watch.wrap(guard.guarded(call)):
                        kept = progress.add(msg)
                        if sink is not None and kept is not None:
                            if kept == "afresh":
                                sink.restart()
                            sink.add(msg)
                finally:
                    call.cancel()  # type: ignore[no-untyped-call]  # a no-op once the stream ended
            return progress.messages()

        messages = self._call(once)
        if progress.resumes:
            logger.info("pull_resumed times=%d chunks=%d", progress.resumes, progress.next_seq)
        return messages

    def push(self, messages: Sequence[StreamItem]) -> service_pb2.PushReceipt:
        """Stream an upload (open first; over ``streams`` stripes at once); after a cut, resend
        only what the server does not hold."""
        if self.streams == 1:
            return self._push_stream(messages)
        opened = as_message(messages[0]).open
        return push_striped(
            self._push_stream,
            messages,
            self.streams,
            query=lambda: self.query_upload(opened.sender_id, opened.upload_id),
        )

    def _push_stream(self, messages: Sequence[StreamItem]) -> service_pb2.PushReceipt:
        """One stream of an upload (open first); after a cut, resend only what the server lacks.

        A :class:`~dept_comm.pipeline.PipelinedUpload` is sent as it is encoded (its first attempt
        has no known total for progress); a retry waits for the whole of it. Its encoder's error
        is raised once the stream ended.

        Each retry asks ``QueryUpload`` for the server's receipt and sends the open plus the
        chunks it lacks; if the server has no such upload (it never saw the open, or dropped the
        upload), everything goes again. Identical chunks are kept once, so a resend is harmless.
        """
        opened = as_message(messages[0]).open
        attempts = 0

        def once() -> service_pb2.PushReceipt:
            nonlocal attempts
            attempts += 1
            todo: Sequence[StreamItem] = messages
            if attempts > 1:
                try:
                    receipt = self._query_once(opened.sender_id, opened.upload_id)
                except grpc.RpcError as err:
                    if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.NOT_FOUND:
                        raise  # UNAVAILABLE and the like: call_with_retry tries again
                else:
                    todo = unsent(messages, receipt)
                    logger.info(
                        "push_resume upload=%s held=%d resending=%d of %d chunks",
                        opened.upload_id,
                        receipt.num_chunks,
                        len(todo) - 1,
                        len(messages) - 1,
                    )
            stream: Iterable[StreamItem] = todo
            total: int | None = None
            if isinstance(todo, PipelinedUpload):
                done = todo.done
                stream = todo.follow()  # sent as it is encoded
                total = sum(size_of(m) for m in todo) if done else None
            else:
                # Sized by index: iterating ``todo`` is what sends it (a caller may hand in a sequence
                # whose iteration is the stream itself).
                total = sum(size_of(todo[i]) for i in range(len(todo)))
            watch = TransferProgress("push", total_bytes=total, interval_s=self.progress_interval_s)
            with StallGuard(self.stream_idle_s) as guard:  # a stall leaves as StalledStreamError
                sent = watch.wrap(guard.guarded(iter(stream)))
                future = self._stub.PushUpdate.future(sent, metadata=self._metadata)
                guard.on_stall(future.cancel)
                receipt = future.result()
            if isinstance(todo, PipelinedUpload):
                todo.wait()  # an encoder's error: the stream ended early
            return receipt

        return self._call(once)

    def query_upload(self, worker_id: str, upload_id: str) -> service_pb2.PushReceipt:
        """What the server holds of an open upload (NotFoundError once it was dropped or counted)."""
        return self._call(lambda: self._query_once(worker_id, upload_id))

    def _query_once(self, worker_id: str, upload_id: str) -> service_pb2.PushReceipt:
        request = service_pb2.QueryUploadRequest(worker_id=worker_id, upload_id=upload_id)
        return self._stub.QueryUpload(request, timeout=self._timeout_s, metadata=self._metadata)

    def commit(self, request: service_pb2.CommitUpdateRequest) -> service_pb2.CommitReply:
        # Idempotent on the server (same upload id -> same answer), so retrying is safe.
        return self._call(
            lambda: self._stub.CommitUpdate(request, timeout=self._timeout_s, metadata=self._metadata)
        )

    def watch_rounds(
        self, worker_id: str, *, reopen_s: float = WATCH_REOPEN_S
    ) -> Iterator[service_pb2.RoundInfo]:
        """The round as this worker sees it: now, then each time a round opens, until the run finishes.

        One WatchRounds stream (it holds no server thread), reopened every ``reopen_s`` and after a
        cut link (with jittered back-off, ``retry_attempts`` failures in a row at most; an
        overloaded server's retry hint is honoured). Errors the server names come back as DeptErrors.
        """
        request = service_pb2.WatchRoundsRequest(worker_id=worker_id)
        failures = 0
        while True:
            call = self._stub.WatchRounds(request, timeout=reopen_s, metadata=self._metadata)
            try:
                for event in call:
                    failures = 0
                    yield event.round
                    if event.kind == service_pb2.RoundEvent.KIND_FINISHED:
                        return
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the periodic reopen
                hint = retry_after_hint(err)
                if code != grpc.StatusCode.UNAVAILABLE and hint is None:
                    mapped = error_from_rpc(err)
                    if mapped is not None:
                        raise mapped from err
                    raise
                failures += 1
                if failures >= self._attempts:
                    raise
                delay = random.uniform(hint, 2 * hint) if hint is not None else random.uniform(0, 2**failures)
                logger.warning("watch_retry failures=%d code=%s delay_s=%.2f", failures, code, delay)
                time.sleep(min(delay, 20.0))
            finally:
                call.cancel()  # type: ignore[no-untyped-call]
            # The server ended the stream without a finish (it is stopping): reopen after a moment.
            time.sleep(random.uniform(0.5, 1.5))

    def heartbeat(self, request: service_pb2.HeartbeatRequest) -> service_pb2.HeartbeatReply:
        return self._call(
            lambda: self._stub.Heartbeat(request, timeout=self._timeout_s, metadata=self._metadata)
        )

    def leave(self, request: service_pb2.LeaveRequest) -> None:
        try:
            self._call(
                lambda: self._stub.Leave(request, timeout=self._timeout_s, metadata=self._metadata),
                retry=False,
            )
        except (DeptError, grpc.RpcError) as err:
            logger.warning("leave failed: %s", err)
