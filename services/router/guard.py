"""Who may use the router's public APIs, and how much: API keys, per-key limits, one log line per refusal.

One `Guard` serves both front doors. Each door authenticates the call before anything else (the gRPC
`GrpcGuard` interceptor, the HTTP `HttpGuard` ASGI middleware): a missing or wrong key is refused there,
before the request is even parsed, so it costs no tokenization and no worker call. Health checks
(`grpc.health.v1.Health`, `GET /health`) stay open; `GET /metrics` on the HTTP port needs a key unless
`--metrics-open` (the separate `--metrics-port` is always open: keep it inside the cluster).

The gateway then applies the limits (`Gateway.prepare`): requests per second per key (a token bucket:
RESOURCE_EXHAUSTED / 429 with Retry-After), concurrent streams per key (the same), the largest
`max_tokens` and the longest prompt in tokens (INVALID_ARGUMENT / 400). The largest request message is
the doors' own check: the gRPC interceptor's deserializer (RESOURCE_EXHAUSTED) and the HTTP body reader
(413). Every refusal is ONE log line (`refused`): the reason, the door, the caller's key id (the first 8
hex characters of the key's SHA-256) and a detail that never holds prompt text or a key.

The key a request came with is the per-key limits' identity; without API keys every caller is one
`anonymous` caller.
"""
from __future__ import annotations

import argparse
import contextvars
import json
import logging
import math
import time
from dataclasses import dataclass

import grpc

from apar.errors import UserError
from services.security import ApiKeys, TLSFiles, bearer, key_id

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 4 << 20
GRPC_HARD_CAP = 16 << 20  # gRPC refuses bigger messages itself, before reading them (not logged)
OPEN_GRPC = ("/grpc.health.v1.Health/",)
OPEN_HTTP = frozenset({"/health"})


@dataclass(frozen=True)
class Limits:
    """Per-request and per-key limits; 0 turns a per-key limit off."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_prompt_tokens: int = 32768
    max_tokens: int = 16384
    max_streams_per_key: int = 256
    rate: float = 0.0  # requests per second per key
    burst: int = 0  # bucket size; 0: max(1, ceil(rate))

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_prompt_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be 1 or more")
        if self.max_streams_per_key < 0 or self.burst < 0 or not (self.rate >= 0 and math.isfinite(self.rate)):
            raise UserError("--max-streams-per-key, --rate-limit and --rate-burst must be 0 (off) or more")

    @property
    def bucket(self) -> float:
        return float(self.burst or max(1, math.ceil(self.rate)))


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: the key's id (`anonymous` without API keys) and the front door."""

    key: str = "anonymous"
    door: str = "-"


ANONYMOUS = Caller()
CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("apar_caller", default=None)


def current_caller() -> Caller:
    return CALLER.get() or ANONYMOUS


