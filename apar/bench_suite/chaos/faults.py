"""The fault schedule: which component is killed (or frozen) when, fixed or seeded random."""
from __future__ import annotations

import random

from apar.bench_suite.chaos.cluster import KINDS, Cluster, Component


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
