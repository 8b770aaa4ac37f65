"""The router's one code path behind its two front doors (gRPC `apar.v1.Apar` and the OpenAI-compatible
HTTP API): validate and tokenize, pick a worker (in cluster mode by the prompt's cached prefix and the
load: `workers.prefix_choice`), forward the token ids, stitch the worker's per-thread events into stream
items, apply stop strings, and end the worker's request when the caller goes away.

Errors leave as `GatewayError` with a status each front door maps to its own codes: `invalid` (gRPC
INVALID_ARGUMENT, HTTP 400), `exhausted` (RESOURCE_EXHAUSTED, 429), `unavailable` (UNAVAILABLE, 503),
`deadline` (DEADLINE_EXCEEDED, 504). A caller that stops iterating (a client that disconnected, a
cancelled RPC) closes the generator, which cancels the worker call: the worker frees the request's KV
blocks at once.

The limits (`guard.py`) are applied here for both doors, first thing in `prepare`, before any
tokenization or worker call: the largest `max_tokens`, requests per second per key, concurrent requests
per key (a `Ticket` the job holds until its stream ends); the longest prompt right after tokenization.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from apar.engine.errors import UserError
from apar.engine.params import SamplingParams
from apar.protogen import stubs
from apar.text.prompt import encode_prompt
from apar.text.stream import Final, RequestStream, StreamItem
from services.grpc_common import responses
from services.protocol.wire import events_from_pb, params_to_pb
from services.router.guard import Caller, Guard, Refused, Ticket, current_caller
from services.router.metrics import RouterMetrics
from services.router.workers import WorkerDirectory

log = logging.getLogger(__name__)
pb = stubs()
MAX_PROMPT_CHARS = 1 << 20
MAX_MESSAGES = 256
MAX_STOP = 8  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 256


class GatewayError(Exception):
    def __init__(self, status: str, message: str, retry_after_s: int | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status  # invalid, exhausted, unavailable, deadline
        self.message = message
        self.retry_after_s = retry_after_s
        self.param, self.code = param, code  # for OpenAI's error shape

    @classmethod
    def of(cls, exc: Refused) -> GatewayError:
        return cls(exc.status, exc.message, exc.retry_after_s, exc.param, exc.code)


@dataclass(frozen=True, slots=True)
class Job:
    """A validated request: the prompt's token ids, how to sample, the stop strings."""

    ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    ticket: Ticket | None = field(default=None, compare=False, repr=False)  # released when its stream ends
    cache_salt: int = 0  # its caller's prefix-cache salt (guard.Caller)

    def release(self) -> None:
        if self.ticket is not None:
            self.ticket.release()


@dataclass(frozen=True, slots=True)
class ModelControl:
    """What the router needs of the served model, from a live worker's info: the control tokens' ids in
    the router's tokenizer (None for a model without them, which serves auto-regressively only), the ids
    never shown in text, and the context length."""

    fork: int | None
    child: int | None
    hidden: frozenset[int]
    max_positions: int
    fork_token: str
    child_token: str

    @property
    def auto_parallel(self) -> bool:
        return self.fork is not None


