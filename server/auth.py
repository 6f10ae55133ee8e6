"""Shared-token authentication, checked in an interceptor before any handler runs."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

TOKEN_METADATA_KEY = "authorization"


def _abort_handler(message: str) -> grpc.RpcMethodHandler[Any, None]:
    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # A unary handler also rejects streaming calls before any request message is read.
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Reject calls whose ``authorization: Bearer <token>`` metadata is missing or wrong."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._deny = _abort_handler("missing or invalid token")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                got = value.encode() if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(got, self._expected):
                    return continuation(handler_call_details)
        return self._deny
