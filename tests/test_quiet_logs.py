"""What the logs say when clients and peers misbehave: a client's own cancellation or deadline is no ERROR
with a traceback, and a warning that repeats while a peer stays down is one line per change of state."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging

import grpc
import pytest
from grpc._cython import cygrpc

from apar.engine.errors import UserError
from apar.protogen import stubs
from apar.text.stream import LinearDelta
from services.repeating import RepeatingWarning
from services.router.gateway import GatewayError
from services.router.guard import Guard
from services.router.service import RouterService, start_router_server
from services.router.workers import KVManagerDirectory
from services.worker.service import WorkerService
from tests.procs import free_port

A = stubs().apar_pb2
W = stubs().worker_pb2


class _Context:
    """A servicer context whose call already ended: `abort` fails as gRPC's core does then."""

    def __init__(self, cancelled: bool) -> None:
        self._cancelled = cancelled
        self.aborted = 0

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._cancelled

    def time_remaining(self) -> float:
        return 0.0

    async def write(self, message):
        raise cygrpc.ExecuteBatchError("Failed \"execute_batch\": (<grpc._cython.cygrpc.SendMessageOperation object>,)")

    async def abort(self, code, message, trailers=()):
        self.aborted += 1
        raise cygrpc.ExecuteBatchError("Failed \"execute_batch\": (<grpc._cython.cygrpc.SendStatusFromServerOperation"
                                       " object>,)")


class _Gateway:
    workers = metrics = None

    def __init__(self, exc: GatewayError) -> None:
        self.exc = exc

    async def prepare(self, *args, **kwargs):
        raise self.exc


def _run_generate(exc: GatewayError, context) -> None:
    return asyncio.run(RouterService(_Gateway(exc)).Generate(A.GenerateRequest(prompt="hi"), context))


class _Job:
    released = 0

    def release(self) -> None:
        self.released += 1


class _EndlessGateway:
    """Prepares any request and streams deltas until the call ends; counts its streams opened and closed."""

    workers = metrics = None

    def __init__(self) -> None:
        self.guard = Guard()
        self.job = _Job()
        self.opened = self.closed = 0
        self.all_closed = asyncio.Event()  # set while every stream opened has closed

    async def prepare(self, *args, **kwargs):
        return self.job

    async def generate(self, job, timeout_s=None, request_id=None):
        self.opened += 1
        self.all_closed.clear()
        try:
            while True:
                yield LinearDelta("x")
                await asyncio.sleep(0)
        finally:
            self.closed += 1
            if self.closed == self.opened:
                self.all_closed.set()


def test_an_error_for_a_caller_that_cancelled_is_not_sent_and_not_raised():
    """The handler ends as one gRPC cancels (CancelledError, which gRPC logs at DEBUG), not by returning:
    gRPC would then send its own status on the ended call, a failed batch whose memory grpc.aio never
    frees (grpc/grpc#43360)."""
    ctx = _Context(cancelled=True)
    with pytest.raises(asyncio.CancelledError):
        _run_generate(GatewayError("unavailable", "no worker"), ctx)
    assert ctx.aborted == 0


def test_a_write_that_races_the_callers_deadline_ends_the_call_quietly():
    """The caller's deadline passes while the router sends a response: gRPC's core refuses the message
    (`ExecuteBatchError`). The handler ends without raising, its stream to the worker closed, its job
    released."""
    gw = _EndlessGateway()
    ctx = _Context(cancelled=False)
    with pytest.raises(asyncio.CancelledError):  # ended as gRPC ends a handler it cancels: quietly, no status
        asyncio.run(RouterService(gw).Generate(A.GenerateRequest(prompt="hi"), ctx))
    assert (gw.opened, gw.closed, gw.job.released) == (1, 1, 1)
    # and the call is aborted, so that gRPC sends no status of its own after the failed write (that one
    # would carry the initial metadata again: GRPC_CALL_ERROR_TOO_MANY_OPERATIONS, an ERROR traceback)
    assert ctx.aborted == 1


