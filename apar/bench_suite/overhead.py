"""`apar bench overhead`: the engine's time outside the model forward, per step, at a steady batch.

A step is planning, allocation, building the step's data, the forward pass, sampling and applying the
tokens. This times `Engine.step()` and, inside it, the model's forward (the attention included: each
backend's once-per-step preparation is outside it, in the runner), on a small random model, so that what
is left is the engine's own work per step. Three batches, each measured once every thread decodes:
- `ar16`, `ar64`: 16 or 64 auto-regressive requests;
- `apar64`: 4 requests of 16 threads each (a root that forks 15 children early, all sharing the prompt).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(slots=True)
class Overhead:
    batch: str
    threads: int
    steps: int
    step_ms: float
    forward_ms: float

    @property
    def outside_ms(self) -> float:
        return self.step_ms - self.forward_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "outside_ms": self.outside_ms}


def _timed_forward(model, sync):
    """Wrap the model's forward so that every call adds its wall time to `spent[0]`."""
    spent = [0.0]
    inner = model.forward

    def forward(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        sync()
        spent[0] += time.perf_counter() - t0
        return out

    model.forward = forward
    return spent


def _requests(engine, batch: str, seed: int) -> None:
    import random

    from apar.engine.params import SamplingParams
    from apar.engine.replay import ReplayNode

    rng = random.Random(seed)
    plain = [i for i in range(10, 900) if i not in (engine.fork_id, engine.child_id, *engine.eos_ids)]
    if batch.startswith("ar"):
        for _ in range(int(batch[2:])):
            engine.add_request(rng.sample(plain, 32), SamplingParams(max_tokens=2_000, auto_parallel=False,
                                                                     ignore_eos=True))
        return
    for _ in range(4):  # apar64: 4 x (root + 15 children), forked early, long threads
        children = [ReplayNode([rng.choice(plain) for _ in range(600)]) for _ in range(15)]
        root = []
        for _ in range(15):
            root += [rng.choice(plain), engine.fork_id]
        root += [rng.choice(plain) for _ in range(600)]
        tree = ReplayNode(root, children)
        engine.add_request(rng.sample(plain, 32), SamplingParams(max_tokens=100_000, max_threads=16, max_depth=4),
                           replay=tree)


def measure(model_dir: Path, batch: str, steps: int, seed: int = 0, **config) -> Overhead:
    """Mean per-step times of `batch` (see the module doc) after the batch is steady."""
    from apar.engine.config import EngineConfig
    from apar.engine.engine import Engine

    engine = Engine(model_dir, EngineConfig(block_size=16, num_blocks=4096, max_batch_tokens=512, **config))
    dev = engine.runner.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    _requests(engine, batch, seed)
    want = 64 if batch.endswith("64") else 16
    for _ in range(200):  # prefill, forks: until every thread decodes
        engine.step()
        if sum(len(r.running_threads) for r in engine.requests.values()) >= want and \
                not any(t.pending > 1 for r in engine.requests.values() for t in r.threads):
            break
    for _ in range(3):
        engine.step()
    threads = sum(len(r.running_threads) for r in engine.requests.values())
    spent = _timed_forward(engine.runner.model, sync)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    wall = time.perf_counter() - t0
    return Overhead(batch, threads, steps, 1e3 * wall / steps, 1e3 * spent[0] / steps)


def run(model_dir: Path, batches: list[str], steps: int, repeats: int, **config) -> list[Overhead]:
    """Each batch `repeats` times (alternating); the run with the least time outside the forward counts."""
    best: dict[str, Overhead] = {}
    for _ in range(repeats):
        for b in batches:
            o = measure(model_dir, b, steps, **config)
            if b not in best or o.outside_ms < best[b].outside_ms:
                best[b] = o
    return [best[b] for b in batches]
