"""What every service's gRPC server shares: health checking, reflection, and errors as status codes."""
from __future__ import annotations

import asyncio
import inspect
import logging

import grpc
from grpc._cython import cygrpc
from google.protobuf import message as _message
from google.protobuf import message_factory

from apar.engine.errors import CapacityError, UserError

MAX_MESSAGE = 16 * 1024 * 1024
_log = logging.getLogger(__name__)


def host_of(address: str) -> str:
    """The host of a `host:port` address (`[::1]:50051` -> `::1`), for binding a service's other ports."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def server_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


async def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> "health.aio.HealthServicer":
    """Standard health checking ("" and each service SERVING) and server reflection. (Imported here: the
    CLI and the interceptors import this module on machines without grpc_health, such as the GPU one.)"""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    return servicer


# ---- interceptors' building blocks: a handler of the same kind with another behavior -------------------
def handler_like(handler, behavior, deserializer):
    """A handler of `handler`'s kind with another behavior and request deserializer."""
    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)


def behavior_of(handler):
    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    return getattr(handler, kind)


async def responses(call):
    """The responses of a client call's server stream (`call`, a unary-stream or stream-stream call), as
    `async for msg in call` would give them, but with no gRPC read ever left pending in a cancelled task.

    grpc.aio never frees the native memory of a batch whose awaiting task is cancelled (grpc/grpc#43360):
    cancelling the task that waits in `async for msg in call` (the caller's cancellation, deadline or
    disconnect reaching it) leaves about 250 B behind per call. Here each read runs in a task of its own,
    awaited through `asyncio.shield`: when the consumer is cancelled, the call is cancelled at gRPC's level
    (`call.cancel()`, which frees the server's work as before) and the pending read ends by itself, its
    batch completing normally. Statuses are raised as `async for` raises them (`grpc.aio.AioRpcError`)."""
    while True:
        read = asyncio.ensure_future(call.read())
        try:
            msg = await asyncio.shield(read)
        except asyncio.CancelledError:
            if not read.done():
                call.cancel()
                read.add_done_callback(_retrieved)
            raise
        if msg is grpc.aio.EOF:
            return
        yield msg


def _retrieved(task: asyncio.Future) -> None:
    """A done callback that marks the task's outcome (CANCELLED, most likely) as seen."""
    if not task.cancelled():
        task.exception()


async def abort_unless_gone(context, code: grpc.StatusCode, message: str, trailers=()) -> None:
    """End the RPC with `code`; nothing to do (and nothing to log) when the caller already ended it. An
    abort racing the caller's deadline or cancellation fails in gRPC's core (`ExecuteBatchError`, an
    ERROR with a traceback in the server's log): that is the client's own end, not the server's fault.

    When the caller is already gone this raises `asyncio.CancelledError`, ending the handler as gRPC ends
    one it cancels itself: with no status at all. A handler that returned instead would have gRPC send its
    status on the ended call, a batch that fails, and grpc.aio never frees a failed batch's native memory
    (grpc/grpc#43360)."""
    if context.cancelled() or context.done():
        _log.debug("not answering %s (%s): the caller already ended the call", code.name, message)
        raise asyncio.CancelledError
    try:
        await context.abort(code, message, trailers)
    except cygrpc.ExecuteBatchError:
        _log.debug("not answering %s (%s): the call ended meanwhile", code.name, message)


async def write_unless_gone(context, message) -> bool:
    """Send one response of a server stream with `context.write`; False when the caller already ended the
    call (cancelled, past its deadline, disconnected): the handler should then end quietly. A write racing
    the caller's end fails in gRPC's core (`ExecuteBatchError`); when gRPC writes what an async generator
    yields, that failure is raised where no handler can catch it, an ERROR with a traceback in the log.

    A failed first write leaves gRPC believing the initial metadata unsent, though its batch carried it:
    the status gRPC sends when the handler returns would carry it again and fail the same way
    (`GRPC_CALL_ERROR_TOO_MANY_OPERATIONS`, logged with a traceback). So a failed write also aborts the
    call: gRPC then sends no status of its own. A caller found gone then raises `asyncio.CancelledError`
    (see `abort_unless_gone`); on False the handler should raise it too, rather than return."""
    if context.cancelled() or context.done():
        return False
    try:
        await context.write(message)
    except (cygrpc.ExecuteBatchError, cygrpc.AbortError) as exc:
        _log.debug("not sending a response: the call ended meanwhile")
        if isinstance(exc, cygrpc.ExecuteBatchError):
            await abort_unless_gone(context, grpc.StatusCode.CANCELLED, "the call ended")
        return False
    except cygrpc.UsageError:  # "write on a finished RPC": only the caller's end explains it here
        if context.cancelled() or context.done():
            return False
        raise
    return True


def aborting_handler(handler, code: grpc.StatusCode, message: str):
    """A handler that refuses the call without parsing its request."""
    if handler.response_streaming:
        async def behavior(request, context):
            await context.abort(code, message)
            yield  # pragma: no cover (an async generator, as the kind requires)
    else:
        async def behavior(request, context):
            await context.abort(code, message)
    return handler_like(handler, behavior, lambda raw: None)


