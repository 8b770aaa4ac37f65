"""`apar bench kvmanager`: simulated workers streaming their steps to a real KV manager process and Redis.

    apar bench kvmanager [--workers 64] [--threads 64] [--steps-per-s 100] [--seconds 20] [--json]

The manager runs as `python -m services.kvmanager` (its own process), on a private `redis-server` (a
free port, no persistence) unless `--redis URL` is given. The workers run in `--procs` processes of
their own, several per process: each is `testing.SimWorker` (about `--threads` running threads, with
starts, forks, finishes, releases and the block boundaries they bring) driving a real `RemoteKV` and
`KVManagerClient`, paced at `--steps-per-s`. Measured over `--seconds` after a warm-up: the steps the
manager applied (acknowledged) per second, in all and per worker, the steps the workers made, and the
lag of each step (applied on the worker -> acknowledged by the manager) at p50 and p99. At the end every
worker's ledger is compared with the manager's replica. `--pause-manager S` freezes the manager
(SIGSTOP) for S seconds mid-run and reports the workers' step rate while it was frozen.

On one machine the simulated workers cost the CPU more than the manager does (every step's ledger work,
a sender thread each). `--replay` measures the manager alone: each worker makes its steps before the
clock starts (the same SimWorker, the same compact steps), then sends them on its stream as they fall
due, by the sender's rule (every step due once the last batch is acknowledged and `--send-every-ms` has
passed); a step's lag is then its due time to its ack. `--shards N` runs N manager processes (each its
own key prefix in the one Redis); each worker picks its own by rendezvous hashing, as a worker given
`--kvmanager a,b` does, and the managers' CPU and counters are summed.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import NamedTuple

from apar.engine.errors import UserError


class _Manager(NamedTuple):
    """One manager process (one shard) the bench started."""

    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: str


@dataclass(frozen=True, slots=True)
class KVBenchConfig:
    workers: int = 64
    threads: int = 64
    steps_per_s: float = 100.0
    seconds: float = 20.0
    warmup_s: float = 3.0
    procs: int = 4
    blocks: int = 4096
    block_size: int = 16
    send_every_ms: float = 25.0
    pause_s: float = 0.0
    replay: bool = False
    shards: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1 or self.threads < 1 or self.procs < 1 or self.shards < 1:
            raise UserError("--workers, --threads, --procs and --shards must be 1 or more")
        if self.steps_per_s <= 0 or self.seconds <= 0 or self.warmup_s < 0:
            raise UserError("--steps-per-s and --seconds must be positive")
        if not 0 <= self.pause_s < self.seconds:
            raise UserError("--pause-manager must be shorter than --seconds")


def register(sub) -> None:
    k = sub.add_parser("kvmanager", help="simulated workers streaming steps to a real KV manager and Redis: "
                                         "steps/s applied and the lag")
    k.add_argument("--workers", type=int, default=64)
    k.add_argument("--threads", type=int, default=64, help="running threads per worker")
    k.add_argument("--steps-per-s", type=float, default=100.0, help="engine steps per second, per worker")
    k.add_argument("--seconds", type=float, default=20.0, help="measured time, after the warm-up")
    k.add_argument("--warmup", type=float, default=3.0, help="seconds run before measuring")
    k.add_argument("--procs", type=int, default=4, help="processes the simulated workers run in")
    k.add_argument("--blocks", type=int, default=4096, help="KV blocks per worker")
    k.add_argument("--block-size", type=int, default=16)
    k.add_argument("--send-every-ms", type=float, default=25.0, help="a worker sends at most this often "
                                                                   "(RemoteKV's default)")
    k.add_argument("--pause-manager", type=float, default=0.0, metavar="S",
                   help="freeze the manager (SIGSTOP) for S seconds mid-run")
    k.add_argument("--redis", default=None, help="Redis URL (default: a private redis-server on a free port; "
                                                 "'' keeps the ledgers in the manager's memory)")
    k.add_argument("--shards", type=int, default=1, help="KV manager processes (each worker picks its own by "
                                                         "rendezvous hashing, as with --kvmanager a,b)")
    k.add_argument("--replay", action="store_true", help="the workers' steps made before the clock starts and "
                                                         "replayed: the manager's capacity without the workers' CPU")
    k.add_argument("--json", action="store_true", help="print one JSON object")
    k.set_defaults(func=run_kv_bench)


def run_kv_bench(args) -> int:
    cfg = KVBenchConfig(args.workers, args.threads, args.steps_per_s, args.seconds, args.warmup,
                        min(args.procs, args.workers), args.blocks, args.block_size, args.send_every_ms,
                        args.pause_manager, args.replay, args.shards)
    result = measure(cfg, args.redis)
    if args.json:
        print(json.dumps(result))
    else:
        print(_table(cfg, result))
    return 0


def measure(cfg: KVBenchConfig, redis_url: str | None = None) -> dict:
    from apar.bench_suite.simulated import ScratchRedis, free_port

    scratch = ScratchRedis() if redis_url is None else None
    run_id = f"bench-{os.getpid()}-{int(time.time())}"
    managers: list[_Manager] = []
    procs = []
    try:
        for i in range(cfg.shards):  # each shard its own key prefix in the one Redis
            store = ["--no-redis"] if redis_url == "" else ["--redis", redis_url or scratch.url,
                                                            "--prefix", f"{run_id}-{i}:"]
            port, metrics_port = free_port(), free_port()
            log = tempfile.NamedTemporaryFile(prefix="apar-kvbench-", suffix=".log", delete=False)
            managers.append(_Manager(subprocess.Popen([sys.executable, "-m", "services.kvmanager", "--port", str(port), *store,
                                               "--ttl", "600", "--metrics-port", str(metrics_port)],
                                              stdout=subprocess.DEVNULL, stderr=log), port, metrics_port, log.name))
        for m in managers:
            _wait_listening(m.proc, m.log_path)
        _managers_sample(managers)  # a manager's first scrape imports and builds what later ones reuse (tens
        # of ms with every thread held): done now, not in the measured window
        address = ",".join(f"127.0.0.1:{m.port}" for m in managers)  # the worker picks its shard
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        start = (ctx.Barrier(cfg.procs + 1), ctx.Event(), ctx.Value("d", 0.0))
        ids = [f"sim-{i}" for i in range(cfg.workers)]
        for p in range(cfg.procs):
            proc = ctx.Process(target=_replay if cfg.replay else _simulate,
                               args=(cfg, address, ids[p::cfg.procs], start, results), daemon=True)
            proc.start()
            procs.append(proc)
        start_at = _start_together(start)
        window = (start_at + cfg.warmup_s, start_at + cfg.warmup_s + cfg.seconds)
        _sleep_until(window[0])
        before = _managers_sample(managers)
        if cfg.pause_s:
            _sleep_until(_pause_window(cfg, start_at)[0])
            for m in managers:
                os.kill(m.proc.pid, signal.SIGSTOP)
            _sleep_until(_pause_window(cfg, start_at)[1])
            for m in managers:
                os.kill(m.proc.pid, signal.SIGCONT)
        _sleep_until(window[1])
        after = _managers_sample(managers)
        parts = [results.get(timeout=120 + cfg.seconds) for _ in procs]
    finally:
        for m in managers:
            if m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGCONT)
        for proc in procs:
            proc.join(timeout=30)
        for m in managers:
            m.proc.terminate()
            m.proc.wait(timeout=10)
            os.unlink(m.log_path)
        if scratch is not None:
            scratch.close()
    return _summary(cfg, parts, before, after)


def _start_together(start, parent: bool = True) -> float:
    """Every process has registered and warmed its workers: the clock starts for all at once (in 0.5 s)."""
    ready, go, at = start
    ready.wait(timeout=300)
    if parent:
        at.value = time.time() + 0.5
        go.set()
    go.wait()
    return at.value


def _pause_window(cfg: KVBenchConfig, start_at: float) -> tuple[float, float]:
    middle = start_at + cfg.warmup_s + cfg.seconds / 2
    return middle - cfg.pause_s / 2, middle + cfg.pause_s / 2


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _wait_listening(manager: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + 60
    while "listening on" not in open(log_path).read():
        if manager.poll() is not None or time.monotonic() > deadline:
            raise UserError(f"the KV manager did not start:\n{open(log_path).read()[-2000:]}")
        time.sleep(0.05)


def _managers_sample(managers: list[_Manager]) -> dict:
    """The managers' CPU seconds so far and their message and Redis counters, summed over the shards."""
    out = {"t": time.time(), "cpu": 0.0, "messages": 0.0, "round_trips": 0.0, "resyncs": 0.0}
    for m in managers:
        fields = open(f"/proc/{m.proc.pid}/stat").read().rpartition(")")[2].split()
        out["cpu"] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        text = urllib.request.urlopen(f"http://127.0.0.1:{m.metrics_port}/metrics", timeout=5).read().decode()
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line and not line.startswith("#") and "{" not in line}
        out["messages"] += values.get("apar_kvmanager_messages_total", 0.0)
        out["round_trips"] += values.get("apar_kvmanager_redis_round_trips_total", 0.0)
        out["resyncs"] += values.get("apar_kvmanager_resyncs_total", 0.0)
    return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _summary(cfg: KVBenchConfig, parts: list[dict], before: dict, after: dict) -> dict:
    lags = [x for p in parts for x in p["lags"]]
    acked = sum(p["acked"] for p in parts)
    made = sum(p["made"] for p in parts)
    span = after["t"] - before["t"]
    out = {"steps_per_s": round(acked / cfg.seconds, 1), "lag_p99_ms": round(1000 * _percentile(lags, 0.99), 2),
           "workers": cfg.workers, "steps_per_s_per_worker": round(acked / cfg.seconds / cfg.workers, 2),
           "made_steps_per_s": round(made / cfg.seconds, 1), "lag_p50_ms": round(1000 * _percentile(lags, 0.5), 2),
           "lag_max_ms": round(1000 * max(lags, default=float("nan")), 2), "threads": cfg.threads,
           "messages_per_s": round((after["messages"] - before["messages"]) / span, 1),
           "redis_transactions_per_s": round((after["round_trips"] - before["round_trips"]) / span, 1),
           "resyncs": after["resyncs"] - before["resyncs"],
           "manager_cpu": round((after["cpu"] - before["cpu"]) / span, 3),
           "workers_cpu": round(sum(p["cpu_s"] for p in parts) / cfg.seconds, 3),
           "engine_blocked_s": round(sum(p["blocked_s"] for p in parts), 3),
           "ledgers_equal": sum(p["equal"] for p in parts), "config": asdict(cfg)}
    if cfg.replay:  # a batch's send to its ack: the lag less the wait for the sender's turn
        rtts = [x for p in parts for x in p["rtts"]]
        out["ack_rtt_p50_ms"] = round(1000 * _percentile(rtts, 0.5), 2)
        out["ack_rtt_p99_ms"] = round(1000 * _percentile(rtts, 0.99), 2)
    if cfg.pause_s:
        paused = sum(p["made_paused"] for p in parts) / cfg.pause_s
        unpaused = (made - sum(p["made_paused"] for p in parts)) / (cfg.seconds - cfg.pause_s)
        out["pause"] = {"seconds": cfg.pause_s, "made_steps_per_s_paused": round(paused, 1),
                        "made_steps_per_s_unpaused": round(unpaused, 1), "ratio": round(paused / unpaused, 4)}
    return out


