"""The HTTP API's server: uvicorn with bounds on what a client can hold without sending a request.

A connection is **pending** until a request head on it has passed the API key check (without API keys:
until it has sent a whole request head). Bounds, each a flag:

- `--http-header-timeout` (10 s): a request head must arrive whole within this long of the connection
  opening or of the previous answer ending; trickling bytes does not extend it (slow-loris). The rest of
  a body that its answer did not wait for (a 401 is sent before the body is read) must arrive within it
  too: a refused client cannot hold its connection by trickling the body it announced.
- `--http-idle-timeout` (5 s): a kept-alive connection with nothing to do is closed.
- `--http-max-pending-per-client` (32): past this many pending connections from one address, that
  address's oldest pending one is closed once it has had `PENDING_GRACE_S` to send its head (a burst of
  new connections from one proxy is not cut); the newest always gets its chance to send a request.
- `--http-max-connections` (half this process's file-descriptor limit, at most 4096): past it, the
  oldest connection with no request running is closed, else the new one is answered 503. A quarter goes
  to the public gRPC port (`http_limits.grpc_connection_options`, with a 10 s handshake limit), the rest
  stays for the workers and the files, so a flood on either port never starves the other or them.
- `--http-request-timeout` (600 s): a request's time from its head to its last byte; its body must
  arrive within it (else 408), its answer ends there (504, or an error event when streamed), and a
  client that does not read its answer is disconnected a few seconds after.

When the process runs out of file descriptors anyway, asyncio's accept loop reports every failed
accept; here that is one warning per burst, with a count. uvicorn's warnings that any client can cause
with one request (a malformed head, an `Upgrade` header) are one per `NOISE_EVERY_S` each, with a count
(`ClientNoise`), so no client without a key can flood the log. WebSocket upgrades are off (the API has
no WebSocket route): a request asking for one is served as plain HTTP, through the same checks.

In front of the app, `HttpGuard` (a pure ASGI middleware) checks the Host header (`--allowed-host`;
against DNS rebinding) and the API key of every request but `/health`, before its body is read.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections import OrderedDict

from uvicorn.protocols.http.h11_impl import H11Protocol

from apar.engine.errors import UserError
from services.router.guard import CALLER, OPEN_HTTP, Guard
from services.router.http_limits import HttpServerLimits
from services.security import bearer

log = logging.getLogger(__name__)
HARD_CUT_GRACE_S = 5.0  # past the request time limit, a client still not done reading is disconnected
PENDING_GRACE_S = 1.0  # a new connection's time to send its head before the per-address cap may close it
NOISE_EVERY_S = 10.0  # at most one log line per this long for each warning a client can cause at will


class Connections:
    """Every open connection of one server, the pending ones (in the order they opened) by client address."""

    def __init__(self, limits: HttpServerLimits, keys=None, clock=time.monotonic) -> None:
        self.limits = limits
        self.keys = keys  # ApiKeys, or None: every whole request head counts
        self.clock = clock
        self.open: OrderedDict = OrderedDict()  # protocol -> None, oldest first
        self.pending: dict[str, OrderedDict] = {}  # client address -> {its pending protocols: opened at}, oldest first

    def opened(self, conn) -> bool:
        """Admit a new connection (closing others to make room); False: refuse it."""
        now = self.clock()
        self.open[conn] = None
        mine = self.pending.setdefault(conn.client_host, OrderedDict())
        mine[conn] = now
        while len(mine) > self.limits.max_pending_per_client:
            oldest, since = next(iter(mine.items()))
            if now - since < PENDING_GRACE_S:
                break
            self._shed(oldest)
        if len(self.open) > self.limits.max_connections:
            idle = next((c for c in self.open if c is not conn and not c.busy), None)
            if idle is None:
                return False
            self._shed(idle)
        return True

    def passed(self, conn) -> None:
        """A request head on `conn` passed the key check: it no longer counts as pending."""
        mine = self.pending.get(conn.client_host)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.pending[conn.client_host]

    def closed(self, conn) -> None:
        self.open.pop(conn, None)
        self.passed(conn)

    def authenticates(self, headers: list[tuple[bytes, bytes]]) -> bool:
        if self.keys is None:
            return True
        value = next((v for k, v in headers if k == b"authorization"), None)
        token = bearer(value)
        return token is not None and self.keys.check(token)

    def _shed(self, conn) -> None:
        self.closed(conn)
        conn.transport.close()


class BoundedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the header timer, the request time limit's hard cut and `Connections`."""

    def __init__(self, *args, connections: Connections, **kw) -> None:
        super().__init__(*args, **kw)
        self.connections_guard = connections
        self.client_host = "?"
        self.busy = False  # a request is running
        self._timer: asyncio.TimerHandle | None = None
        self._seen_cycle = None  # uvicorn's request cycle whose head `_head_received` last saw

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.client_host = self.client[0] if self.client else "?"
        if not self.connections_guard.opened(self):
            self.connections_guard.closed(self)
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            transport.close()
            return
        self._arm(self.connections_guard.limits.header_timeout_s)

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.connections_guard.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._new_request():
            self._head_received()

    def _new_request(self) -> bool:
        """Whether uvicorn started a request (a cycle) since the last look: a whole head arrived."""
        if self.cycle is None or self.cycle is self._seen_cycle:
            return False
        self._seen_cycle = self.cycle
        return True

    def _head_received(self) -> None:
        """A whole request head: the header timer stops; the request's own time limit starts."""
        self.busy = True
        if self.connections_guard.authenticates(self.headers):
            self.connections_guard.passed(self)
        limit = self.connections_guard.limits.request_timeout_s
        self._disarm()
        if limit:
            self._arm(limit + HARD_CUT_GRACE_S)

    def on_response_complete(self) -> None:
        """The answer is sent: a pipelined request runs on; else the header timer bounds what comes next,
        the rest of a body the answer did not wait for (a 401's) included, which uvicorn reads and drops."""
        self.busy = False
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._new_request():
            self._head_received()
        else:
            self._arm(self.connections_guard.limits.header_timeout_s)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()


