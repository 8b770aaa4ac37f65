"""Mutual TLS with a role per service: a server answers only callers whose certificate names a role it serves.

Mutual TLS alone accepts any certificate of the CA: a worker's certificate would let its holder call
another worker's `Generate` as if it were a router. With a certificate per role (a DNS name in its
subjectAltName, say `apar-router`, `apar-worker`, `apar-kvmanager`) each server is given the names of
its callers (`--tls-peer-names`): a worker accepts the routers' only, the KV manager the workers' and the
routers'. Every call but health checking from a peer whose certificate carries none of them is refused
`PERMISSION_DENIED` (logged at most once a minute, with a count). The other way round the clients
already check the server they dial against a name (`--tls-server-name`, the router's
`--internal-tls-server-name` for workers and `--internal-tls-kvmanager-name` for the KV manager), so a
router sends requests only to peers whose certificate names the worker role.

Only subjectAltName entries count (as a browser checks a server), never the subject's common name.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
import time

import grpc

from apar.engine.errors import UserError
from services.grpc_common import abort_unless_gone, behavior_of, handler_like

log = logging.getLogger(__name__)

OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes stay open (as with the cluster token)
_NAME = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9.*_-]*[A-Za-z0-9])?$")


def parse_peer_names(text: str | None, flag: str = "--tls-peer-names") -> tuple[str, ...]:
    """The names of a comma-separated list (empty or None: none); a name that is no DNS-like word is refused."""
    if text is None:
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UserError(f"{flag} is empty: give the DNS names (subjectAltName) of the callers' certificates, "
                        "comma-separated")
    for n in names:
        if not _NAME.match(n) or len(n) > 253:
            raise UserError(f"{flag}: {n!r} is not a DNS name")
    return names


def names_of(context) -> list[str]:
    """The subjectAltName entries of the caller's certificate ([] over plaintext or without one)."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 (a context without one: no names)
        return []
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            for v in auth.get("x509_subject_alternative_name", ())]


class _Refusals:
    """One warning at the first refusal, then at most one a minute with the count since."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last = -1e18
        self._count = 0
        self._lock = threading.Lock()

    def note(self, what: str, method: str, names: list[str]) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self.every_s:
                return
            count, self._count, self._last = self._count, 0, now
        log.warning("%s refused %d internal call(s) from a certificate of another role; the last: %s from "
                    "a certificate naming %s", what, count, method, ", ".join(names) or "nothing")


class PeerNamesServer(grpc.aio.ServerInterceptor):
    """A server's check, on every call but health checking, that the caller's certificate names a role it
    serves (`names`); other callers get PERMISSION_DENIED before the method runs."""

    def __init__(self, names: tuple[str, ...], what: str) -> None:
        if not names:
            raise ValueError("no peer names")
        self.names = tuple(names)
        self.what = what
        self._refusals = _Refusals()

    def refusal(self, context, method: str) -> str | None:
        """Why the call is refused (None: its caller's certificate names an accepted role)."""
        names = names_of(context)
        if any(n in self.names for n in names):
            return None
        self._refusals.note(self.what, method, names)
        return (f"internal call refused: the caller's certificate names none of {', '.join(self.names)} "
                "(the roles allowed to call this service; see --tls-peer-names)")

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        return _checking_handler(handler, lambda context: self.refusal(context, details.method))


def _checking_handler(handler, refusal):
    """`handler`, refusing the call PERMISSION_DENIED first when `refusal(context)` says why. A blocking
    behavior stays blocking (the server runs it in its thread pool)."""
    inner = behavior_of(handler)
    code = grpc.StatusCode.PERMISSION_DENIED
    if inspect.isasyncgenfunction(inner):
        async def behavior(request, context):
            if (why := refusal(context)) is not None:
                await abort_unless_gone(context, code, why)
                return
            async for item in inner(request, context):
                yield item
    elif asyncio.iscoroutinefunction(inner):
        async def behavior(request, context):
            if (why := refusal(context)) is not None:
                await abort_unless_gone(context, code, why)
                return None
            return await inner(request, context)
    else:
        def behavior(request, context):
            if (why := refusal(context)) is not None:
                context.abort(code, why)
            return inner(request, context)
    return handler_like(handler, behavior, handler.request_deserializer)
