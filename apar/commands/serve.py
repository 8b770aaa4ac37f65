"""`apar serve` (router + worker + in-process KV ledger in one process), `apar worker`, `apar router`."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid

from apar.engine.errors import UserError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from apar.commands.generate import add_engine_args
    from services.cluster_auth import add_cluster_token_arg
    from services.router.guard import add_public_args
    from services.security import add_internal_tls_args

    s = subparsers.add_parser("serve", help="serve a model: router, worker and KV ledger in one process")
    s.add_argument("--model", required=True, help="local Hugging Face model directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--metrics-port", type=int, default=None, help="expose Prometheus metrics on this port (on --host)")
    s.add_argument("--http-port", type=int, default=None, help="also serve the OpenAI-compatible HTTP API on this "
                                                                "port (/v1/chat/completions, /v1/completions, ...)")
    s.add_argument("--served-model-name", default=None, help="the model id clients name (default: the --model path)")
    add_public_args(s)
    _add_stream_buffer_arg(s)
    add_engine_args(s)
    s.set_defaults(func=run_serve)

    w = subparsers.add_parser("worker", help="run a worker: the decode engine behind the internal gRPC API")
    w.add_argument("--model", required=True)
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, default=50061)
    w.add_argument("--worker-id", default=None, help="default: a new id each start")
    w.add_argument("--advertise", default=None, help="address the router reaches this worker at "
                                                      "(default: host:port)")
    w.add_argument("--kvmanager", default=None, help="HOST:PORT of the KV manager (cluster mode), or every "
                                                     "shard's, comma-separated (the worker id picks its own); "
                                                     "without it the worker keeps its ledger in-process")
    w.add_argument("--kv-ttl", type=int, default=10, help="registration time-to-live at the KV manager, s")
    w.add_argument("--kv-max-lag", type=_positive_s, default=5.0, metavar="S",
                   help="the lag bound: while the KV manager's replica is more than this many seconds behind, "
                        "the engine waits for it (5)")
    w.add_argument("--kv-lag-wait", type=_positive_s, default=10.0, metavar="S",
                   help="after waiting this long past the lag bound, the running requests end with the "
                        "error \"the KV manager is unavailable\"; until it catches up nothing is admitted, and a "
                        "new request waits for it at most this long (10)")
    w.add_argument("--metrics-port", type=int, default=None, help="expose Prometheus metrics on this port (on --host)")
    w.add_argument("--served-model-name", default=None, help="the model it serves, as the router names it (its "
                                                             "--served-model-name): registered with the KV "
                                                             "manager and the model_name label of its metrics "
                                                             "(default: the --model path)")
    add_internal_tls_args(w, "--tls", peers=True)
    add_cluster_token_arg(w)
    _add_stream_buffer_arg(w)
    add_engine_args(w)
    w.set_defaults(func=run_worker)

    r = subparsers.add_parser("router", help="run the router: the public gRPC API in front of workers")
    r.add_argument("--model", required=True, help="model directory (its tokenizer is used)")
    r.add_argument("--workers", default=None, help="comma-separated worker addresses host:port")
    r.add_argument("--kvmanager", default=None, help="HOST:PORT of the KV manager, or every shard's, "
                                                     "comma-separated: workers and their free blocks come from it")
    r.add_argument("--discovery", choices=("static", "kvmanager", "kubernetes"), default=None,
                   help="how workers are found: static (--workers, the default with it), kvmanager (the "
                        "default with --kvmanager), kubernetes (the EndpointSlices of --worker-service)")
    r.add_argument("--worker-service", default=None, help="kubernetes discovery: the workers' Service")
    r.add_argument("--worker-namespace", default=None, help="kubernetes discovery: the Service's namespace "
                                                            "(default: the router pod's own, else default)")
    r.add_argument("--worker-port-name", default="grpc", help="kubernetes discovery: the name of the "
                                                              "Service port workers serve gRPC on (grpc)")
    r.add_argument("--kube-api", default=None, help="kubernetes discovery: the API server's URL, plain "
                                                    "(e.g. kubectl proxy's http://127.0.0.1:8001); default: "
                                                    "the in-cluster service account, else the kubeconfig")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=50051)
    r.add_argument("--metrics-port", type=int, default=None, help="expose Prometheus metrics on this port (on --host)")
    r.add_argument("--http-port", type=int, default=None, help="also serve the OpenAI-compatible HTTP API here")
    r.add_argument("--served-model-name", default=None, help="the model id clients name (default: the --model path)")
    add_public_args(r)
    add_internal_tls_args(r, "--internal-tls")
    r.add_argument("--internal-tls-kvmanager-name", default=None, metavar="NAME",
                   help="check the KV manager against NAME instead of --internal-tls-server-name (where each "
                        "role has its own certificate, the workers' name and the KV manager's differ)")
    add_cluster_token_arg(r)
    r.set_defaults(func=run_router)


def _add_stream_buffer_arg(p) -> None:
    from apar.engine.config import STREAM_BUFFER_EVENTS

    def events(text: str) -> int:
        value = int(text)
        if value < 1:
            raise ValueError(text)
        return value

    p.add_argument("--stream-buffer", type=events, default=STREAM_BUFFER_EVENTS, metavar="EVENTS",
                   help="events (tokens, thread starts and ends) of one request that may wait for a client "
                        "reading slower than they are generated; past it the request ends RESOURCE_EXHAUSTED "
                        f"({STREAM_BUFFER_EVENTS})")


def _positive_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"seconds in (0, 3600], got {text!r}")
    return value


def _setup() -> None:
    from apar.quiet import quiet_transformers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    quiet_transformers()


async def _until_signal(*servers, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGINT or SIGTERM (or `stop` is set), then stop the servers gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        await server.stop(grace=2.0)


def _engine(args, registry):
    from apar.commands.generate import engine_config
    from apar.engine.engine import Engine
    from services.worker.loop import EngineLoop
    from services.worker.metrics import WorkerMetrics

    engine = Engine(args.model, engine_config(args))
    metrics = WorkerMetrics(getattr(args, "served_model_name", None) or str(args.model), registry)
    return engine, EngineLoop(engine, on_step=metrics.on_step), metrics


def _metrics(port: int | None, registry, host: str) -> None:
    """Prometheus metrics on `host:port` (the service's own --host: never wider than its API)."""
    if port is not None:
        from prometheus_client import start_http_server

        try:
            start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None


def run_serve(args) -> int:
    from prometheus_client import CollectorRegistry

    security = _public_security(args)  # bad security flags fail before the model loads
    _setup()
    registry = CollectorRegistry()
    engine, loop, _ = _engine(args, registry)
    _embedded_kv_manager(engine, loop)
    return asyncio.run(_serve(args, engine, loop, registry, security))


def _public_security(args):
    """(TLS files or None, the Guard) of the public APIs, from the flags (the HTTP server's bounds checked)."""
    from services.router.guard import guard_from_args, public_tls
    from services.router.http_limits import http_limits_from_args

    http_limits_from_args(args)
    return public_tls(args), guard_from_args(args)


def _embedded_kv_manager(engine, loop) -> None:
    """The KV manager in this process, in memory: the worker's ledger is mirrored by it as in a cluster."""
    from services.kvmanager.inprocess import InProcessClient
    from services.kvmanager.manager import KVManager
    from services.worker.kv import RemoteKV

    client = InProcessClient(KVManager(store=None), "embedded", "in-process", engine.ledger.num_blocks,
                             engine.ledger.block_size)
    client.register()
    loop.call(lambda e: setattr(e, "kv", RemoteKV(e.ledger, client))).result(timeout=10)


async def _front_doors(args, tokenizer, directory, registry=None, security=None):
    """The gateway and its front doors: the gRPC server, and the HTTP server when --http-port is given,
    both behind the same guard (API keys, limits) and TLS when --tls-cert is given.
    Returns (servers to stop, a line saying where they listen)."""
    from services.router.gateway import Gateway
    from services.router.metrics import RouterMetrics
    from services.router.service import RouterService, start_router_server

    tls, guard = security or _public_security(args)
    model_name = args.served_model_name or str(args.model)
    gateway = Gateway(tokenizer, directory, model_name, RouterMetrics(model_name, registry), guard)
    grpc_server, port = await start_router_server(RouterService(gateway), f"{args.host}:{args.port}", tls)
    servers, where = [grpc_server], f"{args.host}:{port}"
    if args.http_port is not None:
        from services.router.http import build_app
        from services.router.http_limits import http_limits_from_args
        from services.router.http_server import allowed_hosts, start_http_server

        limits = http_limits_from_args(args)
        app = build_app(gateway, request_timeout_s=limits.request_timeout_s,
                        allowed_hosts=allowed_hosts(args.host, args.allowed_host))
        http, _, http_port = await start_http_server(app, args.host, args.http_port, tls, limits, guard.keys)
        servers.append(_UvicornStopper(http))
        where += f", HTTP on {args.host}:{http_port}"
    where += f" ({'TLS' if tls else 'plaintext'}, " + \
             (f"{len(guard.keys)} API keys" if guard.keys is not None else "no API keys") + ")"
    _metrics(args.metrics_port, gateway.metrics.registry, args.host)
    return servers, where


class _UvicornStopper:
    """A uvicorn server behind the `stop(grace)` the gRPC servers have."""

    def __init__(self, server) -> None:
        self.server = server

    async def stop(self, grace: float) -> None:
        self.server.should_exit = True
        await self.server.shutdown()


async def _serve(args, engine, loop, registry, security=None) -> int:
    from services.router.workers import WorkerDirectory
    from services.worker.service import start_worker_server

    with _private_socket_dir() as where:
        socket = f"unix:{where}/worker.sock"
        worker_server, _ = await start_worker_server(loop, socket, "embedded", str(args.model),
                                                     stream_buffer=args.stream_buffer)
        os.chmod(f"{where}/worker.sock", 0o600)
        directory = WorkerDirectory([socket])
        try:
            servers, listening = await _front_doors(args, engine.tokenizer, directory, registry, security)
            print(f"apar serve: listening on {listening} (model {args.model})", file=sys.stderr, flush=True)
            await _until_signal(*servers, worker_server)
        finally:
            await directory.close()
            loop.stop()
    return 0


@contextlib.contextmanager
def _private_socket_dir():
    """A directory only this user can enter (0700), removed at the end: the embedded worker's Unix socket
    (0600) lives there, so no other local user, and no TCP client at all, reaches the worker past the
    router's keys and limits."""
    where = tempfile.mkdtemp(prefix="apar-serve-")
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def run_worker(args) -> int:
    from services.cluster_auth import SERVER_RISK, cluster_token, describe, refuse_open_listener, warn_if_open
    from services.security import internal_tls

    tls = internal_tls(args, "--tls")  # bad flags fail before the model loads
    token = cluster_token(args)
    refuse_open_listener(args, token, tls, "apar worker")
    _setup()
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    engine, loop, _ = _engine(args, registry)
    _metrics(args.metrics_port, registry, args.host)

    wid = args.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
    model_name = args.served_model_name or str(args.model)  # what its Info and registration name
    client = None
    if args.kvmanager:
        client = _lease_pool(engine, loop, args, wid, tls, token)

    async def main() -> int:
        from services.worker.service import start_worker_server

        stop, fenced = asyncio.Event(), []
        if client is not None:  # another process took this worker's id: this one stops
            aloop = asyncio.get_running_loop()
            loop.engine.kv.on_fenced = lambda reason: (fenced.append(reason), aloop.call_soon_threadsafe(stop.set))
            if loop.engine.kv.fenced:
                fenced.append(loop.engine.kv.fenced)
                stop.set()
        server, port = await start_worker_server(loop, f"{args.host}:{args.port}", wid, model_name, tls, token,
                                                 args.stream_buffer)
        warn_if_open(token, "apar worker", SERVER_RISK)
        print(f"apar worker: {wid} listening on {args.host}:{port} ({tls.describe() if tls else 'plaintext'}, "
              f"{describe(token)})", file=sys.stderr, flush=True)
        try:
            await _until_signal(server, stop=stop)
        finally:
            loop.stop()
            if client is not None:
                client.close()
        if fenced:
            print(f"apar worker: {wid} stopped: {fenced[0]}", file=sys.stderr, flush=True)
            return 1
        return 0

    return asyncio.run(main())


def _lease_pool(engine, loop, args, wid: str, tls=None, token=None):
    """Cluster mode: register the pool with the KV manager, with the model it serves, and mirror its
    ledger (RemoteKV). While another live process holds the id (or a replacement's predecessor's
    registration has not expired yet), try again for two time-to-lives, then give up."""
    from services.kvmanager.replication import WorkerFenced
    from services.worker.kv import RemoteKV
    from services.worker.kvclient import KVManagerClient

    address = args.advertise or f"{args.host}:{args.port}"
    client = KVManagerClient(args.kvmanager, wid, address, engine.ledger.num_blocks, engine.ledger.block_size,
                             args.kv_ttl, tls=tls, token=token, model=args.served_model_name or str(args.model))
    deadline, said = time.monotonic() + 2 * args.kv_ttl + 1, False
    while True:
        try:
            restored = client.register()
            break
        except WorkerFenced as exc:
            if time.monotonic() > deadline:
                client.close()
                raise UserError(f"worker id {wid} is taken: {exc}. Stop the other process, or start with "
                                f"another --worker-id") from None
            if not said:
                log.warning("worker id %s is taken (%s); trying again until its registration expires", wid, exc)
                said = True
            time.sleep(0.5)
    if restored:  # (a new session cannot find a ledger of its own)
        raise UserError(f"the KV manager still holds a ledger for worker {wid}: start with a new --worker-id")
    loop.call(lambda e: setattr(e, "kv", RemoteKV(e.ledger, client, max_lag_s=args.kv_max_lag,
                                                  wait_s=args.kv_lag_wait))).result(timeout=10)
    client.start_heartbeat()
    return client


def run_router(args) -> int:
    from services.cluster_auth import ROUTER_RISK, cluster_token, describe, warn_if_open
    from services.security import internal_tls

    security = _public_security(args)  # bad security flags fail first
    tls = internal_tls(args, "--internal-tls")
    kv_tls = _kvmanager_tls(args, tls)
    token = cluster_token(args)
    if security[1].keys is not None and token is None and tls is None and not args.allow_open_internal:
        raise UserError("--api-key-file, but the workers and the KV manager are open: any process that reaches "
                        "them can register as a worker and receive the clients' prompts, or generate past the "
                        "keys and limits. Give every router, worker and KV manager the same --cluster-token-file "
                        "(or internal mutual TLS), or --allow-open-internal where nothing else can reach them")
    _setup()
    from services.router.tokenizer import load_tokenizer

    discovery = _router_discovery(args)
    addresses = [a.strip() for a in (args.workers or "").split(",") if a.strip()]
    api_client = None
    if discovery == "kubernetes":
        from services.router.discovery import kube_api_client

        api_client = kube_api_client(args.kube_api)
    tokenizer = load_tokenizer(args.model)

    served = args.served_model_name or str(args.model)

    async def main() -> int:
        from services.router.workers import WorkerDirectory

        if discovery == "kubernetes":
            from services.router.discovery import KubernetesDirectory

            directory = KubernetesDirectory(args.worker_service, args.worker_namespace, args.worker_port_name,
                                            api_client=api_client, tls=tls, token=token, model=served)
            directory.start()
            source = directory.where
        elif discovery == "kvmanager":
            from services.router.workers import KVManagerDirectory

            directory = KVManagerDirectory(args.kvmanager, tls=tls, token=token, model=served, kv_tls=kv_tls)
            source = f"KV manager {args.kvmanager}"
        else:
            directory = WorkerDirectory(addresses, tls=tls, token=token, model=served)
            source = f"workers {','.join(addresses)}"
        if tls is not None:
            source += f" over {tls.describe()}"
        source += f", {describe(token)}"
        warn_if_open(token, "apar router", ROUTER_RISK)
        servers, where = await _front_doors(args, tokenizer, directory, security=security)
        print(f"apar router: listening on {where}, {source}", file=sys.stderr, flush=True)
        try:
            await _until_signal(*servers)
        finally:
            await directory.close()
        return 0

    return asyncio.run(main())


def _kvmanager_tls(args, tls):
    """The router's TLS files for the KV manager: its own, checking --internal-tls-kvmanager-name if given."""
    name = args.internal_tls_kvmanager_name
    if name is None:
        return tls
    if tls is None or not name.strip():
        raise UserError("--internal-tls-kvmanager-name needs --internal-tls-cert, --internal-tls-key and "
                        "--internal-tls-ca" if tls is None else "--internal-tls-kvmanager-name is empty")
    if not args.kvmanager:
        raise UserError("--internal-tls-kvmanager-name: not used without --kvmanager")
    from dataclasses import replace

    return replace(tls, server_name=name.strip())


def _router_discovery(args) -> str:
    """Which way the router finds its workers, with its flags checked."""
    discovery = args.discovery or ("kvmanager" if args.kvmanager else "static" if args.workers else None)
    if discovery is None:
        raise UserError("give --workers host:port,..., --kvmanager host:port, or --discovery kubernetes "
                        "--worker-service NAME")
    given = {"--workers": args.workers, "--kvmanager": args.kvmanager, "--worker-service": args.worker_service,
             "--worker-namespace": args.worker_namespace, "--kube-api": args.kube_api}
    wanted = {"static": {"--workers"}, "kvmanager": {"--kvmanager"},
              "kubernetes": {"--worker-service", "--worker-namespace", "--kube-api"}}[discovery]
    stray = [flag for flag, value in given.items() if value and flag not in wanted]
    if stray:
        raise UserError(f"{', '.join(stray)}: not used with --discovery {discovery}")
    if discovery == "static" and not [a for a in (args.workers or "").split(",") if a.strip()]:
        raise UserError("--discovery static needs --workers host:port,...")
    if discovery == "kvmanager" and not args.kvmanager:
        raise UserError("--discovery kvmanager needs --kvmanager host:port")
    if discovery == "kubernetes" and not args.worker_service:
        raise UserError("--discovery kubernetes needs --worker-service NAME (the workers' Service)")
    return discovery
