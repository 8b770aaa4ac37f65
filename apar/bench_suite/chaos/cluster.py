"""The chaos cluster: its processes (redis-server, KV manager, workers, routers), each started, watched,
killed and restarted."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path


KINDS = ("router", "worker", "kvmanager", "redis")
LEVEL = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ \S+ (WARNING|ERROR|CRITICAL) ")
CORE_ERROR = re.compile(r"^E\d{4} ")  # gRPC core's own error lines


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
    ready_after_s: float | None = None  # from its start to its ready line (and check)
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
        # line-buffered: a reader of the log (a user's tail, a test) sees each line as it is written
        self._log = open(self.log_path, "a", encoding="utf-8", errors="replace", buffering=1)

    def start(self, done: int, timeout: float = 120.0) -> None:
        self.launch(done)
        self.wait_ready(timeout)

    def launch(self, done: int) -> None:
        """Start the process (a new life) without waiting for it to be ready."""
        with self._cond:
            self._ready_seen = False
        self._log.write(f"==== start {time.strftime('%H:%M:%S')} ====\n")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, start_new_session=True, errors="replace")
        self.lives.append(Life(self.proc.pid, time.monotonic(), done))
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the life just launched prints its ready line (and passes its check); RuntimeError when it
        exits or `timeout` passes first."""
        life = self.life
        deadline = life.started_s + timeout
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
        life.ready_after_s = round(time.monotonic() - life.started_s, 2)

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

    def pause(self, seconds: float, until=None) -> tuple[float, bool]:
        """SIGSTOP, then SIGCONT once `until(timeout)` (which waits for an event, `timeout` at most) says
        it came, or after `seconds` without `until`: frozen, it answers nothing and sends no heartbeat.
        (seconds frozen, whether the event came)."""
        t = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            came = until(seconds) if until is not None else bool(time.sleep(seconds))
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)
        return round(time.monotonic() - t, 2), came

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
                 worker_ttl: int = 10, gc_every: float | None = None) -> None:
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
        gc = [] if gc_every is None else ["--gc-every", str(gc_every)]  # else the KV manager's own default
        self.kvmanager = Component("kvmanager", "kvmanager", [
            *py, "kvmanager", "--port", str(self.kv_port), "--redis", self.redis_url, *gc, *tok], run_dir,
            "listening on")
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
        """Redis, then the KV manager, then every worker and router at once (each waits for the manager
        only), each ready before this returns."""
        self.redis.start(0)
        self.kvmanager.start(0)
        rest = [*self.workers, *self.routers]
        for c in rest:
            c.launch(0)
        for c in rest:
            c.wait_ready()

    def stop(self) -> None:
        for c in reversed(self.components):
            c.stop()

    def worker_id(self, worker: Component) -> str:
        return f"w{self.workers.index(worker)}"

    def of_kind(self, kind: str) -> list[Component]:
        return {"router": self.routers, "worker": self.workers, "kvmanager": [self.kvmanager],
                "redis": [self.redis]}[kind]


# ---- the storm -----------------------------------------------------------------------------------------


def _count(c: Component, pattern: str) -> int:
    rx = re.compile(pattern)
    c._log.flush()
    try:
        return sum(1 for line in open(c.log_path, encoding="utf-8", errors="replace") if rx.search(line))
    except OSError:
        return 0
