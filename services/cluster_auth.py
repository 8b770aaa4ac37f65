"""The cluster token: how the router, the workers and the KV manager know each other.

Every service of one deployment reads the same secret (`--cluster-token-file PATH`, else
`$APAR_CLUSTER_TOKEN`; the Helm chart makes it a Secret). The token itself never travels:

- **A call proves its caller.** Each internal call carries the metadata `apar-cluster-auth:
  v1.<unix seconds>.<nonce>.<HMAC-SHA256(token, "call", method, seconds, nonce)>`. A server with a token
  refuses, UNAUTHENTICATED, every call but health checking whose MAC is wrong, whose time is more than
  `MAX_SKEW_S` from its own clock, or whose nonce it has seen within that window (a captured header
  cannot be replayed).
- **An answer proves its server.** A server that accepted a call sets the trailing metadata
  `apar-cluster-proof: HMAC(token, "proof", method, nonce)`, bound to the caller's fresh nonce. A client
  with a token refuses, UNAUTHENTICATED, the answer of every unary call without a valid proof: the
  router marks a worker live only from an `Info` its worker proved, so an address that some other pod
  registered, or now holds, never gets a request; a worker refuses a KV manager that cannot prove itself.

What it does not do: encrypt. On a plaintext network a pod that can sniff the traffic reads the prompts,
and one that can sit in the middle of a connection can relay it; internal mutual TLS
(`services/security.py`) closes both, and the token still applies inside it. Clocks of the nodes must
agree within `MAX_SKEW_S` (NTP does).
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from apar.engine.errors import UserError
from services.grpc_common import aborting_handler, handler_with_trailers

log = logging.getLogger(__name__)

TOKEN_ENV = "APAR_CLUSTER_TOKEN"
AUTH_KEY = "apar-cluster-auth"
PROOF_KEY = "apar-cluster-proof"
MAX_SKEW_S = 60
MIN_TOKEN_CHARS = 32
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes stay open
_VERSION = "v1"


def _method(method: str | bytes) -> str:
    return method.decode("ascii", "replace") if isinstance(method, bytes) else method


@dataclass(slots=True)
class ClusterToken:
    """The shared secret, and the nonces of the calls accepted within the skew window (server side)."""

    secret: bytes = field(repr=False)
    source: str  # where it came from, for messages: never the token
    max_skew_s: int = MAX_SKEW_S
    _seen: OrderedDict = field(default_factory=OrderedDict, repr=False)  # nonce -> unix seconds accepted
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_TOKEN_CHARS:
            raise UserError(f"the cluster token ({self.source}) is shorter than {MIN_TOKEN_CHARS} characters: "
                            "make one with `openssl rand -hex 32`")

    @classmethod
    def load(cls, path: str | None, env: dict | None = None) -> ClusterToken | None:
        """The token of `path` (its first line), else of $APAR_CLUSTER_TOKEN; None when neither is set."""
        env = os.environ if env is None else env
        if path is not None:
            if not path:
                raise UserError("--cluster-token-file is empty: give the path of the token's file")
            try:
                text = Path(path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"--cluster-token-file: cannot read {path}: "
                                f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
            return cls(text.encode(), f"--cluster-token-file {path}")
        if env.get(TOKEN_ENV):
            return cls(env[TOKEN_ENV].strip().encode(), f"${TOKEN_ENV}")
        return None

    def _mac(self, *parts: str) -> str:
        return hmac.new(self.secret, "|".join(parts).encode(), hashlib.sha256).hexdigest()

    # ---- the caller's side ----------------------------------------------------------------------------
    def sign(self, method: str | bytes, now: float | None = None) -> tuple[str, str]:
        """(the `apar-cluster-auth` value of a call to `method`, its nonce)."""
        ts, nonce = str(int(time.time() if now is None else now)), secrets.token_hex(16)
        return f"{_VERSION}.{ts}.{nonce}.{self._mac('call', _method(method), ts, nonce)}", nonce

    def proves(self, value: str | None, method: str | bytes, nonce: str) -> bool:
        """Whether a server's `apar-cluster-proof` answers the call to `method` signed with `nonce`."""
        return value is not None and hmac.compare_digest(value, self._mac("proof", _method(method), nonce))

    # ---- the server's side ----------------------------------------------------------------------------
    def check(self, value: str | None, method: str, now: float | None = None) -> tuple[str | None, str]:
        """(why the call is refused, or None; its nonce). An accepted nonce is remembered."""
        if value is None:
            return "no cluster token", ""
        parts = value.split(".")
        if len(parts) != 4 or parts[0] != _VERSION or not parts[1].isdigit() or len(parts[2]) != 32:
            return "a malformed cluster token header", ""
        _, ts, nonce, mac = parts
        if not hmac.compare_digest(mac, self._mac("call", method, ts, nonce)):
            return "a wrong cluster token", ""
        now = time.time() if now is None else now
        if abs(now - int(ts)) > self.max_skew_s:
            return f"a call signed {now - int(ts):+.0f} s away from this clock (at most {self.max_skew_s} s)", ""
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * self.max_skew_s:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return "a replayed call", ""
            self._seen[nonce] = now
        return None, nonce

    def proof(self, method: str, nonce: str) -> str:
        return self._mac("proof", method, nonce)


# ---- flags --------------------------------------------------------------------------------------------
def add_cluster_token_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-token-file", default=None, metavar="PATH",
                   help=f"the secret every internal service of this deployment shares (else ${TOKEN_ENV}): "
                        "every internal call is authenticated with it, both ways; without it internal calls are "
                        "not authenticated")
    p.add_argument("--allow-open-internal", action="store_true",
                   help="run without the cluster token and without internal mutual TLS where that is refused "
                        "otherwise (a worker or KV manager listening beyond loopback; a router with "
                        "--api-key-file): only on a network that nothing else can reach")


