"""The worker's gRPC service: the engine behind the internal API (token ids in, thread events out).

Thin: a request is converted (`wire.params_from_pb`), handed to the engine loop, and each step's
events for it stream back as one `WorkerEvents` message. A client that cancels, disconnects or passes its
deadline ends the handler, which aborts the request: its KV blocks are free after the next command drain.
A client that does not read (its transport window full) lets at most `stream_buffer` events wait for it:
past that the request is aborted and the call ends RESOURCE_EXHAUSTED, so its memory stays bounded.
An error status for a caller already gone (its own cancel or deadline) is not sent (`abort_unless_gone`).
"""
from __future__ import annotations

import asyncio
import logging
import uuid

import grpc

from apar.engine.config import STREAM_BUFFER_EVENTS
from apar.engine.errors import UserError
from apar.engine.events import FinishReason, RequestFinished
from apar.protogen import stubs
from services.grpc_common import (abort_unless_gone, add_health_and_reflection, add_servicer, server_options, status_of,
                                 write_unless_gone)
from services.protocol.wire import events_to_pb, params_from_pb
from services.security import TLSFiles, internal_interceptors, open_port
from services.worker.loop import EngineLoop

log = logging.getLogger(__name__)
pb = stubs()
MAX_PROMPT_IDS = 1 << 20


class _Backlog:
    """A request's events on their way to its client: at most `limit` of them wait. Past that the request
    is cut off (`overflowed`): the engine aborts it (its KV blocks are free at once), later events are
    dropped, and `on_overflow` interrupts the handler wherever it waits (a write the client never reads)."""

    def __init__(self, limit: int, on_overflow) -> None:
        self.limit = limit
        self.on_overflow = on_overflow
        self.queue: asyncio.Queue = asyncio.Queue()
        self.held = 0
        self.overflowed = False

    def push(self, evs) -> None:
        """On the event loop: a step's events for the request."""
        if self.overflowed:
            return
        self.held += len(evs)
        if self.held > self.limit:
            self.overflowed = True
            self.on_overflow()
            return
        self.queue.put_nowait(evs)

    def sent(self, evs) -> None:
        self.held -= len(evs)


class WorkerService(pb.worker_pb2_grpc.WorkerServicer):
    def __init__(self, loop: EngineLoop, worker_id: str, model_name: str,
                 stream_buffer: int = STREAM_BUFFER_EVENTS) -> None:
        self.loop = loop
        self.worker_id = worker_id
        self.model_name = model_name
        self.stream_buffer = stream_buffer

    async def Generate(self, request, context) -> None:
        rid = request.request_id or uuid.uuid4().hex
        try:
            if len(rid) > 200:
                raise UserError("request_id is longer than 200 characters")
            if len(request.prompt_ids) > MAX_PROMPT_IDS:
                raise UserError("prompt is absurdly long")
            params = params_from_pb(request.sampling, request.limits, request.auto_regressive)
        except UserError as exc:
            return await abort_unless_gone(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        aloop, task = asyncio.get_running_loop(), asyncio.current_task()

        def overflow() -> None:
            self.loop.abort(rid)
            task.cancel()

        backlog = _Backlog(self.stream_buffer, overflow)

        def sink(evs):  # on the engine's thread
            aloop.call_soon_threadsafe(backlog.push, evs)

        try:
            await asyncio.wrap_future(self.loop.submit(list(request.prompt_ids), params, rid, sink,
                                                       cache_salt=request.cache_salt))
        except UserError as exc:
            return await abort_unless_gone(context, status_of(exc), str(exc))
        done = False
        try:
            while not done:
                evs = await backlog.queue.get()
                done = isinstance(evs[-1], RequestFinished)
                if not await write_unless_gone(context, events_to_pb(evs, pb)):
                    # the caller is gone (its write raced its deadline or cancellation): a quiet end, with no
                    # status for gRPC to send on the ended call (its failed batch leaks: grpc/grpc#43360)
                    raise asyncio.CancelledError
                backlog.sent(evs)
        except asyncio.CancelledError:
            if not backlog.overflowed:
                raise
            task.uncancel()
        finally:
            if not done:  # cancelled, disconnected, past its deadline or cut off: free its KV now
                self.loop.abort(rid)
        if backlog.overflowed:
            log.warning("request %s cut off: its client fell more than %d events behind", rid, self.stream_buffer)
            await abort_unless_gone(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"the client fell behind: more "
                                    f"than {self.stream_buffer} events of this request waited for it to read")

    async def Finish(self, request, context):
        self.loop.abort(request.request_id, FinishReason.STOP)
        return pb.worker_pb2.FinishResponse()

    async def Info(self, request, context):
        # plain reads of counters, not through the loop: Info answers even while a step is blocked
        # (say, on a KV manager that is restarting)
        e = self.loop.engine
        r = e.runner
        return pb.worker_pb2.WorkerInfo(
            worker_id=self.worker_id, model=self.model_name, num_blocks=e.ledger.num_blocks,
            block_size=e.ledger.block_size, free_blocks=e.ledger.num_free, running=len(e.scheduler.running),
            waiting=len(e.scheduler.waiting), fork_token=e.config.control.fork, child_token=e.config.control.child,
            max_positions=min(r.max_positions, 2**32 - 1), vocab_size=r.vocab_size,
            autoregressive_only=not e.auto_parallel, ledger=_ledger_digest(e.ledger))


def _ledger_digest(ledger):
    """The ledger's digest, read outside the engine loop (O(1) counters; a read racing a step may see a
    dict change size: then none, the next Info has one)."""
    try:
        d = ledger.digest()
    except RuntimeError:
        return None
    return pb.kvmanager_pb2.Digest(free_blocks=d.free, used_blocks=d.used, threads=d.threads, tokens=d.tokens,
                                   next_free=d.next_free, named=d.named, contents=d.contents)


async def start_worker_server(loop: EngineLoop, address: str, worker_id: str, model_name: str,
                              tls: TLSFiles | None = None, token=None,
                              stream_buffer: int = STREAM_BUFFER_EVENTS) -> tuple[grpc.aio.Server, int]:
    """Start the worker's gRPC server on `address` (host:port, port 0 picks one; or unix:PATH); returns it
    and its port. With `tls` (mutual: its CA) only peers with a certificate from that CA get an answer;
    with `token` (services/cluster_auth.py) only callers that prove the cluster token; with `tls.peer_names`
    only callers whose certificate names one of them (services/peer_names.py)."""
    server = grpc.aio.server(options=server_options(), interceptors=internal_interceptors(token, "worker", tls))
    add_servicer(server, WorkerService(loop, worker_id, model_name, stream_buffer),
                 pb.worker_pb2.DESCRIPTOR.services_by_name["Worker"])
    await add_health_and_reflection(server, [pb.worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name])
    port = open_port(server, address, tls)
    if port == 0 and not address.startswith("unix:"):
        raise UserError(f"cannot listen on {address}")
    await server.start()
    return server, port
