"""The workloads: where the jobs come from and which engines run them.

- trace: paragraph trees of test-split answers replayed, AR (the restored linear tokens as one thread)
  beside APAR (the tree), on one engine, with the pool unlimited and then limited;
- live: the demo model sampling its own answers beside its AR twin, on test-split prompts, both pools;
- hf: the engine in AR mode beside HF `generate`, fixed-length prompts and answers, levels as batches.
"""
from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from apar.bench import answer_trees_for, tree_tokens
from apar.bench_suite.driver import Job, LevelPlan, LevelStats, Mode, Progress, run_level, run_levels
from apar.bench_suite.report import Report, Run
from apar.engine.config import ControlTokens, EngineConfig, SpeculativeConfig
from apar.engine.errors import UserError
from apar.engine.params import SamplingParams
from apar.engine.replay import ReplayNode


@dataclass(frozen=True, slots=True)
class SuiteSettings:
    """What every workload shares: the levels, the engine's sizes, the limited pool."""

    plan: LevelPlan
    kv_blocks: int | None = None  # the limited pool; None: pool_fraction x AR's unlimited peak at the top level
    pool_fraction: float = 0.4
    block_size: int = 16
    max_batch_tokens: int = 512
    admit_watermark: float = 0.04
    fork_watermark: float = 0.01
    device: str | None = None
    dtype: str = "auto"
    rows_kernel: bool = True  # `EngineConfig.rows_kernel`: CPU products of a few rows through the kernel
    attention: str = "auto"
    compile: bool | None = None  # torch.compile the decoder layers (`EngineConfig.compile`; None: on CUDA)
    control: ControlTokens = field(default_factory=ControlTokens)
    progress: bool = True
    data: Path | None = None  # the AlpacaEval folder; None: `apar.data.alpaca_split.data_dir()`
    # off: these benches compare decoding (APAR beside AR), and the rounds replay the same prompts, which
    # the cache would serve from the second round on; `apar bench prefix` measures the cache itself
    prefix_cache: bool = False
    # live: a third mode, APAR with this speculation inside its threads (off: none)
    speculate: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def engine(self, model_dir: str | Path, num_blocks: int, speculate: bool = False):
        from apar.engine.engine import Engine

        return Engine(model_dir, EngineConfig(block_size=self.block_size, num_blocks=num_blocks,
                                              max_batch_tokens=self.max_batch_tokens,
                                              admit_watermark=self.admit_watermark,
                                              fork_watermark=self.fork_watermark, device=self.device,
                                              dtype=self.dtype, attention=self.attention, compile=self.compile,
                                              rows_kernel=self.rows_kernel,
                                              control=self.control,
                                              prefix_cache=self.prefix_cache,
                                              speculate=self.speculate if speculate else SpeculativeConfig()))

    def describe(self) -> dict:
        p = self.plan
        return {"levels": list(p.levels), "max_concurrency": p.max_concurrency, "rounds": p.rounds,
                "min_requests": p.min_requests, "block_size": self.block_size,
                "max_batch_tokens": self.max_batch_tokens, "pool_fraction": self.pool_fraction,
                "admit_watermark": self.admit_watermark, "fork_watermark": self.fork_watermark,
                "speculate": self.speculate.method, "num_speculative_tokens": self.speculate.num_tokens,
                "draft_policy": self.speculate.policy, "rows_kernel": self.rows_kernel}


def warm_up(engine, jobs: list[Job]):
    """One short request through a new engine, so the first level pays no start-up cost (compiled layers
    and CUDA graphs the engine readied in its own warm-up); the engine back."""
    params = SamplingParams(max_tokens=8, auto_parallel=False, ignore_eos=True)
    run_level(engine, [Job(jobs[0].prompt, params)], 1)
    return engine


def engine_mode(name: str, label: str, engine, jobs: list[Job]) -> Mode:
    """A mode run by `engine` (warmed up)."""

    def run(level_jobs: list[Job], concurrency: int, progress: Progress | None) -> LevelStats:
        return run_level(engine, level_jobs, concurrency, progress)

    return Mode(name, label, jobs, run)


def unlimited_blocks(jobs: list[Job], concurrency: int, block_size: int) -> int:
    """A pool no set of `concurrency` jobs in flight can fill (each job at most once per cycle)."""
    worst = sorted((j.worst_blocks(block_size) for j in jobs), reverse=True)
    return sum(itertools.islice(itertools.cycle(worst), concurrency)) + 1


