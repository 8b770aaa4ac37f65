"""`apar kvmanager`: the KV manager as its own process (cluster mode), ledgers kept in Redis.

    apar kvmanager --port 50071 --redis redis://127.0.0.1:6379/0 --ttl 10 [--metrics-port 9471]

Also runnable as `python -m services.kvmanager ...` with the same flags.
"""
from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading

from apar.engine.errors import UserError
from services.cluster_auth import (SERVER_RISK, add_cluster_token_arg, cluster_token, describe,
                                   refuse_open_listener, warn_if_open)
from services.security import add_kvmanager_security_args, kvmanager_security, mask_url

# every worker's ledger is many small long-lived objects: a full collection of them takes tens of ms, so
# the cyclic collector's automatic runs are rare here (the ledgers hold no reference cycles). But gRPC's
# calls leave a few thousand objects in cycles every 10 s of traffic (a cancelled call's exception and
# its traceback, ...), while the count that triggers a collection (allocations less deallocations) barely
# grows: that garbage stayed uncollected for the process's life, its memory growing. A collection of the
# two young generations on a timer frees it without visiting the ledgers once they are old.
GC_EVERY_S = 10.0


def collect_young_every(seconds: float, stop: threading.Event) -> threading.Thread | None:
    """Collect generations 0 and 1 every `seconds` until `stop` is set (None, and no thread, for 0)."""
    if seconds <= 0:
        return None

    def loop() -> None:
        while not stop.wait(seconds):
            gc.collect(1)

    thread = threading.Thread(target=loop, name="gc-young", daemon=True)
    thread.start()
    return thread


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50071)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL holding the ledgers")
    p.add_argument("--no-redis", action="store_true", help="keep the ledgers in memory only (lost on exit)")
    p.add_argument("--prefix", default="apar:", help="prefix of every Redis key")
    p.add_argument("--ttl", type=int, default=10, help="registration time-to-live, s, for workers that give none")
    p.add_argument("--reap-every", type=float, default=1.0, help="how often expired workers are reclaimed, s")
    p.add_argument("--snapshot-every", type=int, default=256, help="log entries (messages) between a worker's "
                                                                   "ledger snapshots in Redis")
    p.add_argument("--round-every", type=float, default=0.05, help="Redis rounds start at most this often, s: "
                   "how far Redis may trail the acked messages (one transaction takes all since the last)")
    p.add_argument("--gc-every", type=float, default=GC_EVERY_S,
                   help="collect the young generations' garbage this often, s (0: never; see below)")
    p.add_argument("--metrics-port", type=int, default=None, help="expose Prometheus metrics on this port (on --host)")
    add_kvmanager_security_args(p)  # --tls-cert/--tls-key/--tls-ca, --redis-password-file
    add_cluster_token_arg(p)


def register(subparsers) -> None:
    p = subparsers.add_parser("kvmanager", help="run the KV manager: block ownership for every worker, in Redis")
    add_args(p)
    p.set_defaults(func=run)


def _check(args) -> None:
    for name in ("port", "metrics_port"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 65535:
            raise UserError(f"--{name.replace('_', '-')} must be 0..65535, got {value}")
    if not 1 <= args.ttl <= 24 * 3600:
        raise UserError(f"--ttl must be 1..86400 s, got {args.ttl}")
    if not 0.01 <= args.reap_every <= 3600:
        raise UserError(f"--reap-every must be 0.01..3600 s, got {args.reap_every}")
    if not 0.001 <= args.round_every <= 10:
        raise UserError(f"--round-every must be 0.001..10 s, got {args.round_every}")
    if not (args.gc_every == 0 or 0.01 <= args.gc_every <= 3600):
        raise UserError(f"--gc-every must be 0 or 0.01..3600 s, got {args.gc_every}")
    if args.snapshot_every < 1:
        raise UserError(f"--snapshot-every must be 1 or more, got {args.snapshot_every}")
    if not args.no_redis and not args.redis.startswith(("redis://", "rediss://", "unix://")):
        raise UserError(f"--redis must be a redis://, rediss:// or unix:// URL, got {mask_url(args.redis)!r}")


def run(args) -> int:
    _check(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    from services.kvmanager.service import serve

    gc.set_threshold(100_000, 50, 100)  # see GC_EVERY_S
    redis_url, tls = kvmanager_security(args)  # the URL holds the password: print only mask_url(redis_url)
    token = cluster_token(args)
    refuse_open_listener(args, token, tls, "apar kvmanager")
    try:
        handle = serve(f"{args.host}:{args.port}", redis_url, prefix=args.prefix, ttl_s=args.ttl,
                       reap_every_s=args.reap_every, snapshot_every=args.snapshot_every,
                       metrics_port=args.metrics_port, tls=tls, round_every_s=args.round_every, token=token)
    except RuntimeError as exc:  # grpc: the port cannot be bound
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    except OSError as exc:  # the metrics port cannot be bound
        raise UserError(f"cannot serve metrics on port {args.metrics_port}: {exc}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    collect_young_every(args.gc_every, stop)
    where = f"Redis {mask_url(redis_url)} prefix {args.prefix!r}" if redis_url else "memory only"
    warn_if_open(token, "apar kvmanager", SERVER_RISK)
    print(f"apar kvmanager: listening on {args.host}:{handle.port} ({where}, {describe(token)})", file=sys.stderr,
          flush=True)
    stop.wait()
    handle.stop(grace=2.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.kvmanager", description="the APAR KV manager")
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"apar kvmanager: error: {exc}", file=sys.stderr)
        return 2
