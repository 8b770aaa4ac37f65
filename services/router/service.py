"""The router's public gRPC API (`apar.v1.Apar`), a front door to the gateway (`gateway.py`).

The client's cancellation or deadline ends this handler, which closes the gateway's stream, which
cancels the worker call, which aborts the request on the worker: its KV is freed at once.

Every call but health checking passes the `GrpcGuard` interceptor first (`guard.py`): API keys and the
request size limit. With `tls` the port serves TLS only. A refusal with a retry time carries it as the
trailing metadata `retry-after` (seconds) and `grpc-retry-pushback-ms`.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import aclosing

import grpc

from apar.engine.errors import UserError
from apar.protogen import stubs
from apar.text.stitch import ThreadDelta
from apar.text.stream import Final, LinearDelta
from services.grpc_common import abort_unless_gone, add_health_and_reflection, add_servicer, write_unless_gone
from services.protocol.wire import params_from_pb
from services.router.gateway import Gateway, GatewayError
from services.router.guard import GrpcGuard, Guard, grpc_server_options
from services.security import TLSFiles, open_port

log = logging.getLogger(__name__)
pb = stubs()
A = pb.apar_pb2
MODES = {A.STREAM_MODE_UNSPECIFIED: "linear", A.STREAM_MODE_LINEAR: "linear", A.STREAM_MODE_THREADS: "threads",
         A.STREAM_MODE_FINAL: "final"}
_STATUS = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
           "unavailable": grpc.StatusCode.UNAVAILABLE, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED}
_KINDS = {"started": A.ThreadEvent.STARTED, "delta": A.ThreadEvent.DELTA, "finished": A.ThreadEvent.FINISHED}


class RouterService(pb.apar_pb2_grpc.AparServicer):
    """The gRPC front door: messages in and out; everything else is the gateway's."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.workers = gateway.workers
        self.metrics = gateway.metrics

    async def Generate(self, request, context) -> None:
        """Writes its responses itself (`context.write`), so that a write racing the caller's deadline or
        cancellation ends the call quietly instead of failing inside gRPC, out of this handler's reach."""
        try:
            if request.stream not in MODES:
                raise GatewayError("invalid", f"unknown stream mode {request.stream}")
            try:
                params = params_from_pb(request.sampling, request.limits, request.auto_regressive)
            except UserError as exc:
                raise GatewayError("invalid", str(exc)) from None
            messages = [{"role": m.role, "content": m.content} for m in request.messages] or None
            job = await self.gateway.prepare(params, request.prompt or None, messages, request.raw_prompt,
                                             tuple(request.stop))
            mode = MODES[request.stream]
            rid = uuid.uuid4().hex
            try:
                async with aclosing(self.gateway.generate(job, context.time_remaining(), rid)) as items:
                    async for item in items:
                        out = self._response(rid, item, mode)
                        if out is not None and not await write_unless_gone(context, out):
                            # the caller is gone: closing the gateway's stream cancels the worker call; no
                            # status for gRPC to send on the ended call (its failed batch leaks: grpc/grpc#43360)
                            raise asyncio.CancelledError
            finally:
                job.release()
        except GatewayError as exc:
            trailers = ()
            if exc.retry_after_s is not None:
                trailers = (("retry-after", str(exc.retry_after_s)),
                            ("grpc-retry-pushback-ms", str(exc.retry_after_s * 1000)))
            await abort_unless_gone(context, _STATUS[exc.status], exc.message, trailers)

    @staticmethod
    def _response(rid: str, item, mode: str):
        if isinstance(item, Final):
            usage = pb.common_pb2.Usage(**item.usage)
            return A.GenerateResponse(request_id=rid, index=item.index, final=A.FinalMessage(
                text=item.text, finish_reason=item.finish_reason, usage=usage, error=item.error or ""))
        if isinstance(item, LinearDelta):
            return A.GenerateResponse(request_id=rid, index=item.index, delta=item.text) if mode == "linear" else None
        if isinstance(item, ThreadDelta) and mode == "threads":
            ev = A.ThreadEvent(kind=_KINDS[item.kind], thread=item.thread, anchor=item.anchor, text=item.text,
                               finish_reason=item.reason or "")
            if item.parent is not None:
                ev.parent = item.parent
            return A.GenerateResponse(request_id=rid, index=item.index, thread=ev)
        return None

    async def ModelInfo(self, request, context):
        await self.workers.refresh(force=True)
        live = [w.info for w in self.workers.workers if w.alive and w.info is not None]
        if not live:
            await abort_unless_gone(context, grpc.StatusCode.UNAVAILABLE, "no worker is available")
            return A.ModelInfoResponse()
        first = live[0]
        return A.ModelInfoResponse(
            model=self.gateway.model_name, max_positions=first.max_positions, vocab_size=first.vocab_size,
            fork_token=first.fork_token, child_token=first.child_token, workers=len(live),
            total_kv_blocks=sum(i.num_blocks for i in live), free_kv_blocks=sum(i.free_blocks for i in live),
            autoregressive_only=first.autoregressive_only)


async def start_router_server(service: RouterService, address: str, tls: TLSFiles | None = None,
                              guard: Guard | None = None) -> tuple[grpc.aio.Server, int]:
    """The public gRPC server: plaintext, or TLS only with `tls`; the gateway's guard in front of it."""
    guard = guard or service.gateway.guard
    server = grpc.aio.server(options=grpc_server_options(guard.limits), interceptors=[GrpcGuard(guard)])
    add_servicer(server, service, A.DESCRIPTOR.services_by_name["Apar"])
    await add_health_and_reflection(server, [A.DESCRIPTOR.services_by_name["Apar"].full_name])
    port = open_port(server, address, tls)
    if port == 0:
        raise UserError(f"cannot listen on {address}")
    await server.start()
    return server, port