class Gateway:
    def __init__(self, tokenizer, workers: WorkerDirectory, model_name: str, metrics: RouterMetrics | None = None,
                 guard: Guard | None = None):
        self.tokenizer = tokenizer
        self.workers = workers
        self.model_name = model_name
        self.metrics = metrics or RouterMetrics(model_name)
        self.guard = guard or Guard()
        self._control: ModelControl | None = None

    async def control(self) -> ModelControl:
        """The served model's control tokens and context, from a live worker's info, looked up once."""
        if self._control is None:
            info = await self.workers.any_info()
            if info is None:
                raise GatewayError("unavailable", "no worker is available")
            tok = self.tokenizer
            fork = child = None
            if not info.autoregressive_only:
                fork, child = tok.convert_tokens_to_ids(info.fork_token), tok.convert_tokens_to_ids(info.child_token)
                fork, child = int(fork), int(child)
            hidden = frozenset(t for t in (tok.eos_token_id,) if t is not None)
            self._control = ModelControl(fork, child, hidden, int(info.max_positions), info.fork_token,
                                         info.child_token)
        return self._control

    async def prepare(self, params: SamplingParams, prompt: str | None = None, messages: list[dict] | None = None,
                      raw_prompt: bool = False, stop: tuple[str, ...] = (), caller: Caller | None = None) -> Job:
        """Check and tokenize a request; GatewayError `invalid` names what is wrong, `exhausted` a per-key
        limit. The job holds the caller's place among its concurrent requests until `generate` ends."""
        self.metrics.requests.inc()
        caller = caller or current_caller()
        try:
            self.guard.check_max_tokens(caller, params.max_tokens)
            ticket = self.guard.admit(caller, params.n)
        except Refused as exc:
            self.metrics.failed.labels("resource_exhausted" if exc.status == "exhausted" else "invalid").inc()
            raise GatewayError.of(exc) from None
        try:
            return await self._prepare(params, prompt, messages, raw_prompt, stop, caller, ticket)
        except BaseException:
            ticket.release()
            raise

    async def _prepare(self, params, prompt, messages, raw_prompt, stop, caller: Caller, ticket: Ticket) -> Job:
        try:
            max_positions = (await self.control()).max_positions
        except GatewayError:
            self.metrics.failed.labels("unavailable").inc()
            raise
        try:
            if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
                raise UserError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
            if messages is not None and (len(messages) > MAX_MESSAGES or any(
                    len(str(m.get("content", ""))) > MAX_PROMPT_CHARS for m in messages if isinstance(m, dict))):
                raise UserError("too many or too long chat messages")
            if prompt and messages:
                raise UserError("send either a prompt or chat messages, not both")
            if len(stop) > MAX_STOP or any(not isinstance(s, str) or len(s) > MAX_STOP_CHARS for s in stop):
                raise UserError(f"stop: at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters")
            ids = encode_prompt(self.tokenizer, prompt or None, messages or None, use_chat_template=not raw_prompt)
            self.guard.check_prompt_tokens(caller, len(ids), "messages" if messages else "prompt")
            if len(ids) >= max_positions:
                raise UserError(f"prompt of {len(ids)} tokens is longer than the model allows ({max_positions})")
        except UserError as exc:
            self.metrics.failed.labels("invalid").inc()
            raise GatewayError("invalid", str(exc)) from None
        except Refused as exc:
            self.metrics.failed.labels("invalid").inc()
            raise GatewayError.of(exc) from None
        return Job(ids, params, tuple(s for s in stop if s), ticket, caller.cache_salt)

    async def generate(self, job: Job, timeout_s: float | None = None,
                       request_id: str | None = None) -> AsyncIterator[StreamItem]:
        """Run a prepared request on a worker; yields stream items, the `Final`s (one per answer) last.
        The job's place among its caller's concurrent requests is given back when this ends."""
        worker = None
        try:
            t0 = time.perf_counter()
            control = await self.control()
            worker = await self.workers.choose(job.ids, job.cache_salt)
            if worker is None:
                self.metrics.failed.labels("unavailable").inc()
                raise GatewayError("unavailable", "no worker is available")
            rid = request_id or uuid.uuid4().hex
            sampling, limits, ar = params_to_pb(job.params, pb)
            call = worker.stub.Generate(pb.worker_pb2.WorkerRequest(
                request_id=rid, prompt_ids=job.ids, sampling=sampling, limits=limits, auto_regressive=ar,
                cache_salt=job.cache_salt),
                timeout=timeout_s)
            stream = RequestStream(self.tokenizer, control.fork, control.child, control.hidden, stop=job.stop)
            first_token_at = last_token_at = None
            finishing = False
            try:
                async for msg in responses(call):  # no read left pending when cancelled (grpc/grpc#43360)
                    for event in events_from_pb(rid, msg):
                        for item in stream.feed(event):
                            yield item
                    if stream.all_stopped and not finishing:  # every answer hit a stop string: end it now
                        finishing = True
                        await self._finish_on_worker(worker, rid)
                    now = time.perf_counter()
                    if first_token_at is None:
                        first_token_at = now
                        self.metrics.ttft.observe(now - t0)
                    elif last_token_at is not None:
                        self.metrics.inter_token.observe(now - last_token_at)
                    last_token_at = now
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    self.metrics.failed.labels("invalid").inc()
                    raise GatewayError("invalid", exc.details() or code.name) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.metrics.failed.labels("resource_exhausted").inc()
                    raise GatewayError("exhausted", exc.details() or code.name, retry_after_s=1) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self.metrics.failed.labels("deadline").inc()
                    raise GatewayError("deadline", "deadline exceeded") from None
                self.workers.mark_dead(worker)
                self.metrics.failed.labels("unavailable").inc()
                raise GatewayError("unavailable", f"worker {worker.address} failed: {code.name}") from None
            finally:
                call.cancel()  # a no-op when it ended; frees the worker's KV when the caller went away
            if not stream.finals:
                self.metrics.failed.labels("unavailable").inc()
                raise GatewayError("unavailable", "the worker ended the stream early")
            final: Final = stream.finals[0]
            self.metrics.done(final.usage, time.perf_counter() - t0, final.finish_reason, len(stream.finals))
        finally:
            if worker is not None:
                self.workers.release(worker)
            job.release()

    async def _finish_on_worker(self, worker, rid: str) -> None:
        try:
            await worker.stub.Finish(pb.worker_pb2.FinishRequest(request_id=rid), timeout=5.0)
        except grpc.aio.AioRpcError as exc:  # the stream's own end (or failure) follows anyway
            log.warning("finishing request %s on %s failed: %s", rid, worker.address, exc.code().name)
