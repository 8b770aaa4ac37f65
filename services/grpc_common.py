"""What every service's gRPC server shares: health checking, reflection, and errors as status codes."""
from __future__ import annotations

import grpc
from google.protobuf import message as _message
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from apar.errors import CapacityError, UserError

MAX_MESSAGE = 16 * 1024 * 1024


def server_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


async def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> health.aio.HealthServicer:
    """Standard health checking ("" and each service SERVING) and server reflection."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    return servicer


def status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, UserError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class Malformed:
    """What a request that is not a valid message deserializes to; the handler answers INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


def safe_parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except _message.DecodeError as exc:
            return Malformed(str(exc))

    return parse


def add_servicer(server: grpc.aio.Server, servicer, service_descriptor) -> None:
    """Register an aio servicer's unary-unary and unary-stream methods from the service descriptor, with
    a request parser that turns undecodable bytes into INVALID_ARGUMENT instead of an UNKNOWN failure."""
    handlers = {}
    for method in service_descriptor.methods:
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        impl = getattr(servicer, method.name)
        if method.server_streaming:
            async def stream(request, context, _impl=impl):
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
                async for item in _impl(request, context):
                    yield item

            handler = grpc.unary_stream_rpc_method_handler(stream, request_deserializer=safe_parser(req_cls),
                                                           response_serializer=resp_cls.SerializeToString)
        else:
            async def unary(request, context, _impl=impl):
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
                return await _impl(request, context)

            handler = grpc.unary_unary_rpc_method_handler(unary, request_deserializer=safe_parser(req_cls),
                                                          response_serializer=resp_cls.SerializeToString)
        handlers[method.name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers),))
