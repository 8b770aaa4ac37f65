"""`apar bench chaos`: a whole cluster on loopback under a storm of requests, each component killed with
SIGKILL in turn and restarted, and a verdict on what it left behind.

The cluster: its own redis-server (append-only), a KV manager, `--workers` workers and `--routers`
routers (a random-weight model unless `--model`), every internal call authenticated with a cluster token
read from a file. The storm, `--concurrency` clients at once over gRPC and HTTP: streams, whole answers,
clients that cancel after a few messages, deadlines of 10-500 ms, HTTP clients that disconnect mid-stream,
`n` > 1, stop strings, prompts that share a long system prompt. A call refused or broken by a dead router
or worker is retried on the next router, as a client behind a Service would. Kills: each component kind
in turn (router, worker, KV manager, Redis), `--rounds` times, spread over the run, in that order or in
a seeded random order (`--schedule random --seed N`); each killed process is restarted on its own port.

The verdict (`--json` prints it as JSON): requests by outcome, each a documented status; blocks in use
per worker once idle (0); each KV manager replica equal to its worker's ledger (`Digest`, contents hash
included); the ledgers Redis holds equal to the replicas, and the KV manager restarted at the end from
Redis alone equal to them too; resident memory of each process at its start, after warm-up and at the
end; log lines per component, tracebacks among them. The exit code is 1 when anything is wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

KINDS = ("router", "worker", "kvmanager", "redis")
DOCUMENTED = ("ok", "cancelled", "disconnected", "deadline", "error_final", "unavailable", "exhausted")
LEVEL = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ \S+ (WARNING|ERROR|CRITICAL) ")
CORE_ERROR = re.compile(r"^E\d{4} ")  # gRPC core's own error lines
SYSTEMS = [
    "You are the assistant of a river museum. Answer visitors briefly and kindly, in plain words, and name the "
    "river, its source, its mouth and the countries it crosses whenever you can.",
    "You are a patient cooking teacher. Give each step of a recipe on its own line, say how long it takes, and "
    "warn about what commonly goes wrong at that step.",
    "You are a careful travel planner. Suggest a day plan with times, places and how to move between them, and "
    "keep the budget the traveller gives in mind.",
]
WORDS = ("water city bread train light river garden music winter letter school market story paper".split())


def register(sub) -> None:
    p = sub.add_parser("chaos", help="a loopback cluster under a storm, every component killed in turn: a verdict")
    p.add_argument("--model", default=None, help="model directory (default: build a random-weight one)")
    p.add_argument("--requests", type=int, default=1000, help="requests in the storm (with --duration: at most)")
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
                   help="also freeze a worker (SIGSTOP) this long once per round: past --worker-ttl the KV manager "
                        "reaps it, and once thawed it must register again and resync (0: never)")
    p.add_argument("--worker-ttl", type=int, default=10, help="the workers' registration time-to-live, s")
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


def run_chaos_cmd(args) -> int:
    from apar.engine.errors import UserError

    if shutil.which("redis-server") is None:
        raise UserError("redis-server is not on PATH (apt-get install redis-server)")
    if args.workers < 2 or args.routers < 2:
        raise UserError("--workers and --routers must be at least 2: a killed one's requests go to another")
    verdict = run_chaos(args)
    if args.json:
        print(json.dumps(verdict, indent=1))
    else:
        print(render(verdict))
    return 0 if verdict["passed"] else 1


# ---- processes -----------------------------------------------------------------------------------------
def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Life:
    """One incarnation of a component: from its start to its kill (or the end of the run)."""

    pid: int
    started_s: float
    started_done: int  # requests finished when it started
    rss_start_kib: int | None = None
    rss_warm_kib: int | None = None
    warm_done: int | None = None  # requests finished when its warm-up sample was taken
    rss_end_kib: int | None = None
    end_done: int | None = None
    rss_peak_kib: int = 0
    killed: bool = False
    ready: bool = False
    crashed: int | None = None  # its exit code when it exited on its own


class Component:
    """A process of the cluster: started, watched (its log to a file, counted), killed, restarted."""

    def __init__(self, name: str, kind: str, argv: list[str], log_dir: Path, ready: str | None,
                 env: dict | None = None, ready_check=None) -> None:
        self.name, self.kind, self.argv = name, kind, argv
        self.log_path = log_dir / f"{name}.log"
        self.ready = re.compile(ready) if ready else None
        self.ready_check = ready_check
        self.env = {**os.environ, **(env or {})}
        self.lives: list[Life] = []
        self.lines = self.tracebacks = self.errors = self.warnings = 0
        self.traceback_heads: dict[str, int] = {}  # a traceback's last line -> times
        self.proc: subprocess.Popen | None = None
        self._cond = threading.Condition()
        self._ready_seen = False
        self._in_traceback = False
        self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")

    def start(self, done: int, timeout: float = 120.0) -> None:
        with self._cond:
            self._ready_seen = False
        self._log.write(f"==== start {time.strftime('%H:%M:%S')} ====\n")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, start_new_session=True, errors="replace")
        life = Life(self.proc.pid, time.monotonic(), done)
        self.lives.append(life)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + timeout
        if self.ready is not None:
            with self._cond:
                while not self._ready_seen:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"{self.name} exited {self.proc.returncode} at start: see {self.log_path}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name} not ready within {timeout:.0f} s: see {self.log_path}")
                    self._cond.wait(0.2)
        if self.ready_check is not None:
            while not self.ready_check():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready: see {self.log_path}")
                time.sleep(0.02)
        life.rss_start_kib = rss_kib(life.pid)
        life.ready = True

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._log.write(line)
            with self._cond:
                self.lines += 1
                if line.startswith("Traceback (most recent call last)"):
                    self.tracebacks += 1
                    self._in_traceback = True
                elif self._in_traceback and not line.startswith((" ", "\t")) and line.strip():
                    if not line.startswith(("During handling", "The above exception")):
                        head = line.strip()[:160]
                        self.traceback_heads[head] = self.traceback_heads.get(head, 0) + 1
                        self._in_traceback = False
                m = LEVEL.match(line)
                if m:
                    if m.group(1) == "WARNING":
                        self.warnings += 1
                    else:
                        self.errors += 1
                elif CORE_ERROR.match(line):
                    self.errors += 1
                if self.ready is not None and not self._ready_seen and self.ready.search(line):
                    self._ready_seen = True
                self._cond.notify_all()
        self._log.flush()

    @property
    def life(self) -> Life:
        return self.lives[-1]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sample(self, done: int, warm_after: int) -> None:
        """Memory now: the peak so far, and the warm-up sample once `warm_after` requests ended since the
        start of this life."""
        if not self.alive():
            return
        life = self.life
        if not life.ready:
            return
        rss = rss_kib(life.pid)
        if rss is None:
            return
        life.rss_peak_kib = max(life.rss_peak_kib, rss)
        if life.rss_warm_kib is None and done - life.started_done >= warm_after:
            life.rss_warm_kib, life.warm_done = rss, done

    def end_sample(self, done: int) -> None:
        if self.alive() and self.life.rss_end_kib is None:
            self.life.rss_end_kib, self.life.end_done = rss_kib(self.life.pid), done

    def kill(self, done: int) -> None:
        """SIGKILL the process group (after its end-of-life memory sample)."""
        self.end_sample(done)
        if self.proc is not None and self.proc.poll() is None:
            self.life.killed = True  # first: the monitor must not take the kill for a crash
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def pause(self, seconds: float) -> None:
        """SIGSTOP for `seconds`, then SIGCONT: frozen, it answers nothing and sends no heartbeat."""
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def wait_line(self, pattern: str, seen: int, timeout: float) -> bool:
        """Whether a log line matching `pattern` beyond the `seen` such lines appears within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _count(self, pattern) > seen:
                return True
            with self._cond:
                self._cond.wait(0.2)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self._log.flush()

    def check_crash(self) -> bool:
        """True when the process exited without being killed by us (recorded once)."""
        if self.proc is not None and self.proc.poll() is not None and not self.life.killed \
                and self.life.crashed is None:
            self.life.crashed = self.proc.returncode
            return True
        return False

    def report(self) -> dict:
        return {"name": self.name, "kind": self.kind, "restarts": len(self.lives) - 1, "log": str(self.log_path),
                "lines": self.lines, "warnings": self.warnings, "errors": self.errors, "tracebacks": self.tracebacks,
                "traceback_kinds": self.traceback_heads, "lives": [asdict(life) for life in self.lives]}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, model: Path, workers: int, routers: int, kv_blocks: int, run_dir: Path,
                 worker_ttl: int = 10) -> None:
        import secrets

        self.dir = run_dir
        self.token_file = run_dir / "cluster-token"
        self.token_file.write_text(secrets.token_hex(32) + "\n")
        self.token_file.chmod(0o600)
        self.redis_port, self.kv_port = free_port(), free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        (run_dir / "redis").mkdir(exist_ok=True)
        py = [sys.executable, "-m", "apar.cli"]
        tok = ["--cluster-token-file", str(self.token_file)]
        one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.redis = Component("redis", "redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(run_dir / "redis"),
            "--appendonly", "yes", "--save", ""], run_dir, None, ready_check=self._redis_answers)
        self.kvmanager = Component("kvmanager", "kvmanager", [
            *py, "kvmanager", "--port", str(self.kv_port), "--redis", self.redis_url, *tok], run_dir, "listening on")
        self.worker_ports = [free_port() for _ in range(workers)]
        self.workers = [Component(f"worker{i}", "worker", [
            *py, "worker", "--model", str(model), "--port", str(port), "--kv-blocks", str(kv_blocks),
            "--block-size", "16", "--kvmanager", f"127.0.0.1:{self.kv_port}", "--worker-id", f"w{i}",
            "--served-model-name", "chaos", "--kv-ttl", str(worker_ttl), *tok], run_dir, "listening on",
            env=one_thread) for i, port in enumerate(self.worker_ports)]
        self.router_ports = [(free_port(), free_port()) for _ in range(routers)]
        self.routers = [Component(f"router{i}", "router", [
            *py, "router", "--model", str(model), "--kvmanager", f"127.0.0.1:{self.kv_port}", "--port", str(g),
            "--http-port", str(h), "--served-model-name", "chaos", *tok], run_dir, "listening on", env=one_thread)
            for i, (g, h) in enumerate(self.router_ports)]
        self.components = [self.redis, self.kvmanager, *self.workers, *self.routers]

    def _redis_answers(self) -> bool:
        import redis

        try:
            client = redis.Redis(port=self.redis_port, socket_connect_timeout=0.2, socket_timeout=0.5)
            try:
                client.ping()
                return not client.info("persistence").get("loading", 0)
            finally:
                client.close()
        except redis.RedisError:
            return False

    def start(self) -> None:
        for c in self.components:
            c.start(0)

    def stop(self) -> None:
        for c in reversed(self.components):
            c.stop()

    def of_kind(self, kind: str) -> list[Component]:
        return {"router": self.routers, "worker": self.workers, "kvmanager": [self.kvmanager],
                "redis": [self.redis]}[kind]


