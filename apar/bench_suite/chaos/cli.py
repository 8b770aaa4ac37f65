"""CLI registration of `apar bench chaos`."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from apar.bench_suite.chaos.run import Interrupted, run_chaos
from apar.bench_suite.chaos.verdict import render

DEFAULT_REQUESTS = 1000  # without --duration; with it, the storm runs for its duration however many end


def register(sub) -> None:
    p = sub.add_parser("chaos", help="a loopback cluster under a storm, every component killed in turn: a verdict")
    p.add_argument("--model", default=None, help="model directory (default: build a random-weight one)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests in the storm (default 1000; with --duration: at most, default no limit)")
    p.add_argument("--duration", type=float, default=None, help="run for this many seconds instead (a soak)")
    p.add_argument("--concurrency", type=int, default=24, help="clients at once")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--routers", type=int, default=2)
    p.add_argument("--kv-blocks", type=int, default=256, help="KV blocks per worker")
    p.add_argument("--rounds", type=int, default=1, help="times each component kind is killed (0: no kills)")
    p.add_argument("--schedule", choices=("fixed", "random"), default="fixed",
                   help="kill order: router, worker, KV manager, Redis per round; or seeded random order and times")
    p.add_argument("--down", type=float, default=0.5, help="seconds a killed component stays down")
    p.add_argument("--kv-down", type=float, default=None,
                   help="seconds the KV manager stays down (default --down; beyond the workers' 10 s time-to-live "
                        "they are reaped, and must register again and resync)")
    p.add_argument("--pause", type=float, default=0.0,
                   help="also freeze a worker (SIGSTOP) once per round until the KV manager reaps it (its "
                        "--worker-ttl passed), this long at most; once thawed it must register again and resync "
                        "(0: never)")
    p.add_argument("--worker-ttl", type=int, default=10, help="the workers' registration time-to-live, s")
    p.add_argument("--gc-every", type=float, default=None,
                   help="the KV manager's --gc-every, s (default: the KV manager's own default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of a request")
    p.add_argument("--max-rss-growth", type=float, default=0.10,
                   help="largest growth of a process's resident memory from warm-up to the end (0.10: 10%%)")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples (the series)")
    p.add_argument("--log-dir", type=Path, default=None, help="keep each component's log here (default: a "
                                                              "temporary folder, removed on success)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_chaos_cmd)


def resolve_args(args) -> None:
    """Check the storm's bounds and fill in --requests: 1000 without --duration; with --duration alone, no
    limit (a soak runs for its duration)."""
    from apar.engine.errors import UserError

    if args.requests is not None and args.requests < 1:
        raise UserError(f"--requests must be at least 1, got {args.requests}")
    if args.duration is not None and not args.duration > 0:
        raise UserError(f"--duration must be positive, got {args.duration}")
    if args.gc_every is not None and not (args.gc_every == 0 or 0.01 <= args.gc_every <= 3600):
        raise UserError(f"--gc-every must be 0 or 0.01..3600 s, got {args.gc_every}")
    if args.requests is None and args.duration is None:
        args.requests = DEFAULT_REQUESTS


def run_chaos_cmd(args) -> int:
    from apar.engine.errors import UserError

    if shutil.which("redis-server") is None:
        raise UserError("redis-server is not on PATH (apt-get install redis-server)")
    if args.workers < 2 or args.routers < 2:
        raise UserError("--workers and --routers must be at least 2: a killed one's requests go to another")
    resolve_args(args)
    try:
        verdict = run_chaos(args)
    except Interrupted as exc:
        logs = f"; logs: {exc.run_dir}" if exc.run_dir else ""
        print(f"\nchaos: interrupted ({exc}); the cluster is stopped{logs}", file=sys.stderr)
        raise
    if args.json:
        print(json.dumps(verdict, indent=1))
    else:
        print(render(verdict))
    return 0 if verdict["passed"] else 1


def main(argv: list[str] | None = None) -> int:  # pragma: no cover (for `python -m apar.bench_suite.chaos`)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    args = parser.parse_args(["chaos", *(argv or sys.argv[1:])])
    return run_chaos_cmd(args)