def _table(cfg: KVBenchConfig, r: dict) -> str:
    from apar.bench import text_table

    rows = [("steps/s applied, all workers", r["steps_per_s"]), ("steps/s applied, per worker",
            r["steps_per_s_per_worker"]), ("steps/s made by the workers", r["made_steps_per_s"]),
            ("lag p50, ms", r["lag_p50_ms"]), ("lag p99, ms", r["lag_p99_ms"]), ("lag max, ms", r["lag_max_ms"]),
            *([("ack round trip p50, ms", r["ack_rtt_p50_ms"]), ("ack round trip p99, ms", r["ack_rtt_p99_ms"])]
              if cfg.replay else []),
            ("messages/s", r["messages_per_s"]), ("Redis transactions/s", r["redis_transactions_per_s"]),
            (f"manager CPU (cores{', all shards' if cfg.shards > 1 else ''})", r["manager_cpu"]),
            ("simulated workers' CPU (cores)", r["workers_cpu"]),
            ("engine time blocked on the lag bound, s",
            r["engine_blocked_s"]), ("resyncs", r["resyncs"]), ("ledgers equal to the manager's",
            f"{r['ledgers_equal']}/{cfg.workers}")]
    if "pause" in r:
        p = r["pause"]
        rows += [(f"steps/s made, manager frozen {p['seconds']:g} s", p["made_steps_per_s_paused"]),
                 ("steps/s made, manager running", p["made_steps_per_s_unpaused"])]
    head = (f"KV manager: {cfg.workers} workers x {cfg.threads} threads at {cfg.steps_per_s:g} steps/s, "
            f"{cfg.seconds:g} s after {cfg.warmup_s:g} s warm-up, workers in {cfg.procs} processes"
            f"{f', {cfg.shards} manager shards' if cfg.shards > 1 else ''}"
            f"{', steps replayed' if cfg.replay else ''}")
    return head + "\n\n" + text_table(["measure", "value"], [[k, str(v)] for k, v in rows])