class Refused(Exception):
    """A limit refused a request: `status` as GatewayError's (exhausted, invalid), with the reason."""

    def __init__(self, status: str, reason: str, message: str, retry_after_s: int | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.retry_after_s, self.param, self.code = retry_after_s, param, code


class Ticket:
    """A request's place among its key's concurrent streams; `release()` (idempotent) gives it back."""

    __slots__ = ("_release",)

    def __init__(self, release=None) -> None:
        self._release = release

    def release(self) -> None:
        f, self._release = self._release, None
        if f is not None:
            f()

    __del__ = release  # a request dropped before it ran still gives its place back


class Guard:
    def __init__(self, keys: ApiKeys | None = None, limits: Limits | None = None,
                 metrics_open: bool = False) -> None:
        self.keys = keys
        self.limits = limits or Limits()
        self.metrics_open = metrics_open
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        self._streams: dict[str, int] = {}

    # ---- the one log line per refused request ---------------------------------------------------------
    @staticmethod
    def refused(caller: Caller, reason: str, detail: str) -> None:
        log.warning("refused request: reason=%s door=%s key=%s: %s", reason, caller.door, caller.key, detail)

    # ---- keys -----------------------------------------------------------------------------------------
    def authenticate(self, header: str | bytes | None, door: str, what: str) -> Caller | None:
        """The caller of a request with this Authorization value, or None (refused, logged)."""
        if self.keys is None:
            return Caller("anonymous", door)
        token = bearer(header)
        if token is not None and self.keys.check(token):
            return Caller(key_id(token), door)
        presented = "none" if header is None else ("malformed" if token is None else key_id(token))
        self.refused(Caller(presented, door), "unauthenticated",
                     f"{what}: {'no' if header is None else 'a wrong'} API key")
        return None

    # ---- per-key limits -------------------------------------------------------------------------------
    def admit(self, caller: Caller) -> Ticket:
        """Take a request from `caller` (rate, then concurrent streams), or raise Refused. A refused
        request takes nothing from the bucket."""
        lim = self.limits
        tokens = now = None
        if lim.rate > 0:
            now = time.monotonic()
            tokens, at = self._buckets.get(caller.key, (lim.bucket, now))
            tokens = min(lim.bucket, tokens + (now - at) * lim.rate)
            self._buckets[caller.key] = (tokens, now)
            if tokens < 1.0:
                wait = max(1, math.ceil((1.0 - tokens) / lim.rate))
                raise self._refuse(caller, Refused(
                    "exhausted", "rate_limited", f"rate limit: at most {lim.rate:g} requests per second per "
                    f"API key (burst {lim.bucket:g}); retry after {wait} s", retry_after_s=wait,
                    code="rate_limit_exceeded"))
        ticket = Ticket()
        if lim.max_streams_per_key:
            running = self._streams.get(caller.key, 0)
            if running >= lim.max_streams_per_key:
                raise self._refuse(caller, Refused(
                    "exhausted", "too_many_streams", f"at most {lim.max_streams_per_key} concurrent requests per "
                    "API key: wait for one to end", retry_after_s=1, code="too_many_concurrent_requests"))
            self._streams[caller.key] = running + 1
            ticket = Ticket(lambda: self._done(caller.key))
        if tokens is not None:
            self._buckets[caller.key] = (tokens - 1.0, now)
        return ticket

    def _done(self, key: str) -> None:
        n = self._streams.get(key, 0) - 1
        if n > 0:
            self._streams[key] = n
        else:
            self._streams.pop(key, None)

    def streams(self, key: str) -> int:
        return self._streams.get(key, 0)

    def check_max_tokens(self, caller: Caller, max_tokens: int) -> None:
        if max_tokens > self.limits.max_tokens:
            raise self._refuse(caller, Refused(
                "invalid", "max_tokens", f"max_tokens {max_tokens} is larger than this server allows "
                f"({self.limits.max_tokens})", param="max_tokens", code="max_tokens_too_large"))

    def check_prompt_tokens(self, caller: Caller, n: int, param: str) -> None:
        if n > self.limits.max_prompt_tokens:
            raise self._refuse(caller, Refused(
                "invalid", "prompt_too_long", f"prompt of {n} tokens is longer than this server allows "
                f"({self.limits.max_prompt_tokens} tokens)", param=param, code="context_length_exceeded"))

    def too_large(self, caller: Caller, size: int | None) -> str:
        """The message for a request body or message over the limit (logged as a refusal)."""
        limit = self.limits.max_request_bytes
        message = f"request of {size if size is not None else 'more than ' + str(limit)} bytes is larger than " \
                  f"this server allows ({limit} bytes)"
        self.refused(caller, "too_large", message)
        return message

    def _refuse(self, caller: Caller, exc: Refused) -> Refused:
        self.refused(caller, exc.reason, exc.message)
        return exc


# ---- gRPC: an interceptor in front of every method ------------------------------------------------------
class _TooLarge:
    def __init__(self, size: int) -> None:
        self.size = size


def _handler_like(handler, behavior, deserializer):
    """A handler of `handler`'s kind with another behavior and request deserializer."""
    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)


def _aborting(handler, code: grpc.StatusCode, message: str):
    """A handler that refuses the call without parsing its request."""
    if handler.response_streaming:
        async def behavior(request, context):
            await context.abort(code, message)
            yield  # pragma: no cover (an async generator, as the kind requires)
    else:
        async def behavior(request, context):
            await context.abort(code, message)
    return _handler_like(handler, behavior, lambda raw: None)