class _AcceptErrors:
    """asyncio's exception handler with failed accepts (out of descriptors) logged once per burst.

    asyncio schedules a retry of accepting for each failed accept of a burst (up to the backlog, 1024);
    a retry still pending when its server closes fails on the closed socket. Those failures are one
    line, not a traceback each."""

    def __init__(self, previous, every_s: float = 10.0) -> None:
        self.previous = previous
        self.every_s = every_s
        self.count = 0
        self.last = -1e18
        self.retries_failed = 0

    def __call__(self, loop, context) -> None:
        if isinstance(context.get("exception"), ValueError) and "._start_serving(" in context.get("message", ""):
            self.retries_failed += 1
            if self.retries_failed == 1:
                log.warning("retries of accepting connections on a closed server failed: %s", context["exception"])
            return
        if context.get("message") != "socket.accept() out of system resource":
            if self.previous is None:
                loop.default_exception_handler(context)
            else:
                self.previous(loop, context)
            return
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every_s:
            log.warning("cannot accept connections: %s (%d failed accepts); lower --http-max-connections or raise "
                        "the file-descriptor limit (ulimit -n)", context.get("exception"), self.count)
            self.last, self.count = now, 0


class ClientNoise(logging.Filter):
    """uvicorn's warnings that a client causes with one request (on logger `uvicorn.error`): each kept
    to one line per `every_s`, that line saying how many like it were dropped since the last. uvicorn's
    advice to install a WebSocket library is dropped: the API serves no WebSocket."""

    LIMITED = ("Invalid HTTP request received.", "Unsupported upgrade request.", "Exceeded concurrency limit.")
    DROPPED = ("No supported WebSocket library detected",)

    def __init__(self, every_s: float = NOISE_EVERY_S, clock=time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self.last: dict[str, tuple[float, int]] = {}  # message -> (logged at, dropped since)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith(self.DROPPED):
            return False
        if msg not in self.LIMITED:
            return True
        now = self.clock()
        at, dropped = self.last.get(msg, (-math.inf, 0))
        if now - at < self.every_s:
            self.last[msg] = (at, dropped + 1)
            return False
        self.last[msg] = (now, 0)
        if dropped:
            record.msg, record.args = f"{msg} ({dropped} more like it not logged in the last %g s)", (self.every_s,)
        return True


def quiet_client_noise() -> None:
    """Put one `ClientNoise` on uvicorn's error logger (after uvicorn configured its logging)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientNoise) for f in logger.filters):
        logger.addFilter(ClientNoise())


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    previous = loop.get_exception_handler()
    if not isinstance(previous, _AcceptErrors):
        loop.set_exception_handler(_AcceptErrors(previous))


def _handshake_timeout(loop: asyncio.AbstractEventLoop, seconds: float):
    """`loop.create_server` giving TLS handshakes `seconds` (uvicorn passes none: asyncio's 60 s): a client
    that opens a TLS connection and never completes the handshake holds it no longer than a slow head."""
    create = loop.create_server

    async def create_server(*args, **kw):
        if kw.get("ssl") is not None:
            kw.setdefault("ssl_handshake_timeout", seconds)
        return await create(*args, **kw)

    return create_server


async def start_http_server(app, host: str, port: int, tls=None, limits: HttpServerLimits | None = None,
                            keys=None):
    """Serve `app` with uvicorn in the running event loop, bounded by `limits`, over TLS with `tls` (a
    `TLSFiles`); `keys` (ApiKeys) tell which connections passed the key check. Returns (server, task,
    bound port)."""
    import functools

    import uvicorn

    limits = limits or HttpServerLimits()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror}") from None
    tls_options = {} if tls is None else {"ssl_certfile": tls.cert_path, "ssl_keyfile": tls.key_path}
    protocol = functools.partial(BoundedProtocol, connections=Connections(limits, keys))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2,
                            backlog=1024, http=protocol, ws="none", timeout_keep_alive=limits.idle_timeout_s,
                            limit_concurrency=limits.max_connections + 1, **tls_options)
    server = uvicorn.Server(config)
    quiet_client_noise()
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop)
    loop.create_server = _handshake_timeout(loop, limits.header_timeout_s)
    try:
        task = loop.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
    finally:
        del loop.create_server  # the loop's own method again
    if task.done():
        task.result()
        raise UserError(f"the HTTP server on {host}:{port} did not start")
    return server, task, sock.getsockname()[1]


# ---- HTTP: a pure ASGI middleware (streaming responses and disconnects pass through untouched) -------
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(value: bytes | None) -> str | None:
    """The name in a Host header (`example.com:8000` -> `example.com`, `[::1]:80` -> `::1`), lowercased."""
    if not value:
        return None
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else None
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _json_reply(message: str, code: str, extra: tuple = ()) -> tuple[list, bytes]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra], body


class HttpGuard:
    """The Host header (with `allowed_hosts`: 421 for any other name, against DNS rebinding), then API keys
    (header `Authorization: Bearer KEY`) on every path but /health (and /metrics with `metrics_open`);
    the caller is handed to the endpoints (`current_caller()`)."""

    def __init__(self, app, guard: Guard, allowed_hosts: frozenset[str] | None = None) -> None:
        self.app = app
        self.guard = guard
        self.allowed_hosts = allowed_hosts
        self.open = OPEN_HTTP | ({"/metrics"} if guard.metrics_open else set())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or ()
        if self.allowed_hosts is not None:
            host = host_name(next((v for k, v in headers if k == b"host"), None))
            if host not in self.allowed_hosts:
                return await _reply(send, 421, *_json_reply(
                    "this server does not answer for that Host (--allowed-host)", "misdirected_request"))
        if scope.get("path") in self.open:
            return await self.app(scope, receive, send)
        header = next((v for k, v in headers if k == b"authorization"), None)
        caller = self.guard.authenticate(header, "http", f"{scope.get('method', '?')} {scope.get('path', '?')}"[:200])
        if caller is None:
            return await _reply(send, 401, *_json_reply(
                "a valid API key is required: header Authorization: Bearer KEY", "invalid_api_key",
                ((b"www-authenticate", b'Bearer realm="apar"'),)))
        CALLER.set(caller)
        return await self.app(scope, receive, send)


async def _reply(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def allowed_hosts(bind_host: str, extra: list[str] | None) -> frozenset[str] | None:
    """The Host names the HTTP API answers: `--allowed-host` names, plus the loopback names when it listens
    on loopback; None (any) when it listens elsewhere and no name is given."""
    loopback = bind_host in LOOPBACK_HOSTS or bind_host.startswith("127.")
    names = {n.strip().lower() for n in extra or () if n.strip()}
    if loopback:
        return frozenset(names | LOOPBACK_HOSTS | {bind_host})
    return frozenset(names) if names else None
