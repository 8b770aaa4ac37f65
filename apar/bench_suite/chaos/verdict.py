"""After the storm: the state it left (blocks, replicas, Redis ledgers, a KV manager restarted from Redis),
memory, logs, and the verdict with its failures and report."""
from __future__ import annotations

import time

from apar.bench_suite.chaos.cluster import Cluster, _count
from apar.bench_suite.chaos.storm import DOCUMENTED


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
    cfg = v.get("config", {})
    for k in (k for k in v.get("kills", []) if k.get("action") == "pause"):
        if k["reaped"] and not k["registered_again"]:
            out.append(f"{k['component']}: reaped while frozen, it never registered again")
        if not k["reaped"] and cfg.get("pause", 0) > cfg.get("worker_ttl", 10) + 2:
            out.append(f"{k['component']}: frozen {k['down_s']} s, past its time-to-live, it was never reaped")
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
        f" (paused {k['down_s']} s, reaped: {k['reaped']}, registered again: {k['registered_again']})")
        for k in v.get("kills", []))
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
