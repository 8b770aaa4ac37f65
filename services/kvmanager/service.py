"""The KV manager's gRPC service: a thin servicer over `KVManager`, health, reflection, and the reaper.

Each RPC is `wire.*_from_pb` -> one `KVManager` call -> `wire.*_to_pb`; `Steps` is a stream of
them, one StepAck per StepBatch. Domain errors become status codes in one place (`_status`):
BadRequest -> INVALID_ARGUMENT (also for bytes that are not a message), UnknownWorker -> NOT_FOUND,
WorkerIdTaken (another live process holds the id) -> ALREADY_EXISTS, StaleSession (a message of a
process that no longer holds its id) -> FAILED_PRECONDITION,
StoreUnavailable -> UNAVAILABLE (send again: nothing was done; on `Steps` only before the ledgers were
ever loaded, since a message does not wait for Redis), anything else -> INTERNAL (logged; the server
goes on); on `Steps` the error ends the stream. An op the replica refuses is NOT a status:
the ack asks the worker for a resync.

`serve()` starts a `grpc.aio` server on an event loop of its own thread: every worker's `Steps` stream
is served there (no thread per stream: a message is applied and answered with no thread switch; the
manager's writer thread takes it to Redis after), the unary calls in a small thread pool (they may
wait on Redis). Beside it a reaper thread
drops the ledger of every worker whose registration expired and, while Redis is away, retries with
backoff and reports the KVManager service NOT_SERVING on the standard health service.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from apar.protogen import stubs
from services.grpc_common import add_health_and_reflection, add_servicer, host_of, server_options
from services.kvmanager import wire
from services.kvmanager.manager import KVManager
from services.kvmanager.metrics import KVMetrics
from services.kvmanager.records import BadRequest, StaleSession, StoreUnavailable, UnknownWorker, WorkerIdTaken
from services.security import internal_interceptors, open_port

log = logging.getLogger(__name__)
K = stubs().kvmanager_pb2
SERVICE = K.DESCRIPTOR.services_by_name["KVManager"]
_CODES = ((BadRequest, grpc.StatusCode.INVALID_ARGUMENT), (UnknownWorker, grpc.StatusCode.NOT_FOUND),
          (StoreUnavailable, grpc.StatusCode.UNAVAILABLE), (WorkerIdTaken, grpc.StatusCode.ALREADY_EXISTS),
          (StaleSession, grpc.StatusCode.FAILED_PRECONDITION))


class KVManagerServicer:
    """One method per RPC of apar.v1.KVManager; each takes a request message, returns its response."""

    def __init__(self, manager: KVManager, default_ttl_s: int = 10) -> None:
        self.manager = manager
        self.default_ttl_s = default_ttl_s

    def Register(self, req, context):
        restored, free = self.manager.register(wire.spec_from_pb(req, self.default_ttl_s), req.session)
        return K.RegisterResponse(restored=restored, free_blocks=free)

    def Heartbeat(self, req, context):
        return K.HeartbeatResponse(known=self.manager.heartbeat(req.worker_id, req.session))

    async def Steps(self, req):
        return wire.ack_to_pb(self.manager.submit(req.worker_id, wire.batch_from_pb(req)))

    def Usage(self, req, context):
        return wire.usage_to_pb(self.manager.usage())

    def State(self, req, context):
        return wire.state_to_pb(self.manager.state(req.worker_id))

    def Prefix(self, req, context):
        return wire.prefix_to_pb(self.manager.prefix(list(req.names)))


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """A domain error's status code and message; a bug is INTERNAL (and logged), never a crash."""
    code = next((c for t, c in _CODES if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("KV manager bug")
        return code, f"{type(exc).__name__}: {exc}"
    return code, str(exc)


@dataclass
class KVManagerServer:
    """A running KV manager: its gRPC server (on `loop`), domain object and metrics; `stop()` ends its
    threads."""

    server: grpc.aio.Server
    port: int
    manager: KVManager
    metrics: KVMetrics
    health: health.aio.HealthServicer
    reap_every_s: float
    loop: asyncio.AbstractEventLoop
    _loop_thread: threading.Thread
    _stop: threading.Event = field(default_factory=threading.Event)
    _reaper: threading.Thread | None = None
    _metrics_http: object | None = None  # prometheus_client's HTTP server, when a metrics port was given

    def start_reaper(self) -> None:
        self._reaper = threading.Thread(target=self._reap_loop, name="apar-kv-reaper", daemon=True)
        self._reaper.start()

    def _reap_loop(self) -> None:
        wait = self.reap_every_s
        while not self._stop.wait(wait):
            try:
                self.manager.reap()
            except StoreUnavailable as exc:
                self._serving(False)
                wait = min(2.0, wait * 2)
                log.warning("Redis unreachable (%s); retrying in %.1f s", exc, wait)
                continue
            except Exception:
                log.exception("KV manager reaper")
            self._serving(True)
            wait = self.reap_every_s

    def _serving(self, ok: bool, wait: bool = False) -> None:
        """Sets the health status on the server's loop. The reaper does not wait for it: a loop busy with a
        long resync must not time the reaper out and end its thread."""
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        done = asyncio.run_coroutine_threadsafe(self.health.set(SERVICE.full_name, status), self.loop)
        if wait:
            done.result(timeout=10)

    def stop(self, grace: float | None = 1.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)

        async def shutdown() -> None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=(grace or 0) + 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(timeout=10)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.manager.close()

    def wait(self) -> None:
        self._loop_thread.join()


def serve(address: str = "127.0.0.1:0", redis_url: str | None = None, *, prefix: str = "apar:", ttl_s: int = 10,
          reap_every_s: float = 1.0, snapshot_every: int = 256, metrics_port: int | None = None,
          registry: CollectorRegistry | None = None, max_workers: int = 16, tls=None,
          round_every_s: float = 0.05, token=None) -> KVManagerServer:
    """Start a KV manager on `address` (port 0: a free one, see `.port`). With `redis_url` every ledger
    lives in Redis under `prefix` and is loaded from there now (or, if Redis is down, once it is back);
    without it the ledgers live in memory only. With `token` (services/cluster_auth.py) every call but
    health checking must prove it; the metrics port binds the address's host."""
    from services.kvmanager.store import RedisStore

    metrics = KVMetrics(registry)
    store = None
    if redis_url:
        store = RedisStore(redis_url, prefix, snapshot_every, on_round_trip=metrics.round_trip)
    manager = KVManager(store, metrics, round_every_s=round_every_s)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="apar-kv-grpc", daemon=True)
    loop_thread.start()

    async def create():
        server = grpc.aio.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="apar-kv"),
                                 options=server_options(), interceptors=internal_interceptors(token, "KV manager", tls))
        add_servicer(server, KVManagerServicer(manager, ttl_s), SERVICE, errors=_status)
        checker = await add_health_and_reflection(server, [SERVICE.full_name])
        port = open_port(server, address, tls)  # mutual TLS with a TLSFiles (services/security.py)
        return server, checker, port

    try:
        server, checker, port = asyncio.run_coroutine_threadsafe(create(), loop).result(timeout=30)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        raise
    handle = KVManagerServer(server, port, manager, metrics, checker, reap_every_s, loop, loop_thread)
    try:
        manager.sync()
        handle._serving(True, wait=True)
    except StoreUnavailable as exc:
        log.warning("Redis unreachable at start (%s); ledgers load when it answers", exc)
        handle._serving(False, wait=True)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        handle._metrics_http, _ = start_http_server(metrics_port, addr=host_of(address), registry=metrics.registry)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
    handle.start_reaper()
    return handle
