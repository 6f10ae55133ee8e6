"""gRPC adapter: decode, delegate to ServerApp, encode; DeptErrors become status codes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from dept_comm.channel import abort_with
from dept_comm.errors import DeptError
from dept_comm.frames import StreamItem, WireItem
from dept_comm.pb import service_pb2

from .app import ServerApp

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


class ParameterServerServicer:
    """Thin: every method is decode -> ServerApp -> encode (registered by dept_comm.service)."""

    def __init__(self, app: ServerApp) -> None:
        self._app = app

    def Join(self, request: service_pb2.JoinRequest, context: grpc.ServicerContext) -> service_pb2.JoinReply:
        return _guard(context, lambda: self._app.join(request))

    def PullBody(
        self, request: service_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[StreamItem]:
        messages = _guard(context, lambda: self._app.pull(request))
        for msg in messages:
            if not context.is_active():
                return
            yield msg

    def PushUpdate(
        self, request_iterator: Iterator[WireItem], context: grpc.ServicerContext
    ) -> service_pb2.PushReceipt:
        return _guard(context, lambda: self._app.push(request_iterator))

    def QueryUpload(
        self, request: service_pb2.QueryUploadRequest, context: grpc.ServicerContext
    ) -> service_pb2.PushReceipt:
        return _guard(context, lambda: self._app.query_upload(request))

    def CommitUpdate(
        self, request: service_pb2.CommitUpdateRequest, context: grpc.ServicerContext
    ) -> service_pb2.CommitReply:
        return _guard(context, lambda: self._app.commit(request))

    def WaitRound(
        self, request: service_pb2.WaitRoundRequest, context: grpc.ServicerContext
    ) -> service_pb2.RoundInfo:
        return _guard(context, lambda: self._app.wait_round(request))

    def WatchRounds(
        self, request: service_pb2.WatchRoundsRequest, context: grpc.ServicerContext
    ) -> Iterator[service_pb2.RoundEvent]:
        last = -1
        while context.is_active():
            wait = service_pb2.WaitRoundRequest(
                worker_id=request.worker_id, round_idx=max(last, 0), timeout_ms=5000
            )
            info = _guard(context, lambda wait=wait: self._app.wait_round(wait))  # type: ignore[misc]
            if info.round_idx != last:
                last = info.round_idx
                finished = info.state == service_pb2.RUN_STATE_FINISHED
                kind = (
                    service_pb2.RoundEvent.KIND_FINISHED if finished else service_pb2.RoundEvent.KIND_OPENED
                )
                yield service_pb2.RoundEvent(kind=kind, round=info)
                if finished:
                    return

    def Heartbeat(
        self, request: service_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> service_pb2.HeartbeatReply:
        return _guard(context, lambda: self._app.heartbeat(request))

    def Leave(
        self, request: service_pb2.LeaveRequest, context: grpc.ServicerContext
    ) -> service_pb2.LeaveReply:
        return _guard(context, lambda: self._app.leave(request))