def test_a_deadline_storm_on_streams_leaves_no_error_in_the_log(caplog):
    """Many streaming calls with deadlines of a few milliseconds against a router that streams as fast as it
    can: each ends DEADLINE_EXCEEDED for the client, and the server logs no ERROR (no `ExecuteBatchError`
    traceback from a write racing the deadline), every stream to the worker closed."""
    gw = _EndlessGateway()

    async def main():
        server, port = await start_router_server(RouterService(gw), "127.0.0.1:0")
        codes = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = stubs().apar_pb2_grpc.AparStub(ch)
                for i in range(200):
                    call = stub.Generate(A.GenerateRequest(prompt="hi"), timeout=0.001 + (i % 10) * 0.002)
                    try:
                        async for _ in call:
                            pass
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code()] = codes.get(exc.code(), 0) + 1
            # the server sees each call end shortly after its client does
            await asyncio.wait_for(gw.all_closed.wait(), timeout=10)
        finally:
            await server.stop(None)
        return codes

    with caplog.at_level(logging.WARNING):
        codes = asyncio.run(main())
    assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    assert gw.opened > 0 and gw.closed == gw.opened and gw.job.released == gw.opened
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors[:3]


def test_an_abort_that_races_the_callers_deadline_raises_nothing():
    """The call's deadline passes while the router aborts it: gRPC's core refuses the status
    (`ExecuteBatchError`), which the server would log as an ERROR with a traceback if it left the handler."""
    ctx = _Context(cancelled=False)
    assert _run_generate(GatewayError("deadline", "deadline exceeded"), ctx) is None
    assert ctx.aborted == 1


def test_a_live_callers_error_is_still_its_status():
    """The abort path still ends a live call with its status (AbortError, as gRPC's own abort raises)."""
    class Live(_Context):
        async def abort(self, code, message, trailers=()):
            self.aborted += 1
            self.code = code
            raise grpc.aio.AbortError()

    ctx = Live(cancelled=False)
    ctx.time_remaining = lambda: 5.0
    try:
        _run_generate(GatewayError("invalid", "bad"), ctx)
    except grpc.aio.AbortError:
        pass
    else:
        raise AssertionError("the live call was not aborted")
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT


class _RefusingLoop:
    """An engine loop that refuses every request as the engine refuses a bad one (a UserError)."""

    submitted = aborted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        refused = concurrent.futures.Future()
        refused.set_exception(UserError("prompt is longer than the model's context"))
        return refused

    def abort(self, *args) -> None:
        self.aborted += 1


def _worker_generate(request, context, loop=None):
    """The worker's Generate on `context`, bounded: a handler that went on after its error would wait for
    events forever."""
    service = WorkerService(loop or _RefusingLoop(), "w0", "m")
    return asyncio.run(asyncio.wait_for(service.Generate(request, context), timeout=10))


def test_the_workers_error_for_a_caller_already_gone_ends_its_handler_quietly():
    """A bad request (an over-long request id) whose caller already cancelled: nothing is sent, nothing
    raised, and the request never reaches the engine."""
    loop, ctx = _RefusingLoop(), _Context(cancelled=True)
    with pytest.raises(asyncio.CancelledError):  # ended as gRPC ends a handler it cancels: quietly, no status
        _worker_generate(W.WorkerRequest(request_id="r" * 201, prompt_ids=[1]), ctx, loop)
    assert (ctx.aborted, loop.submitted) == (0, 0)


def test_the_workers_abort_racing_the_callers_deadline_raises_nothing():
    """The engine refuses the request while the caller's deadline passes: gRPC's core refuses the status
    (`ExecuteBatchError`); the handler ends there, not waiting for events of a request never started."""
    loop, ctx = _RefusingLoop(), _Context(cancelled=False)
    assert _worker_generate(W.WorkerRequest(request_id="r", prompt_ids=[1]), ctx, loop) is None
    assert (ctx.aborted, loop.submitted) == (1, 1)


