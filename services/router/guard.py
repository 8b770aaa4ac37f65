"""Who may use the router's public APIs, and how much: API keys, per-key limits, one log line per refusal.

One `Guard` serves both front doors. Each door authenticates the call before anything else (the gRPC
`GrpcGuard` interceptor, the HTTP `HttpGuard` ASGI middleware in `http_server.py`): a missing or wrong
key is refused there, before the request is even parsed, so it costs no tokenization and no worker
call. Health checks (`grpc.health.v1.Health`, `GET /health`) stay open; `GET /metrics` on the HTTP port needs a key unless
`--metrics-open` (the separate `--metrics-port` is always open: keep it inside the cluster).

The gateway then applies the limits (`Gateway.prepare`): requests per second per key (a token bucket:
RESOURCE_EXHAUSTED / 429 with Retry-After), concurrent streams per key (the same), the largest
`max_tokens` and the longest prompt in tokens (INVALID_ARGUMENT / 400). The largest request message is
the doors' own check: the gRPC interceptor's deserializer (RESOURCE_EXHAUSTED) and the HTTP body reader
(413). Every refusal is ONE log line (`refused`): the reason, the door, the caller's key id (the first 8
hex characters of the key's SHA-256) and a detail that never holds prompt text or a key. At most
`REFUSAL_LINES` such lines a second are logged for each key, and as many for all refusals of a missing or
wrong key together, which anyone can cause (`LineBudget`); the next line logged says how many were dropped.

The key a request came with is the per-key limits' identity; without API keys every caller is one
`anonymous` caller.
"""
from __future__ import annotations

import argparse
import contextvars
import hashlib
import inspect
import logging
import math
import time
from dataclasses import dataclass

import grpc

from apar.engine.errors import UserError
from services.grpc_common import abort_unless_gone, aborting_handler, behavior_of, handler_like
from services.router.log_lines import LineBudget, printable
from services.security import ApiKeys, RefusedSecretFlag, TLSFiles, bearer, key_id

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 4 << 20
GRPC_HARD_CAP = 16 << 20  # gRPC refuses bigger messages itself, before reading them (logged by GrpcGuard)
OPEN_GRPC = ("/grpc.health.v1.Health/",)
OPEN_HTTP = frozenset({"/health"})
REFUSAL_LINES = 20  # log lines a second at most for one key's refusals, and for all unauthenticated ones
UNAUTHENTICATED = "unauthenticated"  # the log budget of refusals for a missing or wrong key


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
    """Who sent a request: the key's id (`anonymous` without API keys), the front door, and the salt of
    its prompt blocks' names in the prefix cache (apar/engine/prefix.py; 0: the shared cache)."""

    key: str = "anonymous"
    door: str = "-"
    cache_salt: int = 0


