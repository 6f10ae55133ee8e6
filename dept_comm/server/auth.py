"""Shared-token authentication, checked in an interceptor before any handler runs."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

TOKEN_METADATA_KEY = "authorization"
# grpc.health.v1.Health answers probes (load balancers, orchestrators) that hold no token; it tells
# only whether the server is serving. Method paths are matched exactly by gRPC, so this prefix
# admits the Health service's methods and nothing else.
PUBLIC_METHOD_PREFIX = "/grpc.health.v1.Health/"


def _abort_like(
    handler: grpc.RpcMethodHandler[Any, Any] | None, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as ``handler`` (unary/streaming) that only aborts."""

    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def abort_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield from ()

    streaming_in = handler is not None and handler.request_streaming
    streaming_out = handler is not None and handler.response_streaming
    if streaming_in and streaming_out:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if streaming_in:
        return grpc.stream_unary_rpc_method_handler(abort)
    if streaming_out:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Reject calls whose ``authorization: Bearer <token>`` metadata is missing or not one of ``tokens``
    (the shared ``--token``, or any per-worker token of ``--tokens``; which name a per-worker
    token may join as is checked at Join, see ``server.sessions``).

    Health-service calls (``PUBLIC_METHOD_PREFIX``) pass without a token.
    """

    def __init__(self, tokens: str | Iterable[str]) -> None:
        listed = [tokens] if isinstance(tokens, str) else list(tokens)
        if not listed:
            raise ValueError("TokenInterceptor needs at least one token")
        self._expected = [f"Bearer {t}".encode() for t in listed]

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if handler_call_details.method.startswith(PUBLIC_METHOD_PREFIX):
            return continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                got = value.encode() if isinstance(value, str) else bytes(value)
                # Every listed token is compared (no early exit): the time taken tells nothing.
                if sum(hmac.compare_digest(got, e) for e in self._expected):
                    return continuation(handler_call_details)
        # Looking the handler up runs nothing; it tells which kind of abort handler to return.
        return _abort_like(continuation(handler_call_details), "missing or invalid token")
