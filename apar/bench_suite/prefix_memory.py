"""The KV manager's resident memory per prefix lookup that the caller gives up on (deadline or cancel).

    python -m apar.bench_suite.prefix_memory [--via router|raw] [--calls 20000] [--rounds 1]
        [--concurrency 32] [--deadline-ms 0.5,4] [--phases ok,deadline,cancel] [--no-token]

A KV manager runs as its own process (`python -m services.kvmanager --no-redis`, a cluster token, two
registered workers); this process looks a 200-token prompt up in it, `--concurrency` lookups at a time,
in phases of `--calls` each: lookups that wait for the answer (`ok`), lookups that give up after a time
drawn from `--deadline-ms` (`deadline`), and lookups cancelled after such a time (`cancel`). With
`--via router` each lookup is the router's own (`KVManagerDirectory.cached_tokens`, its wait set to that
time); with `--via raw` it is one `Prefix` call with that deadline, or cancelled, as the router made them
when its wait was the call's deadline. The manager's resident memory (VmRSS) is read from /proc before
and after each phase, after a warm-up of every phase; the table gives each phase's lookups, the Prefix
calls they made, their outcomes and the growth in bytes per call.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_manager(token_file: Path | None, extra: list[str]) -> tuple[subprocess.Popen, int]:
    argv = [sys.executable, "-m", "services.kvmanager", "--no-redis", "--port", "0", *extra]
    if token_file is not None:
        argv += ["--cluster-token-file", str(token_file)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if m := re.search(r"listening on \S+:(\d+)", line):
            return proc, int(m.group(1))
    raise RuntimeError(f"the KV manager did not start (exit {proc.wait()})")


class _Counted:
    """A KV manager stub that counts its Prefix calls."""

    def __init__(self, stub) -> None:
        self.stub, self.calls = stub, 0

    def Prefix(self, *args, **kwargs):
        self.calls += 1
        return self.stub.Prefix(*args, **kwargs)


async def _via_router(directory, ids: list[int], live: list, kind: str, low_s: float, high_s: float) -> str:
    """One prompt's lookup as the router makes it (`KVManagerDirectory.cached_tokens`): it waits as long as
    `kind` says, or is cancelled as a request's end cancels it. Then the Prefix calls the router left
    running end (each lane holds one lookup's call at a time, as a request in flight does), so that every
    lookup makes its call instead of finding the shard with `PREFIX_PENDING_MAX` calls unanswered."""
    if kind == "cancel":
        task = asyncio.ensure_future(directory.cached_tokens(ids, live))
        await asyncio.sleep(random.uniform(low_s, high_s))
        task.cancel()
        try:
            outcome = "answered" if await task else "gave up"
        except asyncio.CancelledError:
            outcome = "cancelled"
    else:
        directory.prefix_wait_s = 10.0 if kind == "ok" else random.uniform(low_s, high_s)
        outcome = "answered" if await directory.cached_tokens(ids, live) else "gave up"
    await asyncio.gather(*directory._asking[0], return_exceptions=True)
    return outcome


async def _one(stub, req, kind: str, low_s: float, high_s: float) -> str:
    import grpc

    try:
        if kind == "ok":
            await stub.Prefix(req, timeout=10.0)
        elif kind == "deadline":
            await stub.Prefix(req, timeout=random.uniform(low_s, high_s))
        else:  # cancel: the caller gives up as a cancelled router request does
            task = asyncio.ensure_future(stub.Prefix(req, timeout=10.0))
            await asyncio.sleep(random.uniform(low_s, high_s))
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "CANCELLED(local)"
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def phase(call, kind: str, calls: int, concurrency: int, low_s: float, high_s: float) -> Counter:
    """`calls` calls of `kind`, `concurrency` at a time; `call(kind, low_s, high_s)` makes one."""
    outcomes: Counter = Counter()
    left = iter(range(calls))

    async def lane() -> None:
        for _ in left:
            outcomes[await call(kind, low_s, high_s)] += 1

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return outcomes


async def drive(port: int, pid: int, token_file: Path | None, args) -> list[tuple]:
    from types import SimpleNamespace

    from apar.engine.prefix import block_hashes
    from apar.protogen import stubs
    from services.cluster_auth import ClusterToken
    from services.router.workers import KVManagerDirectory, WorkerHandle
    from services.security import open_channel

    pb = stubs()
    token = ClusterToken.load(str(token_file)) if token_file else None
    channel = open_channel(f"127.0.0.1:{port}", aio=True, token=token)
    stub = pb.kvmanager_pb2_grpc.KVManagerStub(channel)
    directory = KVManagerDirectory(f"127.0.0.1:{port}", token=token)
    directory._kv = [_Counted(kv) for kv in directory._kv]  # the Prefix calls its lookups make
    for i in range(2):
        await stub.Register(pb.kvmanager_pb2.RegisterRequest(
            worker_id=f"w{i}", address=f"127.0.0.1:{60000 + i}", num_blocks=256, block_size=16, ttl_seconds=3600,
            session=1 + i, model="m"), timeout=10)
    ids = list(range(200))  # 12 full blocks of 16 tokens that leave a token to compute
    req = pb.kvmanager_pb2.PrefixRequest(names=block_hashes(ids, 16, limit=12))
    live = [WorkerHandle(f"127.0.0.1:{60000 + i}", None, None, info=SimpleNamespace(block_size=16)) for i in range(2)]
    if args.via == "router":
        def call(kind, low_s, high_s):
            return _via_router(directory, ids, live, kind, low_s, high_s)
    else:
        def call(kind, low_s, high_s):
            return _one(stub, req, kind, low_s, high_s)
    low_s, high_s = args.low_ms / 1000, args.high_ms / 1000
    kinds = ["ok", "deadline", "cancel"]
    for kind in kinds:  # warm-up: every path once, allocator arenas and caches filled
        await phase(call, kind, args.warmup, args.concurrency, low_s, high_s)
    rows = []
    for kind in [k for k in kinds if k in args.phases] * args.rounds:
        before, t0, rpcs = rss_bytes(pid), time.monotonic(), directory._kv[0].calls
        outcomes = await phase(call, kind, args.calls, args.concurrency, low_s, high_s)
        while any(directory._asking):  # the router's calls still running end (by their answer)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the manager finishes the calls it still holds
        if args.via == "router":
            outcomes["Prefix calls"] = directory._kv[0].calls - rpcs
        rows.append((kind, outcomes, before, rss_bytes(pid), time.monotonic() - t0))
    await directory.close()
    await channel.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apar.bench_suite.prefix_memory", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=20000, help="calls per phase")
    p.add_argument("--warmup", type=int, default=2000, help="calls per phase before measuring")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--deadline-ms", default="0.5,4", help="LOW,HIGH: deadlines and cancel delays, ms")
    p.add_argument("--phases", default="ok,deadline,cancel", help="the phases measured, in order")
    p.add_argument("--rounds", type=int, default=1, help="times the phases are measured, one after another")
    p.add_argument("--via", choices=("raw", "router"), default="router",
                   help="router: lookups as the router makes them (KVManagerDirectory.cached_tokens: it waits "
                        "LOW..HIGH, or is cancelled after it); raw: Prefix calls with that deadline, or cancelled")
    p.add_argument("--no-token", action="store_true", help="no cluster token (calls not authenticated)")
    p.add_argument("--manager-arg", action="append", default=[], help="one more flag for the KV manager")
    args = p.parse_args(argv)
    args.phases = args.phases.split(",")
    args.low_ms, args.high_ms = (float(x) for x in args.deadline_ms.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        token_file = None if args.no_token else Path(tmp) / "token"
        if token_file is not None:
            token_file.write_text(secrets.token_hex(32) + "\n")
        proc, port = start_manager(token_file, args.manager_arg)
        try:
            start = rss_bytes(proc.pid)
            rows = asyncio.run(drive(port, proc.pid, token_file, args))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"KV manager pid {proc.pid}: resident {start / 2**20:.1f} MiB at start")
    print(f"{'phase':<9} {'lookups':>7} {'calls':>6} {'s':>5} {'RSS before MiB':>14} {'after MiB':>9} "
          f"{'B/call':>7}  outcomes")
    for kind, outcomes, before, after, secs in rows:
        calls = outcomes.pop("Prefix calls", None)
        lookups = sum(outcomes.values())
        calls = lookups if calls is None else calls
        print(f"{kind:<9} {lookups:>7} {calls:>6} {secs:>5.1f} {before / 2**20:>14.1f} {after / 2**20:>9.1f} "
              f"{(after - before) / max(calls, 1):>7.0f}  {dict(outcomes.most_common())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
