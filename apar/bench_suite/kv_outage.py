"""`apar bench kv-outage`: one worker under a storm of requests while its KV manager is killed (SIGKILL)
and restarted `--down` seconds later; every request's outcome, before, during and after the outage.

The cluster, on loopback: its own redis-server, a KV manager, one worker (`--kv-blocks` blocks), one
router (a random-weight model unless `--model`). `--concurrency` clients send requests to the router
without pause (gRPC, whole answers, `max_tokens` up to `--max-tokens`, a deadline of `--deadline`
seconds each). After `--warmup` seconds the manager is killed; it is restarted `--down` seconds later
from the same Redis, and the storm goes on for `--after` seconds. The report: outcomes per phase (a gRPC
status, or the finish reason with its error), when the first request sent after the restart was answered
in full, the worker process's state once the storm is over (alive, its engine answering, its running
requests and free blocks beside the replica's), and its log lines that matter (tracebacks, errors).
`--code DIR` runs the cluster's processes from another source tree (a before/after comparison: the
driver stays this one). A benchmark, not a test: the exit code is 0 unless the cluster failed to start.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = "water city bread train light river garden music winter letter school market story paper".split()


def register(sub) -> None:
    p = sub.add_parser("kv-outage", help="one worker under a storm while its KV manager is killed and restarted: "
                                         "request outcomes before, during and after")
    p.add_argument("--model", default=None, help="model directory (default: build a random-weight one)")
    p.add_argument("--kv-blocks", type=int, default=256, help="the worker's KV blocks")
    p.add_argument("--concurrency", type=int, default=8, help="clients at once")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of storm before the kill")
    p.add_argument("--down", type=float, default=20.0, help="seconds the KV manager stays down")
    p.add_argument("--after", type=float, default=30.0, help="seconds of storm after the restart")
    p.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens of a request")
    p.add_argument("--deadline", type=float, default=30.0, help="each request's gRPC deadline, s")
    p.add_argument("--code", type=Path, default=None, metavar="DIR",
                   help="run the cluster's processes from this source tree (default: this one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=None, help="keep each process's log here (default: a "
                                                              "temporary folder, removed at the end)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_kv_outage_cmd)


def run_kv_outage_cmd(args) -> int:
    from apar.engine.errors import UserError

    if shutil.which("redis-server") is None:
        raise UserError("redis-server is not on PATH (apt-get install redis-server)")
    if args.code is not None and not (args.code / "apar" / "cli.py").is_file():
        raise UserError(f"--code {args.code}: not a source tree of apar (no apar/cli.py)")
    report = run_kv_outage(args)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


class Outcomes:
    """Each request's outcome, by the phase it ended in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.phase = "before"
        self.by_phase: dict[str, dict[str, int]] = {}
        self.restarted_at: float | None = None
        self.first_served_after_restart_s: float | None = None  # the first request sent after it, answered

    def add(self, sent: float, outcome: str) -> None:
        with self.lock:
            phase = self.by_phase.setdefault(self.phase, {})
            phase[outcome] = phase.get(outcome, 0) + 1
            if (outcome in ("length", "stop") and self.restarted_at is not None and sent >= self.restarted_at
                    and self.first_served_after_restart_s is None):
                self.first_served_after_restart_s = round(time.monotonic() - self.restarted_at, 2)