def is_loopback(host: str) -> bool:
    """Whether `host` (a service's --host) is reachable from this machine only."""
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_open_listener(args, token: ClusterToken | None, tls, what: str) -> None:
    """A worker or KV manager listening beyond loopback with neither the cluster token nor internal mutual
    TLS is refused (UserError), unless --allow-open-internal: anyone who reaches its port could register as a
    worker, or generate past the router's keys and limits."""
    host = getattr(args, "host", "127.0.0.1")
    if token is not None or tls is not None or getattr(args, "allow_open_internal", False) or is_loopback(host):
        return
    raise UserError(f"{what} on {host} with neither --cluster-token-file (${TOKEN_ENV}) nor internal mutual TLS: "
                    "anyone who reaches its port could register as a worker and receive prompts, or generate "
                    "past the router's keys and limits. Give every router, worker and KV manager the same "
                    "--cluster-token-file (e.g. `openssl rand -hex 32`), or --allow-open-internal where "
                    "nothing else can reach it")


def cluster_token(args) -> ClusterToken | None:
    return ClusterToken.load(getattr(args, "cluster_token_file", None))


def describe(token: ClusterToken | None) -> str:
    return "cluster token" if token is not None else "no cluster token"


def warn_if_open(token: ClusterToken | None, what: str, risk: str) -> None:
    """One warning at start when a service runs without the cluster token, saying what that exposes."""
    if token is None:
        log.warning("%s without a cluster token (--cluster-token-file or $%s): %s", what, TOKEN_ENV, risk)


SERVER_RISK = "internal calls are not authenticated: any process that reaches its port can use it"
ROUTER_RISK = "workers are not authenticated: requests go to whatever address registers or is listed"


class _Refusals:
    """One log line per refused call at first, then at most one a minute with the count since."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last = -1e18
        self._count = 0
        self._lock = threading.Lock()

    def note(self, what: str, method: str, reason: str) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self.every_s:
                return
            count, self._count, self._last = self._count, 0, now
        log.warning("%s refused %d internal call(s) without a valid cluster token; the last: %s, %s",
                    what, count, method, reason)


# ---- gRPC: the server's interceptor, the clients' interceptors -----------------------------------------
class ClusterAuthServer(grpc.aio.ServerInterceptor):
    """A server's check of every call but health checking; accepted calls get the proof in their trailers."""

    def __init__(self, token: ClusterToken, what: str) -> None:
        self.token = token
        self.what = what
        self._refusals = _Refusals()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        value = next((v for k, v in details.invocation_metadata or () if k == AUTH_KEY), None)
        reason, nonce = self.token.check(value if isinstance(value, str) else None, details.method)
        if reason is not None:
            self._refusals.note(self.what, details.method, reason)
            return aborting_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                    f"internal call refused: {reason} (every service needs the same "
                                    "--cluster-token-file)")
        return handler_with_trailers(handler, ((PROOF_KEY, self.token.proof(details.method, nonce)),))


def _with_auth(token: ClusterToken, details, metadata_cls):
    value, nonce = token.sign(details.method)
    metadata = metadata_cls(*(details.metadata or ())) if metadata_cls is not None else \
        [*(details.metadata or ())]
    if metadata_cls is None:
        metadata.append((AUTH_KEY, value))
    else:
        metadata.add(AUTH_KEY, value)
    return details._replace(metadata=metadata), nonce


def _unproven(method) -> str:
    return (f"{_method(method)}: the server did not prove it holds the cluster token (a stranger at that "
            "address, or a service started without the same --cluster-token-file)")


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: ClusterToken) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        details, nonce = _with_auth(self.token, client_call_details, grpc.aio.Metadata)
        call = await continuation(details, request)
        response = await call
        trailers = await call.trailing_metadata()
        if not self.token.proves(trailers.get(PROOF_KEY) if trailers else None, details.method, nonce):
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(),
                                       trailers or grpc.aio.Metadata(), details=_unproven(details.method))
        return response


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: ClusterToken) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_auth(self.token, client_call_details, grpc.aio.Metadata)[0], request)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: ClusterToken) -> None:
        self.token = token

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_auth(self.token, client_call_details, grpc.aio.Metadata)[0],
                                  request_iterator)


class UnprovenServer(grpc.RpcError):
    """A unary answer without the server's proof (sync clients)."""

    def __init__(self, method) -> None:
        super().__init__(_unproven(method))
        self._details = _unproven(method)

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return ()


class _SyncAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    def __init__(self, token: ClusterToken) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation, client_call_details, request):
        details, nonce = _with_auth(self.token, client_call_details, None)
        outcome = continuation(details, request)
        if outcome.exception() is None:
            trailers = dict(outcome.trailing_metadata() or ())
            if not self.token.proves(trailers.get(PROOF_KEY), details.method, nonce):
                raise UnprovenServer(details.method)
        return outcome

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(_with_auth(self.token, client_call_details, None)[0], request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(_with_auth(self.token, client_call_details, None)[0], request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(_with_auth(self.token, client_call_details, None)[0], request_iterator)


def aio_client_interceptors(token: ClusterToken) -> list:
    return [_AioUnaryUnary(token), _AioUnaryStream(token), _AioStreamStream(token)]


def intercept_sync(channel, token: ClusterToken):
    return grpc.intercept_channel(channel, _SyncAuth(token))
