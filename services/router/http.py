"""The OpenAI-compatible HTTP API, the router's second front door to the gateway (`gateway.py`).

`POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events ending with
`data: [DONE]`, or whole), `GET /v1/models` (once a worker answered, the model's entry says under `apar`
whether it can fork: a model without control tokens serves every request auto-regressively), `GET
/health` (open to anyone: it looks at the workers at most once a second, however many ask), `GET /metrics`
(the router's Prometheus registry). FastAPI on uvicorn, as vLLM, SGLang and TGI serve theirs; it runs in the router's event loop
beside the gRPC server, so both share the gateway, its worker view and its metrics.

Request bodies are read and checked by hand in `openai_request.py` (an error names the offending
parameter; one we do not implement is refused by name unless it holds its no-op value). `user` is
accepted and ignored. `frequency_penalty` and `presence_penalty` (OpenAI's, in [-2, 2]) and
`repetition_penalty` (vLLM's extension, > 0) apply over each thread's own context
(`apar/engine/penalties.py`).

Every path but `/health` (and `/metrics` with `--metrics-open`) needs `Authorization: Bearer KEY` when
the router has API keys (`guard.HttpGuard`, a pure ASGI middleware: a refused request gets 401 in
OpenAI's shape with `WWW-Authenticate: Bearer` before its body is read). The body size limit is
`--max-request-bytes` (413); the per-key limits are the gateway's (429 with Retry-After, or 400).

APAR extensions: the request's `apar` object (`auto_parallel`, `max_threads`, `max_depth`, `stream`:
`linear` or `threads`, and `ignore_eos` for benchmarks); with `stream: "threads"` each per-thread event
is a chunk whose `apar.thread` field holds it (content deltas still stream as usual). The usage
carries, beside the standard fields (`prompt_tokens_details.cached_tokens`: prompt tokens served from
the prefix cache), `steps`, `threads`, `forks`, `peak_kv_blocks`, `attended_tokens`, `preemptions`,
`recomputed_tokens` and `forks_refused`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from apar.text.stitch import ThreadDelta
from apar.text.stream import Final, LinearDelta
from services.router.gateway import Gateway, GatewayError, Job
from services.router.guard import current_caller
from services.router.http_server import HttpGuard
from services.router.openai_request import (CHAT_FIELDS, COMPLETION_FIELDS, ApiError, check_names, is_unicode,
                                            read_messages, read_params, read_prompt, read_stop)

log = logging.getLogger(__name__)
HEALTH_REFRESH_S = 1.0  # GET /health, open to anyone, looks at the workers (or asks the KV manager) this often


class Throttled:
    """An async call run at most once per `every_s`: callers in between await the last run (or the one
    under way) and share its outcome, so a flood of callers makes no more calls than one caller."""

    def __init__(self, fn, every_s: float, clock=time.monotonic) -> None:
        self.fn, self.every_s, self.clock = fn, every_s, clock
        self.task: asyncio.Future | None = None
        self.at = -float("inf")

    async def __call__(self):
        now = self.clock()
        if self.task is None or (self.task.done() and now - self.at >= self.every_s):
            self.at = now
            self.task = asyncio.ensure_future(self.fn())
        return await asyncio.shield(self.task)  # a caller that goes away does not cancel the others' run


def _usage(usage: dict[str, int]) -> dict:
    out: dict = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                 "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    if "cached_tokens" in usage:  # prompt tokens served from the prefix cache, where OpenAI puts them
        out["prompt_tokens_details"] = {"cached_tokens": usage["cached_tokens"]}
    out.update((k, v) for k, v in usage.items() if k not in out and k != "cached_tokens")
    return out


# ---- the app ------------------------------------------------------------------------------------------
def build_app(gateway: Gateway, registry=None, request_timeout_s: float = 0.0,
              allowed_hosts: frozenset[str] | None = None) -> FastAPI:
    """The app; `request_timeout_s` bounds each request, body and answer (0: none); `allowed_hosts`, when
    given, are the only Host header values (any port) it answers."""
    app = FastAPI(title="APAR serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HttpGuard, guard=gateway.guard, allowed_hosts=allowed_hosts)
    created = int(time.time())
    max_body = gateway.guard.limits.max_request_bytes

    def too_large(size: int | None) -> ApiError:
        return ApiError(413, gateway.guard.too_large(current_caller(), size), code="request_too_large")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug: one clear 500, the server goes on
        log.exception("HTTP handler failed")
        return ApiError(500, "internal error").response()

    async def body_of(request: Request) -> dict:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":  # a cross-site form cannot send this without a CORS preflight
            raise ApiError(415, "the body must be JSON, sent with Content-Type: application/json",
                           code="unsupported_media_type")
        size = request.headers.get("content-length")
        if size is not None and not size.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if size is not None and int(size) > max_body:
            raise too_large(int(size))
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > max_body:
                raise too_large(None)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8, a number past 4,300 digits
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        if not is_unicode(body):
            raise ApiError(400, "the body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is no "
                                "Unicode text", code="invalid_unicode")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "model must be a string", "model")
        if model != gateway.model_name:
            raise ApiError(404, f"model {model!r} is not served here (GET /v1/models)", "model", "model_not_found")
        return body

    async def completion(request: Request, chat: bool):
        deadline = time.monotonic() + request_timeout_s if request_timeout_s else None
        try:
            body = await asyncio.wait_for(body_of(request), None if deadline is None else deadline - time.monotonic())
        except TimeoutError:
            raise ApiError(408, "the request body did not arrive within the request's time limit "
                                "(--http-request-timeout)", code="request_timeout") from None
        check_names(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
        params, mode, include_usage = read_params(body, chat)
        stop = read_stop(body)
        try:
            if chat:
                job = await gateway.prepare(params, messages=read_messages(body), stop=stop)
            else:
                job = await gateway.prepare(params, prompt=read_prompt(body), raw_prompt=True, stop=stop)
        except GatewayError as exc:
            raise ApiError.of(exc) from None
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": gateway.model_name}
        timeout_s = None if deadline is None else max(0.001, deadline - time.monotonic())
        try:
            if body.get("stream"):
                return await _streamed(request, gateway, job, head, chat, mode, include_usage, timeout_s)
            return await _whole(request, gateway, job, head, chat, timeout_s)
        except BaseException:
            job.release()  # its place among the key's concurrent requests (a streamed body gives it back at its end)
            raise

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, chat=False)

    @app.get("/v1/models")
    async def models():
        model = {"id": gateway.model_name, "object": "model", "created": created, "owned_by": "apar"}
        try:
            control = await gateway.control()
        except GatewayError:  # no worker up yet: what the model can do is not known
            control = None
        if control is not None:
            model["apar"] = {"auto_parallel": control.auto_parallel, "fork_token": control.fork_token,
                             "child_token": control.child_token, "max_positions": control.max_positions}
        return {"object": "list", "data": [model]}

    refresh_for_health = Throttled(gateway.workers.refresh, HEALTH_REFRESH_S)

    @app.get("/health")
    async def health():
        await refresh_for_health()
        live = sum(1 for w in gateway.workers.workers if w.alive)
        return JSONResponse({"status": "ok" if live else "unavailable", "workers": live},
                            status_code=200 if live else 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry or gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class ClientGone(Exception):
    """The client disconnected while its request ran: it was cancelled, there is no one to answer."""


async def _guarded(request: Request, aw):
    """Await `aw` unless the client disconnects first: then cancel it (which cancels the worker call,
    freeing the request's blocks) and raise ClientGone. GatewayError becomes ApiError."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    except GatewayError as exc:
        raise ApiError.of(exc) from None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])