# ---- the storm -----------------------------------------------------------------------------------------
@dataclass
class Tally:
    outcomes: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    retries: int = 0
    broken_mid_answer: int = 0  # calls broken after some output, answered again on another router
    undocumented: list[str] = field(default_factory=list)  # the first few, for the report
    done: int = 0

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        self.done += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        k = self.by_kind.setdefault(kind, {})
        k[outcome] = k.get(outcome, 0) + 1
        if outcome not in DOCUMENTED and len(self.undocumented) < 20:
            self.undocumented.append(f"{kind}: {outcome}: {detail}"[:300])


class Retry(Exception):
    """The call was refused or broken by a dead router or worker: try it on the next router."""

    def __init__(self, detail: str, started: bool = False) -> None:
        super().__init__(detail)
        self.started = started


REQUEST_KINDS = ("grpc_stream", "grpc_final", "grpc_cancel", "grpc_deadline", "grpc_n_stop", "http_chat_stream",
                 "http_completion", "http_disconnect", "http_n_stop")


class Storm:
    def __init__(self, cluster: Cluster, rng: random.Random, max_tokens: int) -> None:
        self.cluster, self.rng, self.max_tokens = cluster, rng, max_tokens
        self.tally = Tally()

    def prompt(self) -> tuple[str, str]:
        rng = self.rng
        return rng.choice(SYSTEMS), " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))

    async def open(self) -> None:
        import grpc
        import httpx

        from apar.protogen import stubs

        self.pb = stubs()
        opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500)]
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{g}", options=opts)
                         for g, _ in self.cluster.router_ports]
        self.stubs = [self.pb.apar_pb2_grpc.AparStub(ch) for ch in self.channels]
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=2.0),
                                      limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.urls = [f"http://127.0.0.1:{h}" for _, h in self.cluster.router_ports]

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        await self.http.aclose()

    async def one(self) -> None:
        """One request, retried on the next router when refused or broken; its outcome tallied."""
        import asyncio

        rng = self.rng
        kind = rng.choice(REQUEST_KINDS)
        system, user = self.prompt()
        spec = {"kind": kind, "system": system, "user": user, "max_tokens": rng.randint(4, self.max_tokens),
                "n": rng.choice((2, 3)) if kind.endswith("n_stop") else 1,
                "stop": [rng.choice(("e", " the", ".", "ing"))] if kind.endswith("n_stop") else [],
                "after": rng.randint(1, 4), "timeout": rng.uniform(0.01, 0.5), "temperature": rng.choice((0.0, 0.8))}
        first = rng.randrange(len(self.stubs))
        detail = ""
        for attempt in range(12):
            router = (first + attempt) % len(self.stubs)
            try:
                if kind.startswith("grpc"):
                    outcome, detail = await self._grpc(router, spec)
                else:
                    outcome, detail = await self._http(router, spec)
                break
            except Retry as exc:
                detail = str(exc)
                self.tally.retries += 1
                self.tally.broken_mid_answer += exc.started
                await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt) * (0.5 + rng.random()))
        else:
            outcome = "unavailable"
        self.tally.add(kind, outcome, detail)

    async def _grpc(self, router: int, s: dict) -> tuple[str, str]:
        import grpc

        A, C = self.pb.apar_pb2, self.pb.common_pb2
        kind = s["kind"]
        mode = A.STREAM_MODE_FINAL if kind == "grpc_final" else A.STREAM_MODE_LINEAR
        req = A.GenerateRequest(stream=mode, stop=s["stop"], sampling=C.SamplingParameters(
            max_tokens=s["max_tokens"], temperature=s["temperature"], n=s["n"]))
        req.messages.add(role="system", content=s["system"])
        req.messages.add(role="user", content=s["user"])
        timeout = s["timeout"] if kind == "grpc_deadline" else 60.0
        call = self.stubs[router].Generate(req, timeout=timeout)
        got = 0
        finals = 0
        errors = []
        try:
            async for msg in call:
                got += 1
                if msg.WhichOneof("event") == "final":
                    finals += 1
                    if msg.final.error:
                        errors.append(msg.final.error)
                if kind == "grpc_cancel" and got >= s["after"]:
                    call.cancel()
                    return "cancelled", ""
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise Retry(f"UNAVAILABLE {exc.details()}", got > 0) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "deadline", ""
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "exhausted", exc.details() or ""
            if code == grpc.StatusCode.CANCELLED and kind == "grpc_cancel":
                return "cancelled", ""
            return f"grpc_{code.name.lower()}", exc.details() or ""
        if finals != s["n"]:
            return "missing_final", f"{finals} finals of {s['n']}"
        return ("error_final", errors[0]) if errors else ("ok", "")

    async def _http(self, router: int, s: dict) -> tuple[str, str]:
        import httpx

        kind = s["kind"]
        chat = kind != "http_completion"
        body = {"model": "chaos", "max_tokens": s["max_tokens"], "temperature": s["temperature"], "n": s["n"]}
        if s["stop"]:
            body["stop"] = s["stop"]
        if chat:
            body["messages"] = [{"role": "system", "content": s["system"]}, {"role": "user", "content": s["user"]}]
        else:
            body["prompt"] = s["system"] + "\n" + s["user"]
        stream = kind in ("http_chat_stream", "http_disconnect") or (kind == "http_n_stop" and s["after"] % 2)
        body["stream"] = bool(stream)
        url = self.urls[router] + ("/v1/chat/completions" if chat else "/v1/completions")
        got = 0
        try:
            async with self.http.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return self._http_status(r.status_code, r.text)
                if not stream:
                    data = json.loads(await r.aread())
                    if len(data.get("choices", ())) != s["n"]:
                        return "missing_final", f"{len(data.get('choices', ()))} choices of {s['n']}"
                    return "ok", ""
                finished = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    got += 1
                    if kind == "http_disconnect" and got >= s["after"]:
                        return "disconnected", ""  # leaving the block closes the connection mid-stream
                    if line == "data: [DONE]":
                        return ("ok", "") if finished == s["n"] else ("missing_final", f"{finished} of {s['n']}")
                    event = json.loads(line[6:])
                    if "error" in event:
                        if event["error"].get("type") == "service_unavailable":
                            raise Retry(f"stream error {event['error'].get('message')}", True)
                        return f"stream_{event['error'].get('type')}", event["error"].get("message", "")
                    finished += sum(1 for c in event.get("choices", ()) if c.get("finish_reason"))
                raise Retry("stream ended without [DONE]", True)
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise Retry(f"{type(exc).__name__}: {exc}", got > 0) from None

    @staticmethod
    def _http_status(status: int, text: str) -> tuple[str, str]:
        if status == 503:
            raise Retry(f"503 {text[:200]}")
        return {429: "exhausted", 504: "deadline", 400: "invalid"}.get(status, f"http_{status}"), text[:200]


