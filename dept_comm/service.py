"""The ``dept.v1.ParameterServer`` service with stream messages sent and read as frames.

The generated ``service_pb2_grpc`` code (de)serializes every ``StreamMessage`` through protobuf,
which copies a chunk's payload twice per side. :func:`add_parameter_server` and
:class:`ParameterServerStub` register and call the same methods, under the same names and with
the same bytes on the wire, but move ``StreamMessage``s with ``dept_comm.frames.to_wire`` and
``read_wire``; every other message still goes through protobuf. Either side interoperates with a
peer that uses the generated code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from dept_comm.frames import StreamItem, WireItem, read_wire, to_wire
from dept_comm.pb import service_pb2, service_pb2_grpc
from dept_comm.pb import tensor_pb2 as pb

__all__ = ["SERVICE_NAME", "ParameterServerStub", "add_parameter_server"]

SERVICE_NAME = "dept.v1.ParameterServer"
_SERVICE = service_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
_STREAM_MESSAGE = pb.StreamMessage.DESCRIPTOR.full_name

Serializer = Callable[[Any], bytes]
Deserializer = Callable[[bytes], Any]


def _codec(descriptor: Any) -> tuple[Serializer, Deserializer]:
    """(serializer, deserializer) of one message type."""
    if descriptor.full_name == _STREAM_MESSAGE:
        return to_wire, read_wire
    cls = GetMessageClass(descriptor)
    return cls.SerializeToString, cls.FromString


def _handler(method: MethodDescriptor, servicer: Any) -> grpc.RpcMethodHandler[Any, Any]:
    _, request_deserializer = _codec(method.input_type)
    response_serializer, _ = _codec(method.output_type)
    behaviour = getattr(servicer, method.name)
    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(method.client_streaming, method.server_streaming)]
    return kind(  # type: ignore[no-any-return, operator]
        behaviour, request_deserializer=request_deserializer, response_serializer=response_serializer
    )


def add_parameter_server(servicer: object, server: grpc.Server) -> None:
    """Register ``servicer`` on ``server``, as the generated ``add_ParameterServerServicer_to_server`` does.

    ``servicer`` has the methods of ``service_pb2_grpc.ParameterServerServicer``; its stream
    methods take and yield ``dept_comm.frames.StreamItem``s.
    """
    handlers = {m.name: _handler(m, servicer) for m in _SERVICE.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


class ParameterServerStub(service_pb2_grpc.ParameterServerStub):
    """The generated stub, with its stream methods sending and reading frames."""

    PullBody: grpc.UnaryStreamMultiCallable[service_pb2.PullRequest, WireItem]  # type: ignore[assignment]
    PushUpdate: grpc.StreamUnaryMultiCallable[StreamItem, service_pb2.PushReceipt]  # type: ignore[assignment]

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)  # type: ignore[call-arg]  # the stub's .pyi declares __new__ only
        factories: dict[tuple[bool, bool], Callable[..., Any]] = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }
        for m in _SERVICE.methods:
            if _STREAM_MESSAGE not in (m.input_type.full_name, m.output_type.full_name):
                continue
            request_serializer, _ = _codec(m.input_type)
            _, response_deserializer = _codec(m.output_type)
            call = factories[(m.client_streaming, m.server_streaming)](
                f"/{SERVICE_NAME}/{m.name}",
                request_serializer=request_serializer,
                response_deserializer=response_deserializer,
                _registered_method=True,
            )
            setattr(self, m.name, call)