class GrpcGuard(grpc.aio.ServerInterceptor):
    """API keys (metadata `authorization: Bearer KEY`) on every method but health checking, the request
    size limit, and the caller handed to the servicer (`current_caller()`)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_GRPC):
            return handler
        header = None
        for item in details.invocation_metadata or ():
            if item[0] == "authorization":
                header = item[1]
                break
        caller = self.guard.authenticate(header, "grpc", details.method)
        if caller is None:
            return _aborting(handler, grpc.StatusCode.UNAUTHENTICATED,
                             "a valid API key is required: metadata authorization: Bearer KEY")
        return self._wrapped(handler, caller)

    def _wrapped(self, handler, caller: Caller):
        guard = self.guard
        if handler.request_streaming:  # reflection; gRPC's own size limit applies
            inner = handler.stream_stream if handler.response_streaming else handler.stream_unary

            if handler.response_streaming:
                async def behavior(requests, context):
                    CALLER.set(caller)
                    async for item in inner(requests, context):
                        yield item
            else:
                async def behavior(requests, context):
                    CALLER.set(caller)
                    return await inner(requests, context)
            return _handler_like(handler, behavior, handler.request_deserializer)

        limit = guard.limits.max_request_bytes
        parse = handler.request_deserializer

        def deserializer(raw: bytes):
            if len(raw) > limit:
                return _TooLarge(len(raw))
            return parse(raw) if parse is not None else raw

        if handler.response_streaming:
            inner = handler.unary_stream

            async def behavior(request, context):
                if isinstance(request, _TooLarge):
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, guard.too_large(caller, request.size))
                CALLER.set(caller)
                async for item in inner(request, context):
                    yield item
        else:
            inner = handler.unary_unary

            async def behavior(request, context):
                if isinstance(request, _TooLarge):
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, guard.too_large(caller, request.size))
                CALLER.set(caller)
                return await inner(request, context)
        return _handler_like(handler, behavior, deserializer)


def grpc_server_options(limits: Limits) -> list[tuple[str, int]]:
    """The public gRPC server's options: messages up to the hard cap are read, then refused by size here."""
    cap = max(limits.max_request_bytes, GRPC_HARD_CAP)
    return [("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", GRPC_HARD_CAP)]


# ---- HTTP: a pure ASGI middleware (streaming responses and disconnects pass through untouched) -------
def unauthorized_body() -> bytes:
    return json.dumps({"error": {"message": "a valid API key is required: header Authorization: Bearer KEY",
                                 "type": "invalid_request_error", "param": None,
                                 "code": "invalid_api_key"}}).encode()


class HttpGuard:
    """API keys (header `Authorization: Bearer KEY`) on every path but /health (and /metrics with
    `metrics_open`); the caller is handed to the endpoints (`current_caller()`)."""

    def __init__(self, app, guard: Guard) -> None:
        self.app = app
        self.guard = guard
        self.open = OPEN_HTTP | ({"/metrics"} if guard.metrics_open else set())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.open:
            return await self.app(scope, receive, send)
        header = None
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                header = value
                break
        caller = self.guard.authenticate(header, "http", f"{scope.get('method', '?')} {scope.get('path', '?')}"[:200])
        if caller is None:
            body = unauthorized_body()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="apar"')]})
            await send({"type": "http.response.body", "body": body})
            return None
        CALLER.set(caller)
        return await self.app(scope, receive, send)


# ---- flags ----------------------------------------------------------------------------------------------
def add_public_args(p: argparse.ArgumentParser) -> None:
    """The public APIs' TLS, API keys and limits (`apar serve`, `apar router`)."""
    g = p.add_argument_group("public API security (gRPC and HTTP)")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="serve the public gRPC and HTTP APIs over TLS "
                                                                   "with this certificate chain")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    g.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every call but health checks (repeatable)")
    g.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="accepted API keys, one per line (# comments); re-read when it changes")
    g.add_argument("--metrics-open", action="store_true",
                   help="serve GET /metrics on the HTTP port without an API key")
    d = Limits()
    g = p.add_argument_group("limits per request and per API key (0 turns a per-key limit off)")
    g.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"largest request message or HTTP body ({d.max_request_bytes})")
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help=f"longest prompt in tokens ({d.max_prompt_tokens}; the model's context bounds it too)")
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens,
                   help=f"largest max_tokens a request may ask for, per answer ({d.max_tokens})")
    g.add_argument("--max-streams-per-key", type=int, default=d.max_streams_per_key,
                   help=f"concurrent requests per API key ({d.max_streams_per_key})")
    g.add_argument("--rate-limit", type=float, default=d.rate, metavar="RPS",
                   help="requests per second per API key, a token bucket (0: off, the default)")
    g.add_argument("--rate-burst", type=int, default=d.burst,
                   help="requests a key may send at once under --rate-limit (default: the rate, at least 1)")


def public_tls(args) -> TLSFiles | None:
    return TLSFiles.load(args.tls_cert, args.tls_key, flags="--tls")


def guard_from_args(args) -> Guard:
    keys = None
    if args.api_key or args.api_key_file:
        keys = ApiKeys(args.api_key or (), args.api_key_file)
    limits = Limits(args.max_request_bytes, args.max_prompt_tokens, args.max_tokens_limit, args.max_streams_per_key,
                    args.rate_limit, args.rate_burst)
    return Guard(keys, limits, args.metrics_open)
