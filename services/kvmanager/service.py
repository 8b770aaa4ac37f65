"""The KV manager's gRPC service: a thin servicer over `KVManager`, health, reflection, and the reaper.

Each RPC is `convert.*_from_pb` -> one `KVManager` call -> `convert.*_to_pb`. Domain errors become status
codes in one place (`_call`): BadRequest -> INVALID_ARGUMENT (also for bytes that are not a message),
UnknownWorker -> NOT_FOUND, SeqConflict -> FAILED_PRECONDITION, StoreUnavailable -> UNAVAILABLE (retry:
nothing was applied), anything else -> INTERNAL (logged; the server goes on). An op the ledger refuses is
NOT a status: the StepResponse carries `error`, with the ops before it applied and the rest not, exactly
as the worker's own `ops.apply` does.

`serve()` starts a `grpc.server` (thread pool) plus a reaper thread that drops the ledger of every worker
whose registration expired and, while Redis is away, retries with backoff and reports the KVManager
service NOT_SERVING on the standard health service.
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from apar.protogen import stubs
from services.grpc_common import Malformed, safe_parser, server_options
from services.kvmanager import convert
from services.kvmanager.manager import KVManager
from services.kvmanager.metrics import KVMetrics
from services.kvmanager.records import BadRequest, SeqConflict, StoreUnavailable, UnknownWorker

log = logging.getLogger(__name__)
K = stubs().kvmanager_pb2
SERVICE = K.DESCRIPTOR.services_by_name["KVManager"]
_CODES = ((BadRequest, grpc.StatusCode.INVALID_ARGUMENT), (UnknownWorker, grpc.StatusCode.NOT_FOUND),
          (SeqConflict, grpc.StatusCode.FAILED_PRECONDITION), (StoreUnavailable, grpc.StatusCode.UNAVAILABLE))


class KVManagerServicer:
    """One method per RPC of apar.v1.KVManager; each takes the request message, returns the response."""

    def __init__(self, manager: KVManager, default_ttl_s: int = 10) -> None:
        self.manager = manager
        self.default_ttl_s = default_ttl_s

    def Register(self, req):
        restored, free = self.manager.register(convert.spec_from_pb(req, self.default_ttl_s))
        return K.RegisterResponse(restored=restored, free_blocks=free)

    def Heartbeat(self, req):
        return K.HeartbeatResponse(known=self.manager.heartbeat(req.worker_id))

    def Step(self, req):
        result = self.manager.step(req.worker_id, req.seq, convert.ops_from_pb(req.ops))
        return convert.answer_to_pb(result.answer, result.free_blocks)

    def Release(self, req):
        result = self.manager.release(req.worker_id, req.request)
        return convert.answer_to_pb(result.answer, result.free_blocks)

    def Usage(self, req):
        return convert.usage_to_pb(self.manager.usage())

    def State(self, req):
        return convert.state_to_pb(self.manager.state(req.worker_id))


def _call(impl):
    """Run one RPC; a domain error becomes its status code, a bug becomes INTERNAL, never a crash."""
    def handler(request, context):
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
        try:
            return impl(request)
        except Exception as exc:  # the status is set below, outside the except (abort raises)
            code = next((c for t, c in _CODES if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("KV manager bug in %s", impl.__name__)
            message = f"{type(exc).__name__}: {exc}" if code == grpc.StatusCode.INTERNAL else str(exc)
        context.abort(code, message)

    return handler


def add_servicer(server: grpc.Server, servicer: KVManagerServicer) -> None:
    handlers = {}
    for method in SERVICE.methods:
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _call(getattr(servicer, method.name)), request_deserializer=safe_parser(req_cls),
            response_serializer=resp_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


@dataclass
class KVManagerServer:
    """A running KV manager: its gRPC server, domain object and metrics; `stop()` ends both threads."""

    server: grpc.Server
    port: int
    manager: KVManager
    metrics: KVMetrics
    health: health.HealthServicer
    reap_every_s: float
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

    def _serving(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(SERVICE.full_name, status)

    def stop(self, grace: float | None = 1.0) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self._reaper is not None:
            self._reaper.join(timeout=5)

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(address: str = "127.0.0.1:0", redis_url: str | None = None, *, prefix: str = "apar:", ttl_s: int = 10,
          reap_every_s: float = 1.0, snapshot_every: int = 64, metrics_port: int | None = None,
          registry: CollectorRegistry | None = None, max_workers: int = 16) -> KVManagerServer:
    """Start a KV manager on `address` (port 0: a free one, see `.port`). With `redis_url` every ledger
    lives in Redis under `prefix` and is loaded from there now (or, if Redis is down, once it is back);
    without it the ledgers live in memory only."""
    from services.kvmanager.store import RedisStore

    metrics = KVMetrics(registry)
    store = None
    if redis_url:
        store = RedisStore(redis_url, prefix, snapshot_every, on_round_trip=metrics.round_trip)
    manager = KVManager(store, metrics)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="apar-kv"),
                         options=server_options())
    add_servicer(server, KVManagerServicer(manager, ttl_s))
    checker = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection((SERVICE.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    handle = KVManagerServer(server, port, manager, metrics, checker, reap_every_s)
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        manager.sync()
        handle._serving(True)
    except StoreUnavailable as exc:
        log.warning("Redis unreachable at start (%s); ledgers load when it answers", exc)
        handle._serving(False)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        handle._metrics_http, _ = start_http_server(metrics_port, registry=metrics.registry)
    server.start()
    handle.start_reaper()
    return handle