def test_a_repeating_warning_is_one_line_per_change_of_state(caplog):
    rw = RepeatingWarning(logging.getLogger("t.repeat"))
    with caplog.at_level(logging.INFO, logger="t.repeat"):
        assert rw.failed(0, "UNAVAILABLE", "shard %d failed: %s", 0, "UNAVAILABLE")
        assert not any(rw.failed(0, "UNAVAILABLE", "shard %d failed: %s", 0, "UNAVAILABLE") for _ in range(19))
        assert rw.count(0) == 20
        assert rw.failed(0, "DEADLINE_EXCEEDED", "shard %d failed: %s", 0, "DEADLINE_EXCEEDED")
        assert rw.ok(0, "shard %d answers again", 0)
        assert not rw.ok(0, "shard %d answers again", 0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "was UNAVAILABLE, 20 times" in lines[1]
    assert "after 1 failed attempts" in lines[2] and caplog.records[2].levelno == logging.INFO


def test_a_kv_manager_shard_that_stays_down_is_one_warning(caplog):
    """Twenty polls of a shard nobody listens on: one "usage failed" line, not one per poll."""
    async def main():
        d = KVManagerDirectory(f"127.0.0.1:{free_port()}")
        try:
            for _ in range(20):
                await d.refresh(force=True)
        finally:
            await d.close()

    with caplog.at_level(logging.WARNING, logger="services.router.workers"):
        asyncio.run(main())
    failed = [r.getMessage() for r in caplog.records if "usage failed" in r.getMessage()]
    assert len(failed) == 1, failed


def _malformed_call(kind: str, ctx: _Context) -> list:
    """One call of `kind` (as grpc_common.add_servicer wraps a servicer method) whose request did not parse;
    returns what the method itself saw (nothing: a malformed request never reaches it)."""
    from services.grpc_common import Malformed, _each_in_order, _server_stream, _unary_async

    seen = []

    async def unary(request, context):
        seen.append(request)

    async def stream(request, context):
        seen.append(request)
        yield A.GenerateResponse()

    async def main():
        bad = Malformed("truncated message")
        if kind == "unary":
            return await _unary_async(unary, None)(bad, ctx)
        if kind == "writer":
            return await _server_stream(unary)(bad, ctx)
        if kind == "stream":
            return [r async for r in _server_stream(stream)(bad, ctx)]

        async def requests():
            yield bad
        return [r async for r in _each_in_order(unary, None)(requests(), ctx)]

    out = asyncio.run(main())
    assert out in (None, []), out
    return seen


def test_a_malformed_request_whose_caller_is_gone_ends_each_kind_of_call_quietly():
    """A request that does not parse, from a caller that already ended the call: no abort is tried. One
    whose abort races the caller's deadline: the abort's `ExecuteBatchError` is not raised (gRPC would
    log it as an ERROR with a traceback). Either way the method never sees the request."""
    for kind in ("unary", "writer", "stream", "bidi"):
        gone = _Context(cancelled=True)
        with pytest.raises(asyncio.CancelledError):  # ended as gRPC ends a handler it cancels: no status
            _malformed_call(kind, gone)
        assert gone.aborted == 0, kind
        racing = _Context(cancelled=False)
        assert _malformed_call(kind, racing) == [] and racing.aborted == 1, kind


def test_a_malformed_request_from_a_live_caller_is_still_invalid_argument():
    class Live(_Context):
        async def abort(self, code, message, trailers=()):
            self.aborted += 1
            self.code = code
            raise grpc.aio.AbortError()

    for kind in ("unary", "writer", "stream", "bidi"):
        ctx = Live(cancelled=False)
        try:
            _malformed_call(kind, ctx)
        except grpc.aio.AbortError:
            pass
        else:
            raise AssertionError(f"{kind}: the live call was not aborted")
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT, kind


def test_the_status_after_a_callers_end_is_no_error(caplog):
    """gRPC's core logs an ERROR with a traceback when the status it sends after a handler returned finds
    the call ended (the caller's cancel or deadline racing the handler's end: once in 147k requests of a
    30-minute soak). With a servicer added, that record is one DEBUG line; a failure of any other batch
    stays an ERROR with its traceback."""
    from services.grpc_common import add_servicer
    from services.worker.service import WorkerService

    add_servicer(grpc.server(concurrent.futures.ThreadPoolExecutor(1)), WorkerService(None, "w", "m"),
                 W.DESCRIPTOR.services_by_name["Worker"])
    core = logging.getLogger(cygrpc.__name__)

    def raise_in_core(ops: str) -> None:
        try:
            raise cygrpc.ExecuteBatchError(f'Failed "execute_batch": ({ops})')
        except cygrpc.ExecuteBatchError:
            core.exception("ExecuteBatchError raised in core by servicer method [%s]", "/apar.v1.Apar/Generate")

    with caplog.at_level(logging.DEBUG, logger=cygrpc.__name__):
        raise_in_core("<grpc._cython.cygrpc.SendStatusFromServerOperation object at 0x7f>,")
        raise_in_core("<grpc._cython.cygrpc.SendMessageOperation object at 0x7f>, "
                      "<grpc._cython.cygrpc.SendStatusFromServerOperation object at 0x7f>,")
    (status_only, other) = [r for r in caplog.records if r.name == cygrpc.__name__]
    assert status_only.levelno == logging.DEBUG and status_only.exc_info is None
    assert "/apar.v1.Apar/Generate" in status_only.getMessage() and "ended before its status" in status_only.getMessage()
    assert other.levelno == logging.ERROR and other.exc_info is not None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=cygrpc.__name__):  # at INFO the lowered line is not even kept
        raise_in_core("<grpc._cython.cygrpc.SendStatusFromServerOperation object at 0x7f>,")
    assert [r for r in caplog.records if r.name == cygrpc.__name__] == []
