"""The closed-loop driver: C requests in flight on one engine, measured through its public calls only.

A level submits its first C jobs, steps the engine, and submits the next job as soon as one finishes, so
C requests are in flight until the list runs out (a client that waits for each answer before asking
again). Under a limited pool the engine decides how many of them actually run: by reservation, or by
free blocks with preemption; `running_mean` shows which. Every level of every mode gets the same jobs.
Latency runs from submission (queueing included) to the request's end; TTFT to its first token event.
Counters newer engines keep (`forks_refused`, `recomputed_tokens`, `Usage.preemptions`,
`Usage.cached_tokens`) are read with getattr, so the driver works before and after them.
"""
from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from apar.engine.events import RequestFinished, TokenEvent
from apar.engine.params import SamplingParams
from apar.engine.replay import ReplayNode

_ENGINE_COUNTERS = ("forks_refused", "recomputed_tokens")
_IDLE_LIMIT = 1000  # engine calls in a row with no step and no event: the pool cannot serve the jobs


@dataclass(frozen=True, slots=True)
class Job:
    """One request of a workload, as the engine is given it."""

    prompt: list[int]
    params: SamplingParams
    replay: ReplayNode | None = None

    def worst_blocks(self, block_size: int) -> int:
        """The most blocks it may hold at once: prompt and every token, two part-filled blocks a thread."""
        if self.replay is not None:
            threads = self.replay.threads()
        else:
            threads = self.params.max_threads if self.params.auto_parallel else 1
        return -(-(len(self.prompt) + self.params.max_tokens) // block_size) + 2 * threads


@dataclass(slots=True)
class LevelStats:
    """One concurrency level of one mode: sums over its requests and steps, and per-request times (s)."""

    concurrency: int
    requests: int = 0
    tokens: int = 0  # completion tokens over all threads, control tokens included
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    steps: int = 0  # engine steps (forward passes)
    request_steps: int = 0  # generation steps summed over requests (docs/design.md, "Measures")
    wall_s: float = 0.0
    peak_kv_blocks: int = 0
    kv_block_steps: int = 0  # blocks in use at the end of each step, summed over steps
    running_steps: int = 0  # requests in each step's batch, summed over steps
    attended_tokens: int = 0
    preemptions: int = 0
    forks_refused: int = 0
    recomputed_tokens: int = 0
    forked: int = 0  # requests with at least one fork
    errors: int = 0  # requests the engine ended with an error (the KV cache full)
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    @property
    def running_mean(self) -> float:
        return self.running_steps / self.steps if self.steps else 0.0

    @property
    def steps_per_request(self) -> float:
        return self.request_steps / self.requests if self.requests else 0.0

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency, "requests": self.requests, "tokens": self.tokens,
            "steps": self.steps, "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
            "requests_per_s": self.requests_per_s, "latency_p50_s": _pct(self.latencies, 50),
            "latency_p99_s": _pct(self.latencies, 99), "ttft_p50_s": _pct(self.ttfts, 50),
            "running_mean": self.running_mean, "steps_per_request": self.steps_per_request,
            "step_ms_mean": 1000 * self.wall_s / self.steps if self.steps else 0.0,
            "peak_kv_blocks": self.peak_kv_blocks,
            "kv_mean_blocks": self.kv_block_steps / self.steps if self.steps else 0.0,
            "attended_tokens": self.attended_tokens, "preemptions": self.preemptions,
            "forks_refused": self.forks_refused, "recomputed_tokens": self.recomputed_tokens,
            "forked_share": self.forked / self.requests if self.requests else 0.0, "errors": self.errors,
        }


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


@dataclass(slots=True)
class ModeRun:
    """Every level one mode ran, in order."""

    name: str  # "ar", "apar", "hf"
    label: str  # for tables: "AR", "APAR", "HF generate"
    levels: list[LevelStats] = field(default_factory=list)

    def totals(self) -> dict:
        ls = self.levels
        requests, tokens, wall = (sum(getattr(x, k) for x in ls) for k in ("requests", "tokens", "wall_s"))
        out = {"requests": requests, "tokens": tokens, "steps": sum(x.steps for x in ls), "wall_s": wall,
               "peak_kv_blocks": max((x.peak_kv_blocks for x in ls), default=0)}
        for key in ("attended_tokens", "preemptions", "forks_refused", "recomputed_tokens", "errors"):
            out[key] = sum(getattr(x, key) for x in ls)
        out["steps_per_request"] = sum(x.request_steps for x in ls) / requests if requests else 0.0
        out["tokens_per_s"] = tokens / wall if wall else 0.0
        out["forked_share"] = sum(x.forked for x in ls) / requests if requests else 0.0
        return out


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...