# ---- a process of simulated workers ------------------------------------------------------------------
def _simulate(cfg: KVBenchConfig, address: str, ids: list[str], start, results) -> None:
    import logging

    from apar.bench_suite.simulated import SimWorker
    from services.kvmanager import wire
    from services.kvmanager.replica import ReplicaLedger
    from services.worker.kv import RemoteKV
    from services.worker.kvclient import KVManagerClient

    logging.basicConfig(level=logging.ERROR)
    window = [float("inf"), float("inf")]  # when the clock starts
    lags: list[float] = []
    acked = [0]

    def on_lag(lag: float) -> None:
        if window[0] <= time.time() < window[1]:
            lags.append(lag)
            acked[0] += 1

    sims = []
    for wid in ids:
        client = KVManagerClient(address, wid, f"sim/{wid}", cfg.blocks, cfg.block_size, ttl_s=600)
        client.register()
        kv = RemoteKV(ReplicaLedger(cfg.blocks, cfg.block_size), client,  # compact steps: see _replay
                      send_every_s=cfg.send_every_ms / 1000)
        sim = SimWorker(kv, threads=cfg.threads, seed=int(wid.rpartition('-')[2]), prompt=(16, 512), finish_p=1 / 256,
                        cancel_p=0.001, compact=True)
        while sim.num_running < cfg.threads:  # warm: every thread running before the clock starts
            sim.step()
        kv.drain(60)
        kv.on_lag = on_lag
        sims.append(sim)
    start_at = _start_together(start, parent=False)
    window[:] = start_at + cfg.warmup_s, start_at + cfg.warmup_s + cfg.seconds
    pause = _pause_window(cfg, start_at) if cfg.pause_s else (0.0, 0.0)
    made = made_paused = 0
    cpu = None
    tick = start_at
    while tick < window[1]:  # every 1/R s, each worker of this process makes one step
        _sleep_until(tick)
        for sim in sims:
            sim.step()
        now = time.time()
        if window[0] <= now < window[1]:
            made += len(sims)
            made_paused += len(sims) * (pause[0] <= now < pause[1])
            if cpu is None:
                cpu = time.process_time()
        tick += 1.0 / cfg.steps_per_s
    cpu = time.process_time() - (cpu or 0.0)
    equal = 0
    for sim in sims:
        sim.kv.drain(60)
        equal += sim.kv.client.state() == wire.state_to_pb(sim.ledger.snapshot())
        sim.kv.close()
        sim.kv.client.close()
    results.put({"lags": lags, "acked": acked[0], "made": made, "made_paused": made_paused, "equal": equal,
                 "blocked_s": sum(s.kv.blocked_s for s in sims), "cpu_s": cpu})


