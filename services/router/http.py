"""The OpenAI-compatible HTTP API, the router's second front door to the gateway (`gateway.py`).

`POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events ending with
`data: [DONE]`, or whole), `GET /v1/models` (once a worker answered, the model's entry says under `apar`
whether it can fork: a model without control tokens serves every request auto-regressively), `GET
/health`, `GET /metrics` (the router's Prometheus registry). FastAPI on uvicorn, as vLLM, SGLang and TGI serve theirs; it runs in the router's event loop
beside the gRPC server, so both share the gateway, its worker view and its metrics.

Request bodies are checked here by hand rather than by pydantic models: OpenAI's error shape names the
offending parameter, and a parameter we do not implement (`logprobs`, `tools`, ...) must be refused by
name, never ignored. Such a parameter is accepted only with its no-op value (`logprobs: false`,
`logit_bias: {}`, ...), since common clients send those. `user` is accepted and ignored.
`frequency_penalty` and `presence_penalty` (OpenAI's, in [-2, 2]) and `repetition_penalty` (vLLM's
extension, > 0) apply over each thread's own context (`apar/engine/penalties.py`).

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
import math
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from apar.engine.errors import UserError
from apar.engine.params import MAX_DEPTH, MAX_THREADS, PENALTY_RANGE, SamplingParams
from services.protocol.convert import DEFAULT_MAX_TOKENS
from services.router.gateway import Gateway, GatewayError, Job
from services.router.guard import current_caller
from services.router.http_server import HttpGuard
from services.router.stitch import ThreadDelta
from services.router.stream import Final, LinearDelta

log = logging.getLogger(__name__)
_HTTP = {"invalid": 400, "exhausted": 429, "unavailable": 503, "deadline": 504}
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout",
          500: "internal_error"}
# accepted only with these no-op values
_NOOP = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
         "parallel_tool_calls": (None,), "functions": (None, []), "function_call": (None, "none"),
         "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "echo": (None, False), "best_of": (None, 1), "suffix": (None,),
         "store": (None, False), "metadata": (None,), "service_tier": (None, "auto"), "modalities": (None, ["text"]),
         "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,)}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user",
           "apar", "frequency_penalty", "presence_penalty", "repetition_penalty"}
_CHAT = _COMMON | {"messages", "max_completion_tokens"}
_COMPLETION = _COMMON | {"prompt"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after_s = status, message, param, code, \
            retry_after_s

    @classmethod
    def of(cls, exc: GatewayError) -> ApiError:
        if exc.status == "deadline":  # over HTTP only the request time limit sets a deadline
            return cls(504, "the request ran past its time limit (--http-request-timeout)", code="request_timeout")
        return cls(_HTTP[exc.status], exc.message, exc.param, exc.code, retry_after_s=exc.retry_after_s)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"), "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- reading a body -----------------------------------------------------------------------------------
def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo}, {hi}]", name)
    return float(v)


def _integer(obj: dict, name: str, lo: int, hi: int, param: str | None = None) -> int | None:
    v = obj.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"{param or name} must be an integer in [{lo}, {hi}]", param or name)
    return v


def _check_names(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed:
            continue
        if name in _NOOP:
            if any(value == v and type(value) is type(v) for v in _NOOP[name]):
                continue
            raise ApiError(400, f"unsupported parameter: {name}", name, "unsupported_parameter")
        raise ApiError(400, f"unknown parameter: {name}", name, "unknown_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 8:
        raise ApiError(400, "stop must be a string or a list of at most 8 strings", "stop")
    return tuple(stop)


def _params(body: dict, chat: bool) -> tuple[SamplingParams, str, bool]:
    """SamplingParams, the APAR stream mode and whether usage is streamed, from a request body."""
    max_tokens = _integer(body, "max_tokens", 1, 1 << 20)
    if chat:
        alt = _integer(body, "max_completion_tokens", 1, 1 << 20)
        if max_tokens is not None and alt is not None and alt != max_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ", "max_completion_tokens")
        max_tokens = max_tokens if max_tokens is not None else alt
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    n = _integer(body, "n", 1, 16) or 1
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise ApiError(400, "stream_options may hold include_usage only", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ApiError(400, "stream_options.include_usage must be a boolean", "stream_options")
        if options.get("continuous_usage_stats"):
            raise ApiError(400, "unsupported parameter: stream_options.continuous_usage_stats", "stream_options")
    apar = body.get("apar") or {}
    if not isinstance(apar, dict):
        raise ApiError(400, "apar must be an object", "apar")
    unknown = set(apar) - {"auto_parallel", "max_threads", "max_depth", "stream", "ignore_eos"}
    if unknown:
        raise ApiError(400, f"unknown parameter: apar.{sorted(unknown)[0]}", f"apar.{sorted(unknown)[0]}")
    auto_parallel, ignore_eos = apar.get("auto_parallel", True), apar.get("ignore_eos", False)
    for name, v in (("auto_parallel", auto_parallel), ("ignore_eos", ignore_eos)):
        if not isinstance(v, bool):
            raise ApiError(400, f"apar.{name} must be a boolean", f"apar.{name}")
    mode = apar.get("stream", "linear")
    if mode not in ("linear", "threads"):
        raise ApiError(400, "apar.stream must be linear or threads", "apar.stream")
    kw = {}
    for name in ("max_threads", "max_depth"):
        v = _integer(apar, name, 0 if name == "max_depth" else 1, MAX_DEPTH if name == "max_depth" else MAX_THREADS,
                     f"apar.{name}")
        if v is not None:
            kw[name] = v
    if seed is not None:
        seed %= 1 << 63  # OpenAI seeds may be negative; ours are unsigned
    for name in ("frequency_penalty", "presence_penalty"):
        kw[name] = _number(body, name, -PENALTY_RANGE, PENALTY_RANGE, 0.0)
    kw["repetition_penalty"] = _repetition_penalty(body)
    try:
        params = SamplingParams(
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS, temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
            top_p=_number(body, "top_p", 0.0, 1.0, 1.0) or 1e-6, seed=seed, n=n, auto_parallel=auto_parallel,
            ignore_eos=ignore_eos, **kw)
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    return params, mode, include_usage


def _repetition_penalty(body: dict) -> float:
    """vLLM's extension: a number > 0 (1, the default, is off)."""
    v = body.get("repetition_penalty")
    if v is None:
        return 1.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ApiError(400, "repetition_penalty must be a number > 0", "repetition_penalty")
    return float(v)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(_ROLES)}", f"messages[{i}].role")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ApiError(400, f"unsupported parameter: messages[{i}].{sorted(extra)[0]}", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": _ROLES[m["role"]], "content": content})
    return out


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be one string (batches and token ids are not supported)", "prompt")
    return prompt


def _is_unicode(body) -> bool:
    """Whether every string of a parsed JSON body is Unicode text: JSON's `\\ud800` escapes may leave a
    lone surrogate in a Python string, which no tokenizer or encoder takes."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    except RecursionError:  # nested deeper than the encoder goes: some check below refuses it by name
        return True
    return True


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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        if not _is_unicode(body):
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
        _check_names(body, _CHAT if chat else _COMPLETION)
        params, mode, include_usage = _params(body, chat)
        stop = _stop(body)
        try:
            if chat:
                job = await gateway.prepare(params, messages=_messages(body), stop=stop)
            else:
                job = await gateway.prepare(params, prompt=_prompt(body), raw_prompt=True, stop=stop)
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

    @app.get("/health")
    async def health():
        await gateway.workers.refresh()
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