def two_pools(make_modes: Callable[[int], list[Mode]], jobs: list[Job], s: SuiteSettings, tag: str) -> list[Run]:
    """The modes with the pool unlimited, then limited (same levels): AR bound by memory in the second."""
    top = max(s.plan.levels + (s.plan.max_concurrency,))
    big = unlimited_blocks(jobs, top, s.block_size)
    wide = run_levels(make_modes(big), s.plan, f"{tag} unlimited", s.progress)
    fits_one = max(j.worst_blocks(s.block_size) for j in jobs)  # any single request runs alone
    small = s.kv_blocks or max(fits_one, int(s.pool_fraction * wide["ar"].levels[-1].peak_kv_blocks))
    if small < fits_one:
        print(f"note: {small} KV blocks is less than one request may need ({fits_one}): some may end early")
    plan = replace(s.plan, levels=tuple(x.concurrency for x in wide["ar"].levels), max_concurrency=0)
    narrow = run_levels(make_modes(small), plan, f"{tag} limited", s.progress)
    runs = [Run("unlimited", big, "ar", "apar", wide), Run("limited", small, "ar", "apar", narrow, limited=True)]
    if "spec" in wide:  # APAR with speculation, beside plain APAR and beside AR
        for base in ("apar", "ar"):
            runs += [Run(f"spec over {base}", big, base, "spec", wide),
                     Run(f"spec over {base}", small, base, "spec", narrow, limited=True)]
    return runs