def cache_salt(key: str) -> int:
    """A key's own salt of prefix-cache names: 64 bits of a hash of the key (never 0, the shared cache)."""
    digest = hashlib.sha256(b"apar-prefix-cache\0" + key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") or 1


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
                 metrics_open: bool = False, shared_prefix_cache: bool = False) -> None:
        self.keys = keys
        self.limits = limits or Limits()
        self.metrics_open = metrics_open
        self.shared_prefix_cache = shared_prefix_cache  # False: each key's prompts hit only its own blocks
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        self._streams: dict[str, int] = {}
        self._log_budgets: dict[str, LineBudget] = {}  # a key id (or UNAUTHENTICATED) -> its lines this second

    # ---- the one log line per refused request ---------------------------------------------------------
    def refused(self, caller: Caller, reason: str, detail: str, budget: str | None = None) -> None:
        """Log the refusal, within the budget of lines of `budget` (default: the caller's key)."""
        name = budget or caller.key
        lines = self._log_budgets.get(name)
        if lines is None:
            lines = self._log_budgets[name] = LineBudget(REFUSAL_LINES)
        dropped = lines.take()
        if dropped is None:
            return
        more = f" ({dropped} more such refusals not logged)" if dropped else ""
        log.warning("refused request: reason=%s door=%s key=%s: %s%s", reason, caller.door, caller.key,
                    printable(detail), more)

    # ---- keys -----------------------------------------------------------------------------------------
    def authenticate(self, header: str | bytes | None, door: str, what: str) -> Caller | None:
        """The caller of a request with this Authorization value, or None (refused, logged)."""
        if self.keys is None:
            return Caller("anonymous", door)
        token = bearer(header)
        if token is not None and self.keys.check(token):
            return Caller(key_id(token), door, 0 if self.shared_prefix_cache else cache_salt(token))
        presented = "none" if header is None else ("malformed" if token is None else key_id(token))
        self.refused(Caller(presented, door), "unauthenticated", f"{what}: {'no' if header is None else 'a wrong'} "
                     "API key", budget=UNAUTHENTICATED)  # one budget: the key ids are the client's choice
        return None

    # ---- per-key limits -------------------------------------------------------------------------------
    def admit(self, caller: Caller, answers: int = 1) -> Ticket:
        """Take a request of `answers` answers (`n`) from `caller` (rate, then concurrent streams: each
        answer is one), or raise Refused. A refused request takes nothing from the bucket."""
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
            if running + answers > lim.max_streams_per_key:
                raise self._refuse(caller, Refused(
                    "exhausted", "too_many_streams", f"at most {lim.max_streams_per_key} concurrent answers per "
                    f"API key ({running} running, this request asks for {answers}): wait for one to end",
                    retry_after_s=1, code="too_many_concurrent_requests"))
            self._streams[caller.key] = running + answers
            ticket = Ticket(lambda: self._done(caller.key, answers))
        if tokens is not None:
            self._buckets[caller.key] = (tokens - 1.0, now)
        return ticket

    def _done(self, key: str, answers: int = 1) -> None:
        n = self._streams.get(key, 0) - answers
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

    def too_large(self, caller: Caller, size: int | None, read_limit: int | None = None) -> str:
        """The message for a request body or message over the limit (logged as a refusal); `size` None:
        not read past `read_limit` bytes (default: the limit)."""
        limit = self.limits.max_request_bytes
        message = f"request of {size if size is not None else 'more than ' + str(read_limit or limit)} bytes is " \
                  f"larger than this server allows ({limit} bytes)"
        self.refused(caller, "too_large", message)
        return message

    def _refuse(self, caller: Caller, exc: Refused) -> Refused:
        self.refused(caller, exc.reason, exc.message)
        return exc


# ---- gRPC: an interceptor in front of every method ------------------------------------------------------
class _TooLarge:
    def __init__(self, size: int) -> None:
        self.size = size


class GrpcGuard(grpc.aio.ServerInterceptor):
    """API keys (metadata `authorization: Bearer KEY`) on every method but health checking, the request
    size limit, and the caller handed to the servicer (`current_caller()`).

    A unary method's request is read here, through a handler of the streaming kind: a message gRPC itself
    refuses for its size (past `grpc_server_options`' cap) never reaches a unary handler, so without this
    it would leave no log line."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_GRPC):
            return handler
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        caller = self.guard.authenticate(header, "grpc", details.method)
        if caller is None:
            return aborting_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                    "a valid API key is required: metadata authorization: Bearer KEY")
        return self._wrapped(handler, caller)

    def _wrapped(self, handler, caller: Caller):
        if handler.request_streaming:  # reflection; gRPC's own size limit applies
            inner = behavior_of(handler)

            if handler.response_streaming:
                async def behavior(requests, context):
                    CALLER.set(caller)
                    async for item in inner(requests, context):
                        yield item
            else:
                async def behavior(requests, context):
                    CALLER.set(caller)
                    return await inner(requests, context)
            return handler_like(handler, behavior, handler.request_deserializer)

        limit, parse = self.guard.limits.max_request_bytes, handler.request_deserializer

        def deserializer(raw: bytes):
            if len(raw) > limit:
                return _TooLarge(len(raw))
            return parse(raw) if parse is not None else raw

        read = self._one_request
        if handler.response_streaming:
            inner = handler.unary_stream
            if inspect.isasyncgenfunction(inner):
                async def behavior(requests, context):
                    request = await read(requests, context, caller)
                    if request is None:  # refused, or the caller is gone
                        return
                    CALLER.set(caller)
                    async for item in inner(request, context):
                        yield item
            else:  # it writes its responses itself (`context.write`)
                async def behavior(requests, context):
                    request = await read(requests, context, caller)
                    if request is None:  # refused, or the caller is gone
                        return
                    CALLER.set(caller)
                    await inner(request, context)
            make = grpc.stream_stream_rpc_method_handler
        else:
            inner = handler.unary_unary

            async def behavior(requests, context):
                request = await read(requests, context, caller)
                if request is None:  # refused, or the caller is gone
                    return None
                CALLER.set(caller)
                return await inner(request, context)
            make = grpc.stream_unary_rpc_method_handler
        return make(behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)

    async def _one_request(self, requests, context, caller: Caller):
        """The request of a unary call; or None: the call refused (and logged) when it is too large, or its
        caller gone."""
        async for request in requests:
            if isinstance(request, _TooLarge):
                await abort_unless_gone(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        self.guard.too_large(caller, request.size))
                return None
            return request
        cap = max(self.guard.limits.max_request_bytes, GRPC_HARD_CAP)
        if not context.cancelled():  # no message and not cancelled: gRPC refused it for its size
            message = self.guard.too_large(caller, None, cap)
        else:
            message = "the call was cancelled before its request arrived"
        await abort_unless_gone(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        return None


def grpc_server_options(limits: Limits) -> list[tuple[str, int]]:
    """The public gRPC server's options: messages up to the hard cap are read, then refused by size here;
    connections bounded as the HTTP port's are (`http_limits.grpc_connection_options`)."""
    from services.router.http_limits import grpc_connection_options

    cap = max(limits.max_request_bytes, GRPC_HARD_CAP)
    return [("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", GRPC_HARD_CAP),
            *grpc_connection_options()]


