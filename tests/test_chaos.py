"""`apar bench chaos` as CI runs it: a short storm on a loopback cluster (Redis, a KV manager, two workers,
two routers) with every component killed once and restarted, a worker frozen until the KV manager reaps it
(it must register again and resync), and its verdict asserted. The bench waits on events throughout (a
restarted process's ready line, Redis answering, the manager's line that it reaped the frozen worker, idle
workers, equal digests)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from apar.bench_suite.chaos import DOCUMENTED, failures
from tests.faults import wait_until
from tests.procs import require


def test_a_short_chaos_passes_its_verdict(llama_dir, tmp_path):
    require("redis-server")
    out = subprocess.run([sys.executable, "-m", "apar.cli", "bench", "chaos", "--model", str(llama_dir),
                          "--requests", "240", "--concurrency", "16", "--max-tokens", "16", "--down", "0.2",
                          "--seed", "5", "--pause", "30", "--worker-ttl", "2", "--json", "--quiet", "--log-dir",
                          str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout, out.stderr[-3000:]
    v = json.loads(out.stdout)
    assert v["passed"] and out.returncode == 0, (v["failures"], out.stderr[-2000:])
    killed = {k["component"].rstrip("0123456789") for k in v["kills"] if k.get("action") != "pause"}
    assert killed == {"router", "worker", "kvmanager", "redis"}, v["kills"]
    # a worker frozen past its time-to-live was reaped, registered again and resynced (replicas below)
    assert [(k["reaped"], k["registered_again"]) for k in v["kills"] if k.get("action") == "pause"] == \
        [(True, True)], v["kills"]
    req = v["requests"]
    assert req["done"] == 240 and set(req["outcomes"]) <= set(DOCUMENTED), req
    assert req["outcomes"].get("ok", 0) > 100, req
    st = v["state"]
    assert st["blocks_leaked"] == {"w0": 0, "w1": 0}
    assert all(st["replicas_equal"].values()) and all(st["redis_equal"].values())
    assert all(st["restart_from_redis_equal"].values())
    assert all(c["tracebacks"] == 0 for c in v["components"]), [c["traceback_kinds"] for c in v["components"]]
    assert all(len(c["lives"]) >= 2 for c in v["components"] if c["name"] in ("router0", "worker0",
                                                                               "kvmanager", "redis"))
    for lives in v["memory"]["components"].values():
        assert all(life["start_kib"] for life in lives)


def test_the_verdict_fails_on_what_is_wrong():
    """Each check can fail: a leaked block, a replica that differs, an undocumented outcome, a traceback,
    memory that grows, a frozen worker never reaped, a reaped one that never registered again."""
    ok = {"requests": {"done": 10, "outcomes": {"ok": 10}}, "components": [{"name": "router0", "tracebacks": 0,
          "log": "x"}], "state": {"replicas_equal": {"w0": True}, "redis_equal": {"w0": True},
                                  "restart_from_redis_equal": {"w0": True}, "blocks_leaked": {"w0": 0}},
          "memory": {"max_growth": 0.1, "components": {"router0": [{"growth": 0.05}]}},
          "config": {"pause": 30, "worker_ttl": 2}, "kills": [{"component": "worker0", "action": "pause",
                                                               "down_s": 2.9, "reaped": True, "registered_again": True}]}
    assert failures(ok) == []
    bad = json.loads(json.dumps(ok))
    bad["state"]["blocks_leaked"]["w0"] = 3
    bad["state"]["replicas_equal"]["w0"] = False
    bad["requests"]["outcomes"]["grpc_internal"] = 1
    bad["components"][0]["tracebacks"] = 2
    bad["memory"]["components"]["router0"][0]["growth"] = 0.25
    bad["kills"][0]["registered_again"] = False
    bad["kills"].append({"component": "worker1", "action": "pause", "down_s": 30.0, "reaped": False,
                         "registered_again": False})
    found = failures(bad)
    assert len(found) == 7, found


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (reparented, its reaper may not be quick)


def test_a_terminated_chaos_run_stops_its_cluster(llama_dir, tmp_path):
    """Each component runs in its own session, so a signal to `apar bench chaos` reaches none of them: on
    SIGTERM (as on Ctrl-C) the bench stops the cluster it started before it exits."""
    require("redis-server")
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-m", "apar.cli", "bench", "chaos", "--model", str(llama_dir),
                             "--duration", "600", "--requests", "1000000", "--rounds", "0", "--quiet",
                             "--log-dir", str(logs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # every component started and the routers listening: the storm is under way (or about to be)
        def cluster_up() -> bool:
            assert proc.poll() is None, proc.communicate(timeout=30)  # the bench must not end by itself
            return len(_children(proc.pid)) >= 6 and all(
                (logs / f"router{i}.log").exists() and "listening on" in (logs / f"router{i}.log").read_text()
                for i in (0, 1))

        wait_until(cluster_up, 480, "every component started and both routers listening")
        cluster = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted (SIGTERM); the cluster is stopped" in err, err[-2000:]
    assert [pid for pid in cluster if _running(pid)] == []


def _chaos_args(*argv: str):
    import argparse

    from apar.bench_suite.chaos.cli import register, resolve_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["chaos", *argv])
    resolve_args(args)
    return args


def test_a_duration_alone_runs_for_its_duration_however_many_requests_end():
    """`--duration` without `--requests` is a soak: the storm's clients go on until the duration passes,
    beyond the 1000 requests that bound a run without `--duration` (here a storm of requests that end at
    once, on a cluster of no process)."""
    import asyncio
    import time
    from types import SimpleNamespace

    from apar.bench_suite.chaos.storm import Tally, _storm

    assert _chaos_args().requests == 1000
    args = _chaos_args("--duration", "1.5", "--rounds", "0", "--quiet")

    class Instant:
        tally = Tally()

        async def open(self):
            pass

        async def close(self):
            pass

        async def one(self):
            await asyncio.sleep(0)
            self.tally.add("grpc_final", "ok")

    storm = Instant()
    t0 = time.monotonic()
    assert asyncio.run(_storm(args, SimpleNamespace(components=[]), storm, [])) == []
    assert time.monotonic() - t0 >= 1.5
    assert storm.tally.done > 1000, storm.tally.done


def test_gc_every_reaches_the_kv_manager_only_when_given(tmp_path):
    from apar.bench_suite.chaos.cluster import Cluster
    from apar.engine.errors import UserError

    def kv_argv(*argv: str) -> list[str]:
        run = tmp_path / str(len(list(tmp_path.iterdir())))
        run.mkdir()
        args = _chaos_args(*argv)
        return Cluster(tmp_path / "model", 2, 2, 64, run, args.worker_ttl, args.gc_every).kvmanager.argv

    assert "--gc-every" not in kv_argv()  # the KV manager's own default
    argv = kv_argv("--gc-every", "2.5")
    assert argv[argv.index("--gc-every") + 1] == "2.5"
    with pytest.raises(UserError, match="--gc-every"):
        _chaos_args("--gc-every", "-1")