# ---- trace ------------------------------------------------------------------------------------------
def trace_jobs(model_dir: str | Path, s: SuiteSettings, answers: int, max_answer_tokens: int, seed: int
               ) -> tuple[list[Job], list[Job]]:
    """(AR jobs, APAR jobs): the same test-split answers, as linear tokens and as paragraph trees."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    items = answer_trees_for(tokenizer, s.control, answers, max_answer_tokens, seed, s.data)
    if not items:
        raise UserError(f"no forkable test-split answer fits {max_answer_tokens} tokens: raise --max-answer-tokens")
    ar, apar = [], []
    for prompt, tree, linear in items:
        ar.append(replay_job(prompt, ReplayNode(linear), auto_parallel=False))
        apar.append(replay_job(prompt, tree, auto_parallel=True))
    return ar, apar


def replay_job(prompt: list[int], tree: ReplayNode, auto_parallel: bool) -> Job:
    params = SamplingParams(max_tokens=tree_tokens(tree), auto_parallel=auto_parallel,
                            max_threads=tree.threads(), max_depth=64)
    return Job(prompt, params, tree)


def run_trace(model_dir: str | Path, s: SuiteSettings, answers: int = 64, max_answer_tokens: int = 400,
              seed: int = 0) -> Report:
    ar_jobs, apar_jobs = trace_jobs(model_dir, s, answers, max_answer_tokens, seed)

    def make_modes(blocks: int) -> list[Mode]:
        engine = warm_up(s.engine(model_dir, blocks), ar_jobs)
        modes = [engine_mode("ar", "AR", engine, ar_jobs), engine_mode("apar", "APAR", engine, apar_jobs)]
        if s.speculate.enabled:  # the replayed threads draft, checked against their known tokens
            spec = warm_up(s.engine(model_dir, blocks, speculate=True), ar_jobs)
            modes.append(engine_mode("spec", f"APAR + {s.speculate.method} speculation", spec, apar_jobs))
        return modes

    runs = two_pools(make_modes, ar_jobs + apar_jobs, s, "trace")
    settings = {"model": str(model_dir), "answers": len(apar_jobs), "max_answer_tokens": max_answer_tokens,
                "seed": seed, **s.describe()}
    return Report("trace", settings, runs)


# ---- live -------------------------------------------------------------------------------------------
def _need_model(path: Path, how: str) -> None:
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no model there; build it with `{how}` (a few minutes on 2 CPU cores)")


def run_live(apar_dir: Path, ar_dir: Path, s: SuiteSettings, prompts: int = 32, max_tokens: int = 200,
             temperature: float = 0.0, seed: int = 0) -> Report:
    from transformers import AutoTokenizer

    from apar.data.pipeline import load_records
    from apar.data.alpaca_split import data_dir
    from apar.train.evaluate import held_out_prompts
    from apar.text.prompt import encode_prompt

    _need_model(apar_dir, f"apar demo-model --preset quick --out {apar_dir}")
    _need_model(ar_dir, f"apar demo-model --preset quick --ar --out {ar_dir}")
    texts = [p for p, _ in held_out_prompts(load_records(data_dir(s.data)))][:prompts]
    sides = (("ar", "AR twin", ar_dir), ("apar", "APAR", apar_dir))
    if s.speculate.enabled:
        sides += (("spec", f"APAR + {s.speculate.method} speculation", apar_dir),)
    jobs: dict[str, list[Job]] = {}
    for name, _, path in sides:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                auto_parallel=name != "ar")
        jobs[name] = [Job(encode_prompt(tokenizer, t), params) for t in texts]

    def make_modes(blocks: int) -> list[Mode]:
        return [engine_mode(name, label, warm_up(s.engine(path, blocks, name == "spec"), jobs[name]), jobs[name])
                for name, label, path in sides]

    runs = two_pools(make_modes, jobs["ar"] + jobs["apar"], s, "live")
    settings = {"apar": str(apar_dir), "ar": str(ar_dir), "prompts": len(texts), "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed, **s.describe()}
    return Report("live", settings, runs)


# ---- hf ---------------------------------------------------------------------------------------------
def fixed_jobs(vocab: int, count: int, prompt_tokens: int, new_tokens: int, seed: int) -> list[Job]:
    """Random equal-length prompts (no padding for HF), exactly `new_tokens` each, AR mode."""
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=new_tokens, auto_parallel=False, ignore_eos=True)
    return [Job([rng.randrange(300, vocab) for _ in range(prompt_tokens)], params) for _ in range(count)]


def hf_mode(model, jobs: list[Job], block_size: int) -> Mode:
    """HF `generate` (greedy, no early stop): each level runs its jobs in batches of `concurrency`."""
    device = next(model.parameters()).device
    ids = torch.tensor([jobs[0].prompt], device=device)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)  # warm up

    def run(level_jobs: list[Job], concurrency: int, progress: Progress | None) -> LevelStats:
        stats = LevelStats(concurrency)
        for i in range(0, len(level_jobs), concurrency):
            _hf_batch(model, level_jobs[i : i + concurrency], block_size, stats)
            if progress is not None:
                progress.update(len(level_jobs[i : i + concurrency]))
        return stats

    return Mode("hf", "HF generate", jobs, run)


class _FirstToken:
    """A `generate` streamer that notes when the first new tokens arrive (its first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


@torch.inference_mode()
def _hf_batch(model, jobs: list[Job], block_size: int, stats: LevelStats) -> None:
    device = next(model.parameters()).device
    ids = torch.tensor([j.prompt for j in jobs], device=device)  # [B, P]
    n = jobs[0].params.max_tokens
    first = _FirstToken()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, streamer=first, pad_token_id=model.generation_config.pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    b, p, made = len(jobs), ids.shape[1], out.shape[1] - ids.shape[1]
    stats.requests += b
    stats.tokens += b * made
    stats.steps += made
    stats.request_steps += b * made
    stats.running_steps += b * made
    stats.wall_s += end - start
    blocks = [b * -(-(p + k) // block_size) for k in range(1, made + 1)]  # its contiguous cache, in blocks
    stats.kv_block_steps += sum(blocks)
    stats.peak_kv_blocks = max(stats.peak_kv_blocks, blocks[-1] if blocks else 0)
    stats.attended_tokens += b * (p + made - 1) * (p + made) // 2  # prompt and every fed token
    stats.latencies.extend([end - start] * b)
    stats.ttfts.extend([(first.at or end) - start] * b)


def run_hf(model_dir: str | Path, s: SuiteSettings, prompt_tokens: int = 64, new_tokens: int = 128,
           seed: int = 0) -> Report:
    from transformers import AutoModelForCausalLM

    top = max(s.plan.levels + (s.plan.max_concurrency,))
    engine = s.engine(model_dir, top * (-(-(prompt_tokens + new_tokens) // s.block_size) + 2) + 1)
    r = engine.runner
    jobs = fixed_jobs(r.vocab_size, max(s.plan.requests(top), 2), prompt_tokens, new_tokens, seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=r.dtype).to(r.device).eval()
    modes = [hf_mode(model, jobs, s.block_size), engine_mode("ar", "engine AR", warm_up(engine, jobs), jobs)]
    runs = [Run("unlimited", engine.ledger.num_blocks, "hf", "ar", run_levels(modes, s.plan, "hf", s.progress))]
    settings = {"model": str(model_dir), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "seed": seed,
                "device": str(r.device), "dtype": str(r.dtype).removeprefix("torch."), **s.describe()}
    return Report("hf", settings, runs)
