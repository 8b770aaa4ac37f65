"""`apar bench`: the benchmark suite. `engine` and `serve` live here; trace, live, hf and gpu in
`apar.bench_suite`."""
from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (not tests): print APAR beside the AR baseline")
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    e = sub.add_parser("engine", help="the decode engine on replayed answer trees and against HF generate")
    e.add_argument("--model", default=None, help="model directory (default: build a random-weight one)")
    e.add_argument("--requests", type=int, default=16, help="answers replayed concurrently")
    e.add_argument("--max-answer-tokens", type=int, default=400)
    e.add_argument("--batch", type=int, default=8, help="HF comparison: prompts per batch")
    e.add_argument("--prompt-tokens", type=int, default=64, help="HF comparison: tokens per prompt")
    e.add_argument("--new-tokens", type=int, default=128, help="HF comparison: tokens generated per prompt")
    e.add_argument("--hidden", type=int, default=256, help="random model width")
    e.add_argument("--layers", type=int, default=4, help="random model depth")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--repeats", type=int, default=3, help="runs of each measure, alternating; the fastest counts")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on a CPU run)")
    add_data_arg(e)
    from apar.commands.generate import add_engine_args

    add_engine_args(e)
    _quick_and_out(e, {"requests": 8, "repeats": 1, "batch": 4, "new_tokens": 32})
    e.set_defaults(func=run_engine_bench)

    s = sub.add_parser("serve", help="per-token latency of apar serve beside the separated services")
    s.add_argument("--model", default=None, help="model directory (default: build a random-weight one)")
    s.add_argument("--requests", type=int, default=10, help="requests per round and setup")
    s.add_argument("--rounds", type=int, default=5, help="rounds, alternating the two setups")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--hidden", type=int, default=256)
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis for the KV manager's ledger "
                                                                      "('' keeps it in the manager's memory)")
    add_data_arg(s)
    _quick_and_out(s, {"requests": 4, "rounds": 2, "max_tokens": 32})
    s.set_defaults(func=run_serve_bench)

    from apar.bench_suite.chaos import register as register_chaos
    from apar.bench_suite.cli import register as register_suite
    from apar.bench_suite.kv_outage import register as register_kv_outage
    from apar.bench_suite.kvmanager import register as register_kvmanager
    from apar.bench_suite.prefix import register as register_prefix
    from apar.bench_suite.rows import register as register_rows
    from apar.bench_suite.served import register as register_served

    register_suite(sub)
    register_kvmanager(sub)
    register_prefix(sub)
    register_rows(sub)
    register_served(sub)
    register_chaos(sub)
    register_kv_outage(sub)


def add_data_arg(p) -> None:
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="AlpacaEval folder: test-split answers or prompts, the random model's tokenizer "
                        "(default: $APAR_DATA, else the repository's data/alpaca_eval)")


def _quick_and_out(p, quick: dict[str, int]) -> None:
    """--quick (these values for the flags left at their defaults) and --out (a JSON of the results)."""
    p.add_argument("--quick", action="store_true", help="fewer requests and rounds: a quick look")
    p.add_argument("--out", type=Path, default=None, help="also write <bench>.json into this folder")
    p.set_defaults(quick_values={k: (p.get_default(k), v) for k, v in quick.items()})


def _apply_quick(args) -> None:
    if args.quick:
        for key, (default, quick) in args.quick_values.items():
            if getattr(args, key) == default:
                setattr(args, key, quick)


def _write(args, name: str, data: dict) -> None:
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out / f'{name}.json'}")


def _model(args) -> Path:
    from apar.modelgen import ModelShape, make_model
    from apar.quiet import quiet_transformers

    quiet_transformers()
    if args.model:
        return Path(args.model)
    model_dir = Path(tempfile.mkdtemp(prefix="apar-bench-"))
    shape = ModelShape(hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 32),
                       kv_heads=max(1, args.hidden // 64), intermediate=args.hidden * 3, max_positions=4096,
                       vocab=4096)
    make_model(model_dir, "llama", shape, seed=getattr(args, "seed", 0), data=getattr(args, "data", None))
    print(f"random-weight llama: width {args.hidden}, {args.layers} layers, at {model_dir}")
    return model_dir


