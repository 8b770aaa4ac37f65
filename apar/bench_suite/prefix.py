"""`apar bench prefix`: requests sharing a long system prompt, the prefix cache on beside off.

    apar bench prefix [--requests 48] [--concurrency 16] [--system-tokens 1000] [--json]

Every request is the same system prompt (the first `--system-tokens` tokens of the AlpacaEval data's
train-split answers, run together) followed by a test-split instruction of its own, and samples
`--max-tokens` tokens greedily, EOS ignored. The same jobs run twice on the same model, each time on a
fresh engine (an empty cache), as one closed loop of `--concurrency` requests in flight
(`driver.run_level`): with the prefix cache on, then with it off (`--no-prefix-cache`'s engine). Per
side: the prompt tokens prefilled (computed) and served from the cache (`usage.cached_tokens`), the p50
time to first token (from submission, queueing included) and the total time; then the ratios. The pool
holds every request in flight without a preemption on either side.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from apar.engine.errors import UserError


@dataclass(frozen=True, slots=True)
class PrefixBenchConfig:
    requests: int = 48
    concurrency: int = 16
    system_tokens: int = 1000
    max_tokens: int = 16
    block_size: int = 16
    max_batch_tokens: int = 512
    device: str | None = None
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if min(self.requests, self.concurrency, self.system_tokens, self.max_tokens) < 1:
            raise UserError("--requests, --concurrency, --system-tokens and --max-tokens must be 1 or more")


@dataclass(frozen=True, slots=True)
class Side:
    """One side's sums over its requests."""

    name: str  # "cache on", "cache off"
    requests: int
    prompt_tokens: int
    cached_tokens: int
    ttft_p50_s: float
    wall_s: float

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def as_dict(self) -> dict:
        return {**asdict(self), "prefilled_tokens": self.prefilled_tokens}


def register(sub) -> None:
    from apar.commands.bench import add_data_arg

    p = sub.add_parser("prefix", help="requests sharing a 1,000-token system prompt: the prefix cache on "
                                      "beside --no-prefix-cache (prefilled tokens, time to first token)")
    p.add_argument("--model", default=None, help="model directory (default: build a random-weight Llama)")
    p.add_argument("--hidden", type=int, default=256, help="random model width")
    p.add_argument("--layers", type=int, default=4, help="random model depth")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--system-tokens", type=int, default=1000, help="length of the shared system prompt")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens sampled per request")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on a CPU run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_data_arg(p)
    p.set_defaults(func=run_prefix_bench)


def prompts(tokenizer, system_tokens: int, count: int, data=None) -> tuple[list[int], list[list[int]]]:
    """The shared system prompt's ids and `count` prompts: it, then a distinct test-split instruction."""
    from apar.data.readers import read_conversations
    from apar.data.alpaca_split import data_dir, is_test_instruction

    convs = read_conversations(data_dir(data))
    system: list[int] = []
    for conv in convs:
        if not is_test_instruction(conv.prompt):
            system += tokenizer.encode(conv.response + "\n\n", add_special_tokens=False)
            if len(system) >= system_tokens:
                break
    if len(system) < system_tokens:
        raise UserError(f"the data's train-split answers hold only {len(system)} tokens")
    system = system[:system_tokens]
    questions = list(dict.fromkeys(c.prompt for c in convs if is_test_instruction(c.prompt)))
    if len(questions) < count:
        raise UserError(f"the data holds {len(questions)} test-split instructions, fewer than {count} requests")
    return system, [system + tokenizer.encode("\n" + q, add_special_tokens=False) for q in questions[:count]]


def measure(model_dir, cfg: PrefixBenchConfig, data=None) -> dict:
    """Both sides on fresh engines, the cache on first; the figures and the ratios (off over on)."""
    from transformers import AutoTokenizer

    from apar.bench_suite.driver import Job, run_level
    from apar.bench_suite.workloads import warm_up
    from apar.engine.config import EngineConfig
    from apar.engine.engine import Engine
    from apar.engine.params import SamplingParams

    system, ids = prompts(AutoTokenizer.from_pretrained(str(model_dir)), cfg.system_tokens, cfg.requests, data)
    params = SamplingParams(max_tokens=cfg.max_tokens, auto_parallel=False, ignore_eos=True)
    jobs = [Job(p, params) for p in ids]
    # every request in flight in blocks of its own: no preemption with the cache off
    blocks = cfg.concurrency * (-(-(max(map(len, ids)) + cfg.max_tokens) // cfg.block_size) + 2)
    sides = []
    for name, cache in (("cache on", True), ("cache off", False)):
        engine = Engine(model_dir, EngineConfig(block_size=cfg.block_size, num_blocks=blocks,
                                                max_batch_tokens=cfg.max_batch_tokens, device=cfg.device,
                                                dtype=cfg.dtype, prefix_cache=cache))
        warm_up(engine, [Job(ids[0][len(system):], params)])  # the instruction alone: nothing the jobs reuse
        stats = run_level(engine, jobs, cfg.concurrency)
        if stats.errors or stats.requests != len(jobs):
            raise RuntimeError(f"{name}: {stats.errors} of {len(jobs)} requests failed")
        sides.append(Side(name, stats.requests, stats.prompt_tokens, stats.cached_tokens,
                          stats.summary()["ttft_p50_s"], stats.wall_s))
    on, off = sides
    return {"config": asdict(cfg), "kv_blocks": blocks, "on": on.as_dict(), "off": off.as_dict(),
            "prefilled_ratio": on.prefilled_tokens / off.prefilled_tokens,
            "ttft_p50_speedup": off.ttft_p50_s / on.ttft_p50_s if on.ttft_p50_s else 0.0,
            "wall_speedup": off.wall_s / on.wall_s if on.wall_s else 0.0}


def table(r: dict) -> str:
    from apar.bench import text_table

    rows = [[s["name"], str(s["prefilled_tokens"]), str(s["cached_tokens"]), f"{1e3 * s['ttft_p50_s']:.1f}",
             f"{s['wall_s']:.2f}"] for s in (r["on"], r["off"])]
    c = r["config"]
    return "\n".join([
        f"{c['requests']} requests at concurrency {c['concurrency']}, each a {c['system_tokens']}-token system "
        f"prompt and its own instruction, {c['max_tokens']} tokens each, greedy",
        text_table(["", "prefilled tokens", "cached tokens", "TTFT p50 ms", "total s"], rows),
        f"with the cache: {r['prefilled_ratio']:.3f} of the prefilled tokens, TTFT p50 {r['ttft_p50_speedup']:.2f}x "
        f"better, total time {r['wall_speedup']:.2f}x better"])


def run_prefix_bench(args) -> int:
    import shutil
    import sys
    from contextlib import redirect_stdout

    from apar.bench_suite.cli import cpu_threads
    from apar.commands.bench import _model

    cfg = PrefixBenchConfig(args.requests, args.concurrency, args.system_tokens, args.max_tokens, args.block_size,
                            args.max_batch_tokens, args.device, args.dtype)
    cpu_threads(args.threads, args.device)
    with redirect_stdout(sys.stderr):  # its note on the model built, off the JSON
        model_dir = _model(args)
    try:
        result = measure(model_dir, cfg, args.data)
    finally:
        if args.model is None:
            shutil.rmtree(model_dir, ignore_errors=True)
    print(json.dumps(result) if args.json else table(result))
    return 0
