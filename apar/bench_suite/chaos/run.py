"""One chaos run: the cluster started, the storm with its fault schedule, the verdict."""
from __future__ import annotations

import contextlib
import random
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from apar.bench_suite.chaos.cluster import Cluster
from apar.bench_suite.chaos.faults import kill_plan
from apar.bench_suite.chaos.storm import Storm, _storm
from apar.bench_suite.chaos.verdict import check_state, failures, memory_report


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT during a chaos run, raised where the run is so that it stops its cluster: each
    component runs in its own session, so the signal reaches none of them. `apar` exits 130 on it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir: Path | None = None


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_are(handler):
    """SIGINT and SIGTERM handled by `handler` inside the block (in the main thread only: elsewhere,
    Python cannot set a handler and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def run_chaos(args) -> dict:
    with _signals_are(_raise_interrupted):
        return _run_chaos(args)


def _run_chaos(args) -> dict:
    import asyncio

    rng = random.Random(args.seed)
    keep = args.log_dir is not None
    run_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="apar-chaos-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else _random_model(run_dir / "model", args.seed)
    cluster = Cluster(model, args.workers, args.routers, args.kv_blocks, run_dir, args.worker_ttl,
                      args.gc_every)
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
        t1 = time.monotonic()
        verdict["state"] = check_state(cluster, storm.tally.done)
        verdict["check_s"] = round(time.monotonic() - t1, 1)
    except Exception as exc:
        verdict["error"] = f"{type(exc).__name__}: {exc}"
    except Interrupted as exc:
        exc.run_dir = run_dir  # kept, with each component's log
        raise
    finally:
        with _signals_are(signal.SIG_IGN):  # a second signal must not leave the cluster half stopped
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
