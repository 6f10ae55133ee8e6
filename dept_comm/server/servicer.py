"""gRPC adapter: decode, delegate to ServerApp, encode; DeptErrors become status codes.

Every call but Join must carry the caller's session credential (``dept-session`` metadata, issued
by Join) and may act only for the worker it was issued to: each handler checks it before the app
sees the request, so a refused call changes nothing.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any, TypeVar

import grpc

from dept_comm.channel import SESSION_METADATA_KEY, abort_with
from dept_comm.errors import DeptError
from dept_comm.frames import StreamItem, WireItem, kind_of
from dept_comm.pb import service_pb2
from dept_comm.pb import tensor_pb2 as pb

from .app import ServerApp
from .auth import TOKEN_METADATA_KEY

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _guard(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    """Run one handler body; a DeptError aborts with its status, anything else is logged and INTERNAL."""
    try:
        return fn()
    except DeptError as err:
        abort_with(context, err)
    except Exception:
        logger.exception("handler failed")
        context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        raise  # unreachable: abort raises


def _metadata(context: grpc.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else bytes(v).decode(errors="replace")
    return None


def _cert_names(context: grpc.ServicerContext) -> list[str] | None:
    """The client certificate's common name and DNS names (mutual TLS), or None without one."""
    auth = context.auth_context() or {}
    names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
    if not names:
        return None
    return [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]


class ParameterServerServicer:
    """Thin: every method is check the session -> decode -> ServerApp -> encode (registered by dept_comm.service)."""

    def __init__(self, app: ServerApp) -> None:
        self._app = app

    def _authorize(self, context: grpc.ServicerContext, worker_id: str) -> None:
        """Only ``worker_id``'s own session may act for it (UNAUTHENTICATED / PERMISSION_DENIED)."""
        self._app.sessions.authorize(_metadata(context, SESSION_METADATA_KEY), worker_id)

    def Join(self, request: service_pb2.JoinRequest, context: grpc.ServicerContext) -> service_pb2.JoinReply:
        def join() -> service_pb2.JoinReply:
            auth = _metadata(context, TOKEN_METADATA_KEY)
            bearer = auth.removeprefix("Bearer ") if auth is not None else None
            return self._app.join(request, bearer=bearer, cert_names=_cert_names(context))

        return _guard(context, join)

    def PullBody(
        self, request: service_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[StreamItem]:
        self._guarded_check(context, request.worker_id)
        started = _guard(context, lambda: self._app.streams.acquire("pull"))
        try:
            messages = _guard(context, lambda: self._app.pull(request))
            with closing(self._app.inflight.track("pull", messages)) as tracked:
                for msg in tracked:
                    if not context.is_active():
                        return
                    yield msg
        finally:
            self._app.streams.release(started)

    def _guarded_check(self, context: grpc.ServicerContext, worker_id: str) -> None:
        _guard(context, lambda: self._authorize(context, worker_id))

    def PushUpdate(
        self, request_iterator: Iterator[WireItem], context: grpc.ServicerContext
    ) -> service_pb2.PushReceipt:
        def push() -> service_pb2.PushReceipt:
            session = _metadata(context, SESSION_METADATA_KEY)
            owner = self._app.sessions.owner(session)  # before reading anything
            it = iter(request_iterator)
            first = next(it, None)
            if isinstance(first, pb.StreamMessage) and kind_of(first) == "open":
                self._app.sessions.authorize(session, first.open.sender_id)
            elif first is None:
                self._app.sessions.authorize(session, owner)
            with self._app.streams.slot("push"), self._app.read_ahead.reading(it) as ahead:
                rest: Iterator[Any] = ahead if first is None else itertools.chain([first], ahead)
                with closing(self._app.inflight.track("push", rest)) as tracked:
                    return self._app.push(tracked)

        return _guard(context, push)

    def QueryUpload(
        self, request: service_pb2.QueryUploadRequest, context: grpc.ServicerContext
    ) -> service_pb2.PushReceipt:
        self._guarded_check(context, request.worker_id)
        return _guard(context, lambda: self._app.query_upload(request))

    def CommitUpdate(
        self, request: service_pb2.CommitUpdateRequest, context: grpc.ServicerContext
    ) -> service_pb2.CommitReply:
        self._guarded_check(context, request.worker_id)
        return _guard(context, lambda: self._app.commit(request))

    def WaitRound(
        self, request: service_pb2.WaitRoundRequest, context: grpc.ServicerContext
    ) -> service_pb2.RoundInfo:
        self._guarded_check(context, request.worker_id)
        return _guard(context, lambda: self._app.wait_round(request))

    def WatchRounds(
        self,
        request: service_pb2.WatchRoundsRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[service_pb2.RoundEvent | None], None],
    ) -> None:
        """Non-blocking (see server.watch): registers the stream and returns; holds no thread."""
        self._guarded_check(context, request.worker_id)
        key = _guard(context, lambda: self._app.watchers.add(request.worker_id, send_response_callback))
        context.add_callback(lambda: self._app.watchers.remove(key))

    WatchRounds.experimental_non_blocking = True  # type: ignore[attr-defined]

    def Heartbeat(
        self, request: service_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> service_pb2.HeartbeatReply:
        self._guarded_check(context, request.worker_id)
        return _guard(context, lambda: self._app.heartbeat(request))

    def Leave(
        self, request: service_pb2.LeaveRequest, context: grpc.ServicerContext
    ) -> service_pb2.LeaveReply:
        self._guarded_check(context, request.worker_id)
        return _guard(context, lambda: self._app.leave(request))