def handler_with_trailers(handler, trailers: tuple[tuple[str, str], ...]):
    """`handler` with `trailers` set as the call's trailing metadata before it runs. A blocking behavior
    stays blocking (the server runs it in its thread pool)."""
    inner = behavior_of(handler)
    if inspect.isasyncgenfunction(inner):
        async def behavior(request, context):
            context.set_trailing_metadata(trailers)
            async for item in inner(request, context):
                yield item
    elif asyncio.iscoroutinefunction(inner):
        async def behavior(request, context):
            context.set_trailing_metadata(trailers)
            return await inner(request, context)
    else:
        def behavior(request, context):
            context.set_trailing_metadata(trailers)
            return inner(request, context)
    return handler_like(handler, behavior, handler.request_deserializer)


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


class StatusAfterTheEnd(logging.Filter):
    """gRPC's own ERROR, with a traceback, when the status it sends after a handler returned finds the call
    already ended (`ExecuteBatchError` on `SendStatusFromServerOperation` alone, "raised in core by
    servicer method"): the caller cancelled, or its deadline passed, between the handler's last write and
    its end. That is the client's own end, which no handler can see coming; it is lowered to DEBUG, one
    line without the traceback. Any other failure in gRPC's core stays an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if (isinstance(exc, cygrpc.ExecuteBatchError) and str(record.msg).startswith("ExecuteBatchError raised in core")
                and "SendStatusFromServerOperation" in str(exc) and str(exc).count("Operation object") == 1):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg = f"{record.getMessage()}: the call ended before its status (the caller's cancel or deadline)"
            record.args, record.exc_info, record.exc_text = (), None, None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_STATUS_AFTER_THE_END = StatusAfterTheEnd()


def add_servicer(server: grpc.aio.Server, servicer, service_descriptor, errors=None) -> None:
    """Register a servicer's methods from the service descriptor, with a request parser that turns
    undecodable bytes into INVALID_ARGUMENT instead of an UNKNOWN failure.

    `servicer.Method(request, context)` may be a coroutine (run on the event loop) or a plain function
    (run in the server's thread pool: it may block, e.g. on Redis); a server-streaming one yields its
    responses, or (a coroutine) writes them with `context.write`. A bidirectional-streaming one is `async Method(request)` called once per request of the
    stream, answering it in order. `errors(exc) -> (status code, message)`, when given, turns what a
    method raises into a status (the stream ends on the first); without it, methods handle their own.
    """
    core_log = logging.getLogger(cygrpc.__name__)
    if _STATUS_AFTER_THE_END not in core_log.filters:
        core_log.addFilter(_STATUS_AFTER_THE_END)
    handlers = {}
    for method in service_descriptor.methods:
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        impl = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            make, handler = grpc.stream_stream_rpc_method_handler, _each_in_order(impl, errors)
        elif method.server_streaming:
            make, handler = grpc.unary_stream_rpc_method_handler, _server_stream(impl)
        elif asyncio.iscoroutinefunction(impl):
            make, handler = grpc.unary_unary_rpc_method_handler, _unary_async(impl, errors)
        else:
            make, handler = grpc.unary_unary_rpc_method_handler, _unary_blocking(impl, errors)
        handlers[method.name] = make(handler, request_deserializer=safe_parser(req_cls),
                                     response_serializer=resp_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers),))


def _malformed(request) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(request, Malformed):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}"
    return None


def _server_stream(impl):
    if not inspect.isasyncgenfunction(impl):  # a coroutine that writes its responses (context.write)
        async def writer(request, context):
            if (status := _malformed(request)) is not None:
                return await abort_unless_gone(context, *status)
            await impl(request, context)

        return writer

    async def handler(request, context):
        if (status := _malformed(request)) is not None:
            await abort_unless_gone(context, *status)
            return
        async for item in impl(request, context):
            yield item

    return handler


def _unary_async(impl, errors):
    async def handler(request, context):
        status = _malformed(request)
        if status is None:
            try:
                return await impl(request, context)
            except Exception as exc:
                if errors is None:
                    raise
                status = errors(exc)
        await abort_unless_gone(context, *status)  # the caller gone: no response is sent
        return None

    return handler


def _unary_blocking(impl, errors):
    def handler(request, context):
        status = _malformed(request)
        if status is None:
            try:
                return impl(request, context)
            except Exception as exc:  # the status is set below, outside the except (abort raises)
                if errors is None:
                    raise
                status = errors(exc)
        context.abort(*status)

    return handler


def _each_in_order(impl, errors):
    async def handler(requests, context):
        async for request in requests:
            status = _malformed(request)
            if status is None:
                try:
                    response = await impl(request)
                except Exception as exc:
                    if errors is None:
                        raise
                    status = errors(exc)
            if status is not None:
                await abort_unless_gone(context, *status)
                return
            yield response

    return handler
