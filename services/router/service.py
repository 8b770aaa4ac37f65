"""The router: the public gRPC API (`apar.v1.Apar`).

Per request: validate and tokenize (chat template), pick the live worker with the most free KV blocks,
forward the token ids, stitch the worker's per-thread events into text (`RequestStream`) and stream it
back in the client's mode. The client's cancellation or deadline ends this handler, which cancels the
worker call, which aborts the request on the worker: its KV is freed at once.
"""
from __future__ import annotations

import logging
import time
import uuid

import grpc

from apar.errors import UserError
from apar.protogen import stubs
from services.grpc_common import add_health_and_reflection, add_servicer, server_options
from services.router.metrics import RouterMetrics
from services.router.prompt import encode_prompt
from services.router.stitch import ThreadDelta
from services.router.stream import Final, LinearDelta, RequestStream
from services.router.workers import WorkerDirectory
from services.worker.convert import events_from_pb, params_from_pb, params_to_pb

log = logging.getLogger(__name__)
pb = stubs()
A = pb.apar_pb2
MODES = {A.STREAM_MODE_UNSPECIFIED: "linear", A.STREAM_MODE_LINEAR: "linear", A.STREAM_MODE_THREADS: "threads",
         A.STREAM_MODE_FINAL: "final"}
MAX_PROMPT_CHARS = 1 << 20
MAX_MESSAGES = 256
_KINDS = {"started": A.ThreadEvent.STARTED, "delta": A.ThreadEvent.DELTA, "finished": A.ThreadEvent.FINISHED}


class RouterService(pb.apar_pb2_grpc.AparServicer):
    def __init__(self, tokenizer, workers: WorkerDirectory, model_name: str, metrics: RouterMetrics | None = None):
        self.tokenizer = tokenizer
        self.workers = workers
        self.model_name = model_name
        self.metrics = metrics or RouterMetrics()
        self.metrics.waiting.set_function(
            lambda: sum(w.info.waiting for w in workers.workers if w.alive and w.info is not None))
        self._control: tuple[int, int, set[int], int] | None = None

    async def control(self) -> tuple[int, int, set[int], int]:
        """(fork id, child id, hidden ids, max positions), from a live worker's info, looked up once."""
        if self._control is None:
            info = await self.workers.any_info()
            if info is None:
                raise ConnectionError("no worker is available")
            tok = self.tokenizer
            fork, child = tok.convert_tokens_to_ids(info.fork_token), tok.convert_tokens_to_ids(info.child_token)
            hidden = {t for t in (tok.eos_token_id,) if t is not None}
            self._control = (int(fork), int(child), hidden, int(info.max_positions))
        return self._control

    def _validate(self, request, max_positions: int):
        if request.stream not in MODES:
            raise UserError(f"unknown stream mode {request.stream}")
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise UserError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        if len(request.messages) > MAX_MESSAGES or any(len(m.content) > MAX_PROMPT_CHARS for m in request.messages):
            raise UserError("too many or too long chat messages")
        if request.prompt and request.messages:
            raise UserError("send either a prompt or chat messages, not both")
        params = params_from_pb(request.sampling, request.limits, request.auto_regressive)
        messages = [{"role": m.role, "content": m.content} for m in request.messages] or None
        ids = encode_prompt(self.tokenizer, request.prompt or None, messages, use_chat_template=not request.raw_prompt)
        if len(ids) >= max_positions:
            raise UserError(f"prompt of {len(ids)} tokens is longer than the model allows ({max_positions})")
        return params, ids, MODES[request.stream]

    async def Generate(self, request, context):
        t0 = time.perf_counter()
        self.metrics.requests.inc()
        try:
            fork, child, hidden, max_positions = await self.control()
        except ConnectionError as exc:
            self.metrics.failed.labels("unavailable").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        try:
            params, ids, mode = self._validate(request, max_positions)
        except UserError as exc:
            self.metrics.failed.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        worker = await self.workers.choose()
        if worker is None:
            self.metrics.failed.labels("unavailable").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is available")
        rid = uuid.uuid4().hex
        sampling, limits, ar = params_to_pb(params, pb)
        wreq = pb.worker_pb2.WorkerRequest(request_id=rid, prompt_ids=ids, sampling=sampling, limits=limits,
                                           auto_regressive=ar)
        remaining = context.time_remaining()
        call = worker.stub.Generate(wreq, timeout=remaining)
        stream = RequestStream(self.tokenizer, fork, child, hidden)
        first_token_at = last_token_at = None
        try:
            async for msg in call:
                for event in events_from_pb(rid, msg):
                    for item in stream.feed(event):
                        out = self._response(rid, item, mode)
                        if out is not None:
                            yield out
                now = time.perf_counter()
                if first_token_at is None:
                    first_token_at = now
                    self.metrics.ttft.observe(now - t0)
                elif last_token_at is not None:
                    self.metrics.inter_token.observe(now - last_token_at)
                last_token_at = now
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                self.metrics.failed.labels(code.name.lower()).inc()
                await context.abort(code, exc.details() or code.name)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.metrics.failed.labels("deadline").inc()
                await context.abort(code, "deadline exceeded")
            self.workers.mark_dead(worker)
            self.metrics.failed.labels("unavailable").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {worker.address} failed: {code.name}")
        finally:
            call.cancel()  # a no-op when it ended; frees the worker's KV when the client went away
        if stream.final is None:
            self.metrics.failed.labels("unavailable").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker ended the stream early")
        self.metrics.done(stream.final.usage, time.perf_counter() - t0, stream.final.finish_reason)

    def _response(self, rid: str, item, mode: str):
        if isinstance(item, Final):
            usage = pb.common_pb2.Usage(**item.usage)
            return A.GenerateResponse(request_id=rid, final=A.FinalMessage(
                text=item.text, finish_reason=item.finish_reason, usage=usage, error=item.error or ""))
        if isinstance(item, LinearDelta):
            return A.GenerateResponse(request_id=rid, delta=item.text) if mode == "linear" else None
        if isinstance(item, ThreadDelta) and mode == "threads":
            ev = A.ThreadEvent(kind=_KINDS[item.kind], thread=item.thread, anchor=item.anchor, text=item.text,
                               finish_reason=item.reason or "")
            if item.parent is not None:
                ev.parent = item.parent
            return A.GenerateResponse(request_id=rid, thread=ev)
        return None

    async def ModelInfo(self, request, context):
        await self.workers.refresh(force=True)
        live = [w.info for w in self.workers.workers if w.alive and w.info is not None]
        if not live:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is available")
        first = live[0]
        return A.ModelInfoResponse(
            model=self.model_name, max_positions=first.max_positions, vocab_size=first.vocab_size,
            fork_token=first.fork_token, child_token=first.child_token, workers=len(live),
            total_kv_blocks=sum(i.num_blocks for i in live), free_kv_blocks=sum(i.free_blocks for i in live))


async def start_router_server(service: RouterService, address: str) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=server_options())
    add_servicer(server, service, A.DESCRIPTOR.services_by_name["Apar"])
    await add_health_and_reflection(server, [A.DESCRIPTOR.services_by_name["Apar"].full_name])
    port = server.add_insecure_port(address)
    if port == 0:
        raise UserError(f"cannot listen on {address}")
    await server.start()
    return server, port