def run_serve_bench(args) -> int:
    from apar.bench import text_table
    from apar.bench_serve import run

    _apply_quick(args)
    model_dir = _model(args)
    rows = run(str(model_dir), args.requests, args.max_tokens, ["--kv-blocks", "1024"], args.redis or None,
               args.rounds)
    print(f"{args.rounds} rounds x {args.requests} sequential requests per setup, alternating; {args.max_tokens} "
          f"tokens each, greedy, client on loopback")
    print(text_table(["setup", "TTFT p50 ms", "per-token p50 ms", "per-token p99 ms"], [r.row() for r in rows]))
    base, split = (sorted(r.per_token)[len(r.per_token) // 2] for r in rows)
    print(f"cost of the split: {100 * (split / base - 1):+.1f}% per-token latency (p50)")
    _write(args, "serve", {"requests": args.requests, "rounds": args.rounds, "max_tokens": args.max_tokens,
                           "setups": [asdict(r) for r in rows], "per_token_p50_ratio": split / base})
    return 0


def run_engine_bench(args) -> int:
    import torch

    from apar.bench import answer_trees, fastest, run_engine_ar, run_hf_generate, run_replay, table
    from apar.bench_suite.cli import cpu_threads
    from apar.commands.generate import engine_config
    from apar.engine.engine import Engine

    _apply_quick(args)
    cpu_threads(args.threads, args.device)
    torch.manual_seed(args.seed)
    model_dir = _model(args)
    engine = Engine(model_dir, engine_config(args))
    r = engine.runner
    print(f"device {r.device}, dtype {str(r.dtype).removeprefix('torch.')}, {r.num_blocks} KV blocks of "
          f"{engine.config.block_size} tokens, {torch.get_num_threads()} CPU threads")

    items = answer_trees(engine, args.requests, args.max_answer_tokens, args.seed, args.data)
    threads = sum(t.threads() for _, t, _ in items)
    print(f"\n1) {len(items)} test-split answers replayed concurrently ({threads} threads in all)")
    from apar.engine.replay import ReplayNode

    run_replay(engine, "warm-up", [(p, t) for p, t, _ in items[:2]], True)
    apar_runs, ar_runs = [], []
    for _ in range(max(1, args.repeats)):
        apar_runs.append(run_replay(engine, "APAR", [(p, t) for p, t, _ in items], True))
        ar_runs.append(run_replay(engine, "AR", [(p, ReplayNode(lin)) for p, _, lin in items], False))
    apar, ar = fastest(apar_runs), fastest(ar_runs)
    print(table([ar, apar], [("gen tokens", "tokens"), ("engine steps", "engine_steps"),
                             ("steps/request", "steps_mean"), ("wall s", "wall_s"), ("tokens/s", "tok_s"),
                             ("peak KV blocks", "peak_blocks"), ("attended KV tokens", "attended")]))
    print(f"AR/APAR: steps per request {ar.steps_mean / apar.steps_mean:.2f}x, engine steps "
          f"{ar.engine_steps / apar.engine_steps:.2f}x, wall {ar.wall_s / apar.wall_s:.2f}x, peak KV blocks "
          f"{ar.peak_blocks / apar.peak_blocks:.2f}x, attended tokens {ar.attended / apar.attended:.2f}x")

    rng = random.Random(args.seed)
    prompts = [[rng.randrange(300, len(engine.tokenizer)) for _ in range(args.prompt_tokens)]
               for _ in range(args.batch)]
    print(f"\n2) AR throughput: batch {args.batch}, {args.prompt_tokens}-token prompts, {args.new_tokens} "
          f"new tokens each, greedy")
    run_engine_ar(engine, prompts[:2], 4)  # warm up
    ours_runs, hf_runs = [], []
    for _ in range(max(1, args.repeats)):
        ours_runs.append(run_engine_ar(engine, prompts, args.new_tokens))
        hf_runs.append(run_hf_generate(model_dir, prompts, args.new_tokens, r.device, r.dtype))
    ours, hf = fastest(ours_runs), fastest(hf_runs)
    print(table([hf, ours], [("gen tokens", "tokens"), ("wall s", "wall_s"), ("tokens/s", "tok_s")]))
    print(f"engine / HF generate throughput: {ours.tok_s / hf.tok_s:.2f}x")
    _write(args, "engine", {"replay": {"ar": asdict(ar), "apar": asdict(apar)},
                            "hf": {"hf": asdict(hf), "engine_ar": asdict(ours)}})
    return 0