def run_level(engine, jobs: list[Job], concurrency: int, progress: Progress | None = None) -> LevelStats:
    """Run `jobs` through `engine` keeping `concurrency` of them in flight; the engine must be idle."""
    stats = LevelStats(concurrency)
    queue = deque(jobs)
    submitted: dict[str, float] = {}
    first_token: dict[str, float] = {}
    counters = {k: getattr(engine, k, 0) for k in _ENGINE_COUNTERS}
    idle = 0
    t0 = time.perf_counter()

    def top_up() -> None:
        while queue and len(submitted) < concurrency:
            job = queue.popleft()
            rid = engine.add_request(job.prompt, job.params, replay=job.replay)
            submitted[rid] = time.perf_counter()

    top_up()
    while submitted:
        steps_before = engine.steps
        events = engine.step().events
        now = time.perf_counter()
        finished = 0
        for event in events:
            if isinstance(event, TokenEvent):
                first_token.setdefault(event.request, now)
            elif isinstance(event, RequestFinished) and event.request in submitted:
                start = submitted.pop(event.request)
                stats.latencies.append(now - start)
                stats.ttfts.append(first_token.pop(event.request, now) - start)
                _add_usage(stats, event)
                finished += 1
                if progress is not None:
                    progress.update(1)
        if engine.steps > steps_before:
            used = engine.ledger.num_used
            stats.steps += engine.steps - steps_before
            stats.running_steps += len(engine.scheduler.running) + finished
            stats.kv_block_steps += used
            stats.peak_kv_blocks = max(stats.peak_kv_blocks, used)
            idle = 0
        elif not events:
            idle += 1
            if idle > _IDLE_LIMIT:
                raise RuntimeError(f"the engine made no progress with {len(submitted)} requests in flight "
                                   f"({engine.ledger.num_blocks} KV blocks)")
        top_up()
    stats.wall_s = time.perf_counter() - t0
    for k, before in counters.items():
        setattr(stats, k, getattr(engine, k, 0) - before)
    return stats


def _add_usage(stats: LevelStats, event: RequestFinished) -> None:
    u = event.usage
    stats.requests += 1
    stats.tokens += u.completion_tokens
    stats.prompt_tokens += u.prompt_tokens
    stats.cached_tokens += getattr(u, "cached_tokens", 0)
    stats.request_steps += u.steps
    stats.attended_tokens += u.attended_tokens
    stats.preemptions += getattr(u, "preemptions", 0)
    stats.forked += u.forks > 0
    stats.errors += event.error is not None


@dataclass(slots=True)
class Mode:
    """One side of a comparison: its jobs and how one level of them runs (an engine, or HF generate)."""

    name: str
    label: str
    jobs: list[Job]
    run: Callable[[list[Job], int, Progress | None], LevelStats]


@dataclass(frozen=True, slots=True)
class LevelPlan:
    """Which concurrency levels run, and how many requests each gets."""

    levels: tuple[int, ...]  # always run, in order
    max_concurrency: int = 0  # past the last level: double while tokens/s still grows, up to this
    rounds: int = 2  # requests per level: max(min_requests, rounds x concurrency)
    min_requests: int = 8
    growth: float = 1.05  # "still grows": a mode's tokens/s at least this times the level before
    deadline: float | None = None  # time.perf_counter() after which no new level starts

    def requests(self, concurrency: int) -> int:
        return max(self.min_requests, self.rounds * concurrency)


def run_levels(modes: list[Mode], plan: LevelPlan, tag: str, progress: bool = True) -> dict[str, ModeRun]:
    """Every level of the plan, the modes alternating within each level (so drift hits them alike)."""
    from tqdm import tqdm

    runs = {m.name: ModeRun(m.name, m.label) for m in modes}
    levels = list(plan.levels)
    bar = tqdm(total=sum(plan.requests(c) for c in levels) * len(modes), desc=tag, unit="req",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        i = 0
        while i < len(levels):
            level = levels[i]
            i += 1
            if plan.deadline is not None and time.perf_counter() > plan.deadline:
                bar.write(f"{tag}: time budget spent, levels from {level} skipped")
                break
            for m in modes:
                bar.set_postfix_str(f"{m.label} C={level}")
                jobs = list(itertools.islice(itertools.cycle(m.jobs), plan.requests(level)))
                runs[m.name].levels.append(m.run(jobs, level, bar))
            if i == len(levels) and level * 2 <= plan.max_concurrency and _growing(runs, plan.growth):
                levels.append(level * 2)
                bar.total += plan.requests(level * 2) * len(modes)
                bar.refresh()
    finally:
        bar.close()
    return runs


def _growing(runs: dict[str, ModeRun], growth: float) -> bool:
    """True while some mode's tokens/s grew by `growth` over the level before."""
    for run in runs.values():
        if len(run.levels) < 2 or run.levels[-1].tokens_per_s >= growth * run.levels[-2].tokens_per_s:
            return True
    return False