# ---- flags ----------------------------------------------------------------------------------------------
def add_public_args(p: argparse.ArgumentParser) -> None:
    """The public APIs' TLS, API keys, limits and HTTP server bounds (`apar serve`, `apar router`)."""
    from services.router.http_limits import add_http_server_args

    g = p.add_argument_group("public API security (gRPC and HTTP)")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="serve the public gRPC and HTTP APIs over TLS "
                                                                   "with this certificate chain")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    g.add_argument("--api-key", action=RefusedSecretFlag,
                   instead="put the keys in a file, one per line, and give --api-key-file PATH")
    g.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="require 'Authorization: Bearer KEY' on every call but health checks, KEY one of this "
                        "file's lines (# comments); re-read when it changes")
    g.add_argument("--metrics-open", action="store_true",
                   help="serve GET /metrics on the HTTP port without an API key")
    g.add_argument("--shared-prefix-cache", action="store_true",
                   help="let every API key's prompts hit every other key's cached prompt blocks (default: each "
                        "key only its own, so that cached_tokens and timing tell no key about another's prompts)")
    d = Limits()
    g = p.add_argument_group("limits per request and per API key (0 turns a per-key limit off)")
    g.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"largest request message or HTTP body ({d.max_request_bytes})")
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help=f"longest prompt in tokens ({d.max_prompt_tokens}; the model's context bounds it too)")
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens,
                   help=f"largest max_tokens a request may ask for, per answer ({d.max_tokens})")
    g.add_argument("--max-streams-per-key", type=int, default=d.max_streams_per_key,
                   help=f"concurrent answers per API key, a request of n answers counting n "
                        f"({d.max_streams_per_key}; per router replica)")
    g.add_argument("--rate-limit", type=float, default=d.rate, metavar="RPS",
                   help="requests per second per API key, a token bucket (0: off, the default; per router replica)")
    g.add_argument("--rate-burst", type=int, default=d.burst,
                   help="requests a key may send at once under --rate-limit (default: the rate, at least 1)")
    add_http_server_args(p)


def public_tls(args) -> TLSFiles | None:
    return TLSFiles.load(args.tls_cert, args.tls_key, flags="--tls")


def guard_from_args(args) -> Guard:
    keys = ApiKeys((), args.api_key_file) if args.api_key_file is not None else None
    limits = Limits(args.max_request_bytes, args.max_prompt_tokens, args.max_tokens_limit, args.max_streams_per_key,
                    args.rate_limit, args.rate_burst)
    return Guard(keys, limits, args.metrics_open, args.shared_prefix_cache)