# ---- the run -------------------------------------------------------------------------------------------
def kill_plan(rounds: int, cluster: Cluster, schedule: str, rng: random.Random,
              pause: bool = False) -> list[tuple[float, Component, str]]:
    """(progress fraction, component, "kill" or "pause") of each fault, spread over 15%..85% of the run."""
    events: list[tuple[Component, str]] = []
    for r in range(rounds):
        order = [*KINDS, *(("pause",) if pause else ())]
        if schedule == "random":
            rng.shuffle(order)
        for kind in order:
            pool = cluster.of_kind("worker" if kind == "pause" else kind)
            c = rng.choice(pool) if schedule == "random" else pool[r % len(pool)]
            events.append((c, "pause" if kind == "pause" else "kill"))
    n = len(events)
    out = []
    for i, (c, action) in enumerate(events):
        slot = 0.7 / max(n, 1)
        at = 0.15 + slot * (i + (rng.uniform(0.1, 0.9) if schedule == "random" else 0.5))
        out.append((at, c, action))
    return out


def run_chaos(args) -> dict:
    import asyncio

    rng = random.Random(args.seed)
    keep = args.log_dir is not None
    run_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="apar-chaos-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else _random_model(run_dir / "model", args.seed)
    cluster = Cluster(model, args.workers, args.routers, args.kv_blocks, run_dir, args.worker_ttl)
    t0 = time.monotonic()
    verdict: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                if k not in ("func",)}, "run_dir": str(run_dir)}
    try:
        cluster.start()
        verdict["start_s"] = round(time.monotonic() - t0, 1)
        storm = Storm(cluster, rng, args.max_tokens)
        plan = kill_plan(args.rounds, cluster, args.schedule, rng, args.pause > 0)
        kills = asyncio.run(_storm(args, cluster, storm, plan))
        verdict["storm_s"] = round(time.monotonic() - t0 - verdict["start_s"], 1)
        verdict["kills"] = kills
        verdict["requests"] = {"done": storm.tally.done, "outcomes": storm.tally.outcomes,
                               "by_kind": storm.tally.by_kind, "retries": storm.tally.retries,
                               "broken_mid_answer": storm.tally.broken_mid_answer,
                               "undocumented_examples": storm.tally.undocumented}
        for c in cluster.components:
            c.end_sample(storm.tally.done)
        verdict["state"] = check_state(cluster, storm.tally.done)
    except Exception as exc:
        verdict["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for c in cluster.components:
            c.check_crash()
        cluster.stop()
    verdict["crashed"] = [f"{c.name} (life {i}): exit {life.crashed}" for c in cluster.components
                          for i, life in enumerate(c.lives) if life.crashed is not None]
    verdict["components"] = [c.report() for c in cluster.components]
    verdict["memory"] = memory_report(cluster, args.max_rss_growth)
    verdict["failures"] = failures(verdict)
    verdict["passed"] = not verdict["failures"]
    if verdict["passed"] and not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        verdict["run_dir"] = None
    return verdict


def _random_model(out: Path, seed: int) -> Path:
    from apar.modelgen import make_model
    from apar.quiet import quiet_transformers

    quiet_transformers()
    return make_model(out, "llama", seed=seed)


async def _storm(args, cluster: Cluster, storm: Storm, plan: list) -> list[dict]:
    import asyncio

    await storm.open()
    t0 = time.monotonic()
    tally = storm.tally
    total = args.requests
    duration = args.duration
    warm_after = max(20, total // 10) if duration is None else None
    started = 0
    kills: list[dict] = []
    crashes: list[str] = []
    series: list = []
    stop = asyncio.Event()

    def progress() -> float:
        if duration is not None:
            return min(1.0, (time.monotonic() - t0) / duration)
        return tally.done / max(total, 1)

    def more() -> bool:
        if len(kills) < len(plan) and not stop.is_set():
            return True  # the storm goes on until every planned kill is done
        if duration is not None:
            return time.monotonic() - t0 < duration and started < total
        return started < total

    def held() -> bool:
        """Requests beyond 5% of the run past the next planned kill wait for it to be done (a restart
        can take longer than the storm's rest would)."""
        if len(kills) >= len(plan) or stop.is_set():
            return False
        if duration is not None:
            return time.monotonic() - t0 > (plan[len(kills)][0] + 0.05) * duration
        return started >= (plan[len(kills)][0] + 0.05) * total

    async def client() -> None:
        nonlocal started
        while more():
            if held():
                await asyncio.sleep(0.05)
                continue
            started += 1
            await storm.one()

    async def chaos() -> None:
        for at, comp, action in plan:
            while progress() < at and not stop.is_set():
                await asyncio.sleep(0.05)
            if stop.is_set():
                return
            t, at_request = time.monotonic(), tally.done
            if action == "pause":
                mark = _count(comp, "registered again")
                await asyncio.to_thread(comp.pause, args.pause)
                kills.append({"component": comp.name, "action": "pause", "at_request": at_request,
                              "down_s": args.pause, "registered_again": await asyncio.to_thread(
                                  comp.wait_line, "registered again", mark, args.worker_ttl + 20)})
                continue
            await asyncio.to_thread(comp.kill, tally.done)
            down = args.kv_down if comp.kind == "kvmanager" and args.kv_down is not None else args.down
            await asyncio.sleep(down)
            try:
                await asyncio.to_thread(comp.start, tally.done)
            except RuntimeError as exc:
                crashes.append(str(exc))
                stop.set()
                return
            kills.append({"component": comp.name, "at_request": at_request, "down_s": down,
                          "restart_s": round(time.monotonic() - t, 2)})

    async def monitor() -> None:
        last_print = last_sample = 0.0
        while not stop.is_set():
            now = time.monotonic()
            warm = warm_after if warm_after is not None else max(20, int(tally.done / max(progress(), 1e-3) / 10))
            for c in cluster.components:
                c.sample(tally.done, warm)
                c.check_crash()  # recorded in its life: the verdict names it
            if now - last_sample >= args.sample_every:
                last_sample = now
                series.append({"t": round(now - t0, 1), "done": tally.done,
                               **{c.name: rss_kib(c.life.pid) for c in cluster.components if c.alive()}})
            if not args.quiet and now - last_print >= (0.5 if sys.stderr.isatty() else 10.0):
                last_print = now
                _progress(progress(), tally, len(kills), len(plan), now - t0)
            await asyncio.sleep(0.25)

    mon = asyncio.create_task(monitor())
    killer = asyncio.create_task(chaos())
    try:
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        stop.set()
        await killer
    finally:
        stop.set()
        await mon
        await storm.close()
        if not args.quiet:
            _progress(1.0, tally, len(kills), len(plan), time.monotonic() - t0)
            print(file=sys.stderr)
    cluster.series = series
    if crashes:
        raise RuntimeError("; ".join(crashes))
    return kills


def _progress(frac: float, tally: Tally, kills: int, planned: int, elapsed: float) -> None:
    width = 30
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    bad = sum(v for k, v in tally.outcomes.items() if k not in DOCUMENTED)
    line = (f"[{bar}] {tally.done} requests, {tally.outcomes.get('ok', 0)} ok, {bad} undocumented, "
            f"{tally.retries} retries, kills {kills}/{planned}, {elapsed:.0f} s")
    print(("\r" if sys.stderr.isatty() else "") + line, end="" if sys.stderr.isatty() else "\n", file=sys.stderr,
          flush=True)


# ---- after the storm: the state it left ------------------------------------------------------------------
def _wait(check, timeout: float, every: float = 0.1):
    """`check()` until it returns a true value or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def _digest_tuple(d) -> tuple:
    return (d.free_blocks, d.used_blocks, d.threads, d.tokens, d.next_free, d.named, d.contents)


def check_state(cluster: Cluster, done: int) -> dict:
    """Blocks in use per worker once idle; each replica against its worker's ledger; Redis's ledgers against
    the replicas; then the KV manager killed and restarted from Redis alone, against the workers again."""
    import grpc

    from apar.protogen import stubs
    from services.cluster_auth import ClusterToken
    from services.kvmanager.store import RedisStore
    from services.security import open_channel

    pb = stubs()
    token = ClusterToken.load(str(cluster.token_file))
    out: dict = {"workers": {}}

    def info(port: int):
        with open_channel(f"127.0.0.1:{port}", token=token) as ch:
            return pb.worker_pb2_grpc.WorkerStub(ch).Info(pb.worker_pb2.WorkerInfoRequest(), timeout=5)

    def usage() -> dict:
        try:
            with open_channel(f"127.0.0.1:{cluster.kv_port}", token=token) as ch:
                answer = pb.kvmanager_pb2_grpc.KVManagerStub(ch).Usage(pb.kvmanager_pb2.UsageRequest(), timeout=5)
            return {u.worker_id: _digest_tuple(u.digest) for u in answer.workers}
        except grpc.RpcError:
            return {}

    def ledgers() -> dict:
        return {f"w{i}": info(port) for i, port in enumerate(cluster.worker_ports)}

    def idle():
        now = ledgers()
        return now if all(i.running == 0 and i.waiting == 0 and i.free_blocks == i.num_blocks
                          for i in now.values()) else None

    final = _wait(idle, 30) or ledgers()
    mine = {w: _digest_tuple(i.ledger) for w, i in final.items()}
    for w, i in final.items():
        out["workers"][w] = {"blocks": i.num_blocks, "in_use": i.num_blocks - i.free_blocks, "running": i.running,
                             "waiting": i.waiting}
    out["blocks_leaked"] = {w: v["in_use"] for w, v in out["workers"].items()}

    def same_replicas():
        mine_now = {w: _digest_tuple(i.ledger) for w, i in ledgers().items()}
        return mine_now if usage() == mine_now else None

    agreed = _wait(same_replicas, 30, 0.25)
    replicas = usage()
    mine = agreed or mine
    out["replicas_equal"] = {w: replicas.get(w) == d for w, d in mine.items()}

    store = RedisStore(cluster.redis_url, prefix="apar:")

    def redis_view() -> dict:
        try:
            _, records = store.load()
        except Exception:
            return {}
        return {w: tuple(r.ledger.digest()) for w, r in records.items()}

    in_redis = _wait(lambda: (v := redis_view()) == mine and v, 30, 0.25) or redis_view()
    out["redis_equal"] = {w: in_redis.get(w) == d for w, d in mine.items()}

    # the manager killed, then restarted from Redis alone: its replicas as loaded, before any resync
    resyncs_before = sum(_count(c, "needs a resync|registered again") for c in cluster.workers)
    cluster.kvmanager.kill(done)
    cluster.kvmanager.start(done)
    loaded = _wait(lambda: u if set(u := usage()) >= set(mine) else None, 30, 0.05) or usage()
    out["restart_from_redis_equal"] = {w: loaded.get(w) == d for w, d in mine.items()}
    out["resyncs_after_restart"] = sum(_count(c, "needs a resync|registered again")
                                       for c in cluster.workers) - resyncs_before
    return out


def _count(c: Component, pattern: str) -> int:
    rx = re.compile(pattern)
    c._log.flush()
    try:
        return sum(1 for line in open(c.log_path, encoding="utf-8", errors="replace") if rx.search(line))
    except OSError:
        return 0


def memory_report(cluster: Cluster, max_growth: float) -> dict:
    """Per component: each life's resident memory (KiB) at start, after warm-up, at the end, and the growth
    from warm-up to the end of the lives that ran long enough after warm-up to tell (as many requests as the
    warm-up took again)."""
    out: dict = {"max_growth": max_growth, "components": {}, "series": getattr(cluster, "series", [])}
    for c in cluster.components:
        rows = []
        for life in c.lives:
            growth = None
            if life.rss_warm_kib and life.rss_end_kib and life.end_done is not None and life.warm_done is not None \
                    and life.end_done - life.warm_done >= life.warm_done - life.started_done:
                growth = round(life.rss_end_kib / life.rss_warm_kib - 1, 4)
            rows.append({"start_kib": life.rss_start_kib, "warm_kib": life.rss_warm_kib, "end_kib": life.rss_end_kib,
                         "peak_kib": life.rss_peak_kib, "requests_after_warm": None if life.warm_done is None or
                         life.end_done is None else life.end_done - life.warm_done, "growth": growth})
        out["components"][c.name] = rows
    return out


def failures(v: dict) -> list[str]:
    out = []
    if "error" in v:
        out.append(f"the run failed: {v['error']}")
    req = v.get("requests", {})
    bad = {k: n for k, n in req.get("outcomes", {}).items() if k not in DOCUMENTED}
    if bad:
        out.append(f"undocumented outcomes: {bad}")
    if req and req.get("done", 0) == 0:
        out.append("no request finished")
    st = v.get("state", {})
    for key, what in (("replicas_equal", "replica differs from its worker's ledger"),
                      ("redis_equal", "Redis's ledger differs from the worker's"),
                      ("restart_from_redis_equal", "the KV manager restarted from Redis differs from the worker")):
        for w, ok in st.get(key, {}).items():
            if not ok:
                out.append(f"{w}: {what}")
    for w, n in st.get("blocks_leaked", {}).items():
        if n:
            out.append(f"{w}: {n} blocks still in use when idle")
    ttl = v.get("config", {}).get("worker_ttl", 10)
    for k in v.get("kills", []):
        if k.get("action") == "pause" and k["down_s"] > ttl + 2 and not k["registered_again"]:
            out.append(f"{k['component']}: frozen past its time-to-live, it never registered again")
    if v.get("crashed"):
        out.append(f"exited on their own: {v['crashed']}")
    for c in v.get("components", []):
        if c["tracebacks"]:
            out.append(f"{c['name']}: {c['tracebacks']} tracebacks in its log ({c['log']})")
    for name, rows in v.get("memory", {}).get("components", {}).items():
        for i, r in enumerate(rows):
            if r["growth"] is not None and r["growth"] > v["memory"]["max_growth"] and name != "redis":
                out.append(f"{name} (life {i}): resident memory grew {100 * r['growth']:.1f}% after warm-up")
    return out


def render(v: dict) -> str:
    lines = []
    req = v.get("requests", {})
    cfg = v["config"]
    lines.append(f"chaos: {req.get('done', 0)} requests ({cfg['concurrency']} at once) in {v.get('storm_s', '?')} s, "
                 f"seed {cfg['seed']}, {len(v.get('kills', []))} kills")
    lines.append("outcomes: " + ", ".join(f"{k} {n}" for k, n in sorted(req.get("outcomes", {}).items())))
    lines.append(f"retries on another router: {req.get('retries', 0)} ({req.get('broken_mid_answer', 0)} broken "
                 "mid-answer)")
    for ex in req.get("undocumented_examples", [])[:5]:
        lines.append(f"  undocumented: {ex}")
    kills = ", ".join(f"{k['component']}@{k['at_request']}" + (
        f" (restart {k['restart_s']} s)" if "restart_s" in k else
        f" (paused {k['down_s']} s, registered again: {k['registered_again']})") for k in v.get("kills", []))
    lines.append(f"kills: {kills or 'none'}")
    st = v.get("state", {})
    if st:
        lines.append(f"blocks in use when idle: {st['blocks_leaked']}")
        lines.append(f"replica == worker ledger: {st['replicas_equal']}; Redis == ledger: {st['redis_equal']}; "
                     f"KV manager restarted from Redis == ledger: {st['restart_from_redis_equal']} "
                     f"(resyncs after it: {st['resyncs_after_restart']})")
    lines.append("memory (MiB: start / after warm-up / end, growth after warm-up) and logs:")
    mem = v.get("memory", {}).get("components", {})
    for c in v.get("components", []):
        lives = []
        for r in mem.get(c["name"], []):
            f = [("-" if r[k] is None else f"{r[k] / 1024:.0f}") for k in ("start_kib", "warm_kib", "end_kib")]
            g = "" if r["growth"] is None else f" {100 * r['growth']:+.1f}%"
            lives.append("/".join(f) + g)
        lines.append(f"  {c['name']:10} lives: {'; '.join(lives)}")
        lines.append(f"  {'':10} log: {c['lines']} lines, {c['warnings']} warnings, {c['errors']} errors, "
                     f"{c['tracebacks']} tracebacks")
        for head, n in list(c["traceback_kinds"].items())[:3]:
            lines.append(f"  {'':10}   {n} x {head}")
    if v.get("run_dir"):
        lines.append(f"logs: {v['run_dir']}")
    if v["failures"]:
        lines.append("FAILED:")
        lines.extend(f"  - {f}" for f in v["failures"])
    else:
        lines.append("PASSED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover (for `python -m apar.bench_suite.chaos`)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    args = parser.parse_args(["chaos", *(argv or sys.argv[1:])])
    return run_chaos_cmd(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