async def _whole(request: Request, gateway: Gateway, job: Job, head: dict, chat: bool,
                 timeout_s: float | None = None) -> JSONResponse:
    """Run to the end; a client that disconnects meanwhile cancels the request (its blocks free at once)."""

    async def collect() -> list[Final]:
        return [item async for item in gateway.generate(job, timeout_s) if isinstance(item, Final)]

    finals = await _guarded(request, collect())
    if chat:
        choices = [{"index": f.index, "message": {"role": "assistant", "content": f.text}, "logprobs": None,
                    "finish_reason": f.finish_reason} for f in finals]
        obj = "chat.completion"
    else:
        choices = [{"index": f.index, "text": f.text, "logprobs": None, "finish_reason": f.finish_reason}
                   for f in finals]
        obj = "text_completion"
    for f in finals:
        if f.error:
            log.warning("request %s answer %d ended with an error: %s", head["id"], f.index, f.error)
    return JSONResponse({**head, "object": obj, "choices": choices, "usage": _usage(finals[0].usage)})


async def _streamed(request: Request, gateway: Gateway, job: Job, head: dict, chat: bool, mode: str,
                    include_usage: bool, timeout_s: float | None = None) -> StreamingResponse:
    """Server-sent events. The first item is awaited before the response starts, so an error before any
    output is a plain HTTP error; once streaming, a client that disconnects ends the response (Starlette
    listens for it), which closes the gateway's stream: the worker frees the request's blocks at once."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    items = gateway.generate(job, timeout_s)
    first = await _guarded(request, anext(items))

    def chunk(choices: list[dict], **extra) -> bytes:
        data = {**head, "object": obj, "choices": choices, **extra}
        if include_usage and "usage" not in data:
            data["usage"] = None
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    def choice(index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    async def events() -> AsyncIterator[bytes]:
        greeted: set[int] = set()
        usage = None
        try:
            async for item in _chain(first, items):
                index = item.index
                if chat and index not in greeted:
                    greeted.add(index)
                    yield chunk([choice(index, None, role=True)])
                if isinstance(item, LinearDelta):
                    yield chunk([choice(index, item.text)])
                elif isinstance(item, ThreadDelta):
                    if mode == "threads":
                        event = {"kind": item.kind, "thread": item.thread, "parent": item.parent,
                                 "anchor": item.anchor, "text": item.text, "finish_reason": item.reason}
                        yield chunk([choice(index, None)], apar={"thread": event})
                elif isinstance(item, Final):
                    usage = item.usage
                    yield chunk([choice(index, None, item.finish_reason)])
        except GatewayError as exc:  # after the 200: the error travels as an event
            yield b"data: " + json.dumps(ApiError.of(exc).body()).encode() + b"\n\n"
        finally:
            await items.aclose()  # a client that went away: the worker call is cancelled, its blocks freed
        if include_usage and usage is not None:
            yield chunk([], usage=_usage(usage))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chain(first, rest: AsyncIterator):
    yield first
    async for item in rest:
        yield item