def _replay(cfg: KVBenchConfig, address: str, ids: list[str], start, results) -> None:
    """Each worker's steps made now and sent as they fall due, by `RemoteKV`'s rule: once the previous
    batch is acknowledged and `--send-every-ms` has passed since it was sent, every step due by then
    goes out as one batch (at most `ReplicationLog.max_batch_steps`). So a manager that falls behind gets
    fewer, larger batches, as it does from real workers, instead of a queue that grows without end. One
    stream per worker, all of this process's on one asyncio loop (grpc.aio: a message costs this process
    far less than a blocking stream's thread hand-offs, so the CPU goes to the manager). A batch is the
    steps' protobuf fields, encoded before the clock starts, concatenated (a repeated field's encoding
    is its items' encodings in a row). Every ack must cover the batch and carry the digest the worker's
    ledger had after its last step. A step's lag is its due time to its ack; it counts as applied when
    its ack comes inside the measured window."""
    import asyncio

    from apar.bench_suite.simulated import SimWorker
    from apar.protogen import stubs
    from services.kvmanager import wire
    from services.kvmanager.replica import ReplicaLedger
    from services.kvmanager.replication import LogBatch, ReplicationLog
    from services.worker.kvclient import KVManagerClient

    K = stubs().kvmanager_pb2
    n_steps = int((cfg.warmup_s + cfg.seconds) * cfg.steps_per_s) + 1
    plans = []
    for wid in ids:
        client = KVManagerClient(address, wid, f"sim/{wid}", cfg.blocks, cfg.block_size, ttl_s=600)
        client.register()
        # the plans' steps are compact (Advance, AppendEach), as a replica reads them: only its ledger applies them
        log = ReplicationLog(ReplicaLedger(cfg.blocks, cfg.block_size), client.session)
        sim = SimWorker(log, threads=cfg.threads, seed=int(wid.rpartition("-")[2]), prompt=(16, 512),
                        finish_p=1 / 256, cancel_p=0.001, compact=True)
        while sim.num_running < cfg.threads:
            sim.step()
        log.acked(client.send(log.batch()))
        client.close()
        head = K.StepBatch(worker_id=wid, session=log.session).SerializeToString()
        fields, lasts = [], []
        for _ in range(n_steps):
            sim.step()
            step = log.unacked.popleft()
            fields.append(wire.batch_to_pb(wid, LogBatch(0, [step])).SerializeToString())
            lasts.append((step.seq, step.digest))
        plans.append((head, fields, lasts, log.max_batch_steps, client.address))  # to its shard
    outcomes = [{"lags": [], "rtts": [], "acked": 0, "made": 0, "made_paused": 0, "equal": True} for _ in plans]
    start_at = _start_together(start, parent=False)
    window = (start_at + cfg.warmup_s, start_at + cfg.warmup_s + cfg.seconds)
    pause = _pause_window(cfg, start_at) if cfg.pause_s else (0.0, 0.0)
    every = cfg.send_every_ms / 1000

    async def run(i: int, channel) -> None:
        head, fields, lasts, max_batch, _ = plans[i]
        out = outcomes[i]
        call = channel.stream_stream("/apar.v1.KVManager/Steps")()
        # Independent workers are out of phase: their first steps are spread over a send interval.
        first = start_at + i / len(plans) * every
        due = [first + k / cfg.steps_per_s for k in range(len(fields))]
        k, sent_at = 0, float("-inf")
        while k < len(fields) and due[k] < window[1]:
            await asyncio.sleep(max(0.0, max(due[k], sent_at + every) - time.time()))
            sent_at = time.time()
            j = k + 1
            while j < len(fields) and j - k < max_batch and due[j] <= sent_at and due[j] < window[1]:
                j += 1
            await call.write(head + b"".join(fields[k:j]))
            ack = wire.ack_from_pb(K.StepAck.FromString(await call.read()))
            now = time.time()
            if window[0] <= sent_at < window[1]:
                out["rtts"].append(now - sent_at)
            out["equal"] &= (ack.applied, ack.digest) == lasts[j - 1] and not ack.resync
            inside = [t for t in due[k:j] if window[0] <= t < window[1]]
            out["lags"].extend(now - t for t in inside)
            out["made"] += len(inside)
            out["made_paused"] += sum(pause[0] <= t < pause[1] for t in inside)
            out["acked"] += (j - k) if window[0] <= now < window[1] else 0
            k = j
        await call.done_writing()

    async def main() -> None:
        import grpc

        channels = [grpc.aio.insecure_channel(shard) for *_, shard in plans]
        await asyncio.gather(*(run(i, ch) for i, ch in enumerate(channels)))
        for ch in channels:
            await ch.close()

    cpu = time.process_time()
    asyncio.run(main())
    cpu = time.process_time() - cpu
    results.put({"lags": [x for o in outcomes for x in o["lags"]], "rtts": [x for o in outcomes for x in o["rtts"]],
                 "acked": sum(o["acked"] for o in outcomes),
                 "made": sum(o["made"] for o in outcomes), "made_paused": sum(o["made_paused"] for o in outcomes),
                 "equal": sum(o["equal"] for o in outcomes), "blocked_s": 0.0,
                 "cpu_s": cpu * cfg.seconds / (window[1] - start_at)})