def _client(address: str, rng: random.Random, args, outcomes: Outcomes, stop: threading.Event) -> None:
    import grpc

    from apar.protogen import stubs

    pb = stubs()
    A, C = pb.apar_pb2, pb.common_pb2
    with grpc.insecure_channel(address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        while not stop.is_set():
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
            req = A.GenerateRequest(prompt=prompt, stream=A.STREAM_MODE_FINAL, sampling=C.SamplingParameters(
                max_tokens=rng.randint(8, args.max_tokens), temperature=1.0, seed=rng.randrange(1 << 30)))
            sent = time.monotonic()
            try:
                finals = [r.final for r in stub.Generate(req, timeout=args.deadline)
                          if r.WhichOneof("event") == "final"]
                outcome = (f"{finals[0].finish_reason}: {finals[0].error}" if finals[0].error
                           else finals[0].finish_reason) if finals else "no final message"
            except grpc.RpcError as exc:
                outcome = exc.code().name
                if outcome == "UNAVAILABLE":
                    stop.wait(0.05)  # no worker: a client would back off a little
            outcomes.add(sent, outcome)


def _worker_state(cluster) -> dict:
    """The worker's own account (its engine answers Info between steps) beside its replica's at the
    manager (free or cached blocks, requests, and the digests when both sides send one)."""
    import grpc

    from apar.protogen import stubs

    pb = stubs()
    state: dict = {"process_alive": cluster.worker.alive()}
    info = usage = None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{cluster.worker_port}") as ch:
            info = pb.worker_pb2_grpc.WorkerStub(ch).Info(pb.worker_pb2.WorkerInfoRequest(), timeout=10)
        state.update(engine_answers=True, running=info.running, waiting=info.waiting, free_blocks=info.free_blocks)
    except grpc.RpcError as exc:
        state.update(engine_answers=False, info_error=exc.code().name)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{cluster.kv_port}") as ch:
            listed = pb.kvmanager_pb2_grpc.KVManagerStub(ch).Usage(pb.kvmanager_pb2.UsageRequest(), timeout=10)
        usage = next((w for w in listed.workers if w.worker_id == "w0"), None)
        state["replica"] = ({"free_blocks": usage.free_blocks, "requests": usage.requests} if usage is not None
                            else "not listed")
    except grpc.RpcError as exc:
        state["replica"] = exc.code().name
    if info is not None and usage is not None and info.HasField("ledger") and usage.HasField("digest"):
        state["replica_digest_equal"] = info.ledger == usage.digest
    return state


class OneWorkerCluster:
    def __init__(self, model: Path, args, run_dir: Path, code: Path) -> None:
        from apar.bench_suite.chaos.cluster import Component, free_port

        self.redis_port, self.kv_port, self.worker_port, self.router_port = (free_port() for _ in range(4))
        redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        (run_dir / "redis").mkdir(exist_ok=True)
        # the processes import apar and services from `code` alone: -P keeps the working directory off sys.path
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(code)}
        py = [sys.executable, "-P", "-m", "apar.cli"]
        self.redis = Component("redis", "redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(run_dir / "redis"),
            "--appendonly", "yes", "--save", ""], run_dir, None,
            ready_check=self._redis_answers)
        self.kvmanager = Component("kvmanager", "kvmanager", [
            *py, "kvmanager", "--port", str(self.kv_port), "--redis", redis_url], run_dir, "listening on", env=env)
        self.worker = Component("worker", "worker", [
            *py, "worker", "--model", str(model), "--port", str(self.worker_port), "--kv-blocks", str(args.kv_blocks),
            "--kvmanager", f"127.0.0.1:{self.kv_port}", "--worker-id", "w0"], run_dir, "listening on", env=env)
        self.router = Component("router", "router", [
            *py, "router", "--model", str(model), "--kvmanager", f"127.0.0.1:{self.kv_port}", "--port",
            str(self.router_port)], run_dir, "listening on", env=env)
        self.components = [self.redis, self.kvmanager, self.worker, self.router]

    def _redis_answers(self) -> bool:
        import redis

        client = redis.Redis(port=self.redis_port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            return client.ping()
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> None:
        for c in self.components:
            c.start(0)

    def stop(self) -> None:
        for c in reversed(self.components):
            c.stop()


def run_kv_outage(args) -> dict:
    from apar.bench_suite.chaos.cluster import _count

    run_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="apar-kv-outage-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else _random_model(run_dir / "model", args.seed)
    code = (args.code or Path(__file__).resolve().parents[2]).resolve()
    cluster = OneWorkerCluster(model, args, run_dir, code)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    report: dict = {"config": config, "code": str(code)}
    outcomes, stop = Outcomes(), threading.Event()
    try:
        cluster.start()
        clients = [threading.Thread(target=_client, args=(f"127.0.0.1:{cluster.router_port}", random.Random(
            args.seed * 1000 + i), args, outcomes, stop), daemon=True) for i in range(args.concurrency)]
        for t in clients:
            t.start()
        time.sleep(args.warmup)  # a benchmark's schedule, not a test's wait
        with outcomes.lock:
            outcomes.phase = "during the outage"
        cluster.kvmanager.kill(0)
        time.sleep(args.down)
        cluster.kvmanager.start(0)
        with outcomes.lock:
            outcomes.phase, outcomes.restarted_at = "after the restart", time.monotonic()
        time.sleep(args.after)
        stop.set()
        for t in clients:
            t.join(args.deadline + 10)
        deadline = time.monotonic() + 15  # the last acks: until the replica matches, or 15 s
        while True:
            state = _worker_state(cluster)
            settled = state.get("replica_digest_equal") or (
                isinstance(state.get("replica"), dict) and state["replica"]["free_blocks"] == state.get("free_blocks"))
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        report["worker_after_storm"] = state
    finally:
        stop.set()
        cluster.stop()
    report["outcomes"] = outcomes.by_phase
    report["first_answer_sent_after_restart_s"] = outcomes.first_served_after_restart_s
    w = cluster.worker
    report["worker_log"] = {"tracebacks": w.tracebacks, "errors": w.errors, "warnings": w.warnings,
                            "traceback_kinds": w.traceback_heads,
                            "unknown_thread": _count(w, "unknown thread"),
                            "manager_unavailable": _count(w, "KV manager is .* behind|KV manager is unavailable")}
    report["run_dir"] = str(run_dir) if args.log_dir else None
    if not args.log_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def render(report: dict) -> str:
    lines = [f"code: {report['code']}"]
    for phase, counts in report["outcomes"].items():
        total = sum(counts.values())
        lines.append(f"{phase}: {total} requests: " + ", ".join(f"{k} {v}" for k, v in
                                                              sorted(counts.items(), key=lambda kv: -kv[1])))
    first = report["first_answer_sent_after_restart_s"]
    lines.append("first request sent after the restart answered in full: "
                 + (f"{first} s after it" if first is not None else "never"))
    lines.append("worker after the storm: " + json.dumps(report.get("worker_after_storm")))
    lines.append("worker log: " + json.dumps(report["worker_log"]))
    return "\n".join(lines)


def _random_model(out: Path, seed: int) -> Path:
    from apar.modelgen import make_model
    from apar.quiet import quiet_transformers

    quiet_transformers()
    return make_model(out, "llama", seed=seed)

