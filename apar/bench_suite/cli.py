"""`apar bench trace|live|hf|gpu|attention|overhead|gpu-check`: the parsers, and the commands that run a
workload and report it."""
from __future__ import annotations

import argparse
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from apar.engine.config import ATTENTION_CHOICES
from apar.engine.errors import UserError


@dataclass(frozen=True, slots=True)
class Defaults:
    """A workload's defaults, full and --quick: an explicit flag always wins."""

    levels: str
    max_concurrency: int
    rounds: int
    min_requests: int


_TRACE = {False: Defaults("1,4,16,64", 256, 2, 8), True: Defaults("1,4,16", 16, 3, 6)}
_LIVE = {False: Defaults("1,4,16,64", 128, 2, 8), True: Defaults("1,4,16", 16, 1, 4)}
_HF = {False: Defaults("1,4,16,64", 128, 2, 2), True: Defaults("1,4,16", 16, 2, 2)}


def register(sub) -> None:
    t = sub.add_parser("trace", help="replayed test-split answers, AR beside APAR, closed loop at rising "
                                     "concurrency, pool unlimited then limited")
    _random_model_args(t)
    t.add_argument("--answers", type=int, default=None,
                   help="distinct answers, reused in turn (default 64; quick 16)")
    t.add_argument("--max-answer-tokens", type=int, default=None,
                   help="longest answer replayed (default 400; quick 300)")
    _suite_args(t)
    t.set_defaults(func=run_trace_cmd)

    lv = sub.add_parser("live", help="the demo model sampling beside its AR twin on test-split prompts")
    lv.add_argument("--apar", type=Path, default=Path("models/demo"), help="APAR model (apar demo-model)")
    lv.add_argument("--ar", type=Path, default=Path("models/demo-ar"), help="AR twin (apar demo-model --ar)")
    lv.add_argument("--prompts", type=int, default=None,
                    help="test-split prompts, reused in turn (default 32; quick 8)")
    lv.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 200; quick 100)")
    lv.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    _data_arg(lv)
    _suite_args(lv)
    lv.set_defaults(func=run_live_cmd)

    h = sub.add_parser("hf", help="HF generate beside the engine in AR mode, concurrency levels as batch sizes")
    _random_model_args(h)
    h.add_argument("--prompt-tokens", type=int, default=64)
    h.add_argument("--new-tokens", type=int, default=None, help="tokens per answer (default 128; quick 64)")
    _suite_args(h)
    h.set_defaults(func=run_hf_cmd)

    g = sub.add_parser("gpu", help="one GPU, a random Vicuna-7B-shaped Llama: trace AR beside APAR and HF "
                                   "generate at concurrency 1, 16, 64 (under 8 minutes on an H100)")
    g.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for gpu.json and gpu.png")
    g.add_argument("--levels", default="1,16,64", help="concurrency levels (batch sizes for HF)")
    g.add_argument("--model-cache", type=Path, default=None, help="where the random model is saved and "
                                                                   "reused (default: under the temp dir)")
    g.add_argument("--answers", type=int, default=64)
    g.add_argument("--max-answer-tokens", type=int, default=400)
    g.add_argument("--new-tokens", type=int, default=128, help="HF comparison: tokens per answer")
    g.add_argument("--budget-s", type=float, default=360.0, help="no trace level starts after this")
    g.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES, help="the engine's decode attention")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the engine's decoder layers (default: the engine's, on)")
    g.add_argument("--no-progress", action="store_true")
    _data_arg(g)
    g.add_argument("--tiny-cpu", action="store_true", help=argparse.SUPPRESS)  # the same path, tiny, on CPU
    g.set_defaults(func=run_gpu_cmd)


    a = sub.add_parser("attention", help="one layer's decode attention, every backend, beside the memory floor "
                                         "with the shared prefix read once")
    a.add_argument("--threads", type=int, default=16, help="threads decoding (default 16)")
    a.add_argument("--context", type=int, default=1024, help="positions in each thread's context (default 1024)")
    a.add_argument("--shared", type=int, default=768, help="of which a prefix all threads share (default 768)")
    a.add_argument("--heads", type=int, default=32, help="query heads (default 32: the 7B shape)")
    a.add_argument("--kv-heads", type=int, default=None, help="KV heads (default: --heads)")
    a.add_argument("--head-dim", type=int, default=128)
    a.add_argument("--layers", type=int, default=32, help="layers per step, for the per-step column")
    a.add_argument("--block-size", type=int, default=16)
    a.add_argument("--backends", default=None, help="comma-separated (default: every backend; on the CPU "
                                                     "not triton, whose kernels are interpreted there)")
    a.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    a.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    a.add_argument("--threads-cpu", type=int, default=None, help="torch CPU threads (default 1 on a CPU run)")
    a.add_argument("--json", action="store_true", help='print {"backends": {NAME: {"ms": ...}}, "floor_ms": ...}')
    a.set_defaults(func=run_attention_cmd)

    o = sub.add_parser("overhead", help="the engine's time per step outside the model forward, at batch 16 and 64")
    o.add_argument("--model", type=Path, default=None, help="model directory (default: a tiny random Llama)")
    o.add_argument("--steps", type=int, default=60)
    o.add_argument("--repeats", type=int, default=3, help="runs of each batch; the least overhead counts")
    o.add_argument("--batches", default="ar16,ar64,apar64")
    o.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES)
    o.add_argument("--device", default=None)
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=run_overhead_cmd)

    c = sub.add_parser("gpu-check", help="one GPU, under 8 minutes: golden test in bf16 for every backend, "
                                         "attention at 64 x 2,048, engine AR vs HF generate, trace replay")
    c.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for gpu-check.json")
    c.add_argument("--model-cache", type=Path, default=None, help="where the random 7B-shaped model is saved "
                                                                   "and reused (default: under the temp dir)")
    c.add_argument("--budget-s", type=float, default=420.0, help="parts that would start after this are skipped")
    c.add_argument("--skip", default="", help="comma-separated parts to skip: golden,attention,engine")
    c.add_argument("--attention", default="", help="the engine part's decode attention, comma-separated: it runs "
                                                    "once with each (default: triton,flex; golden and attention "
                                                    "run every backend); NAME+nocompile: with the decoder layers "
                                                    "left eager (--no-compile; compiled is the default)")
    c.add_argument("--golden", default="", help="the golden part's backends, comma-separated, each maybe "
                                                "with +nocompile (default: every backend this device runs "
                                                "natively)")
    c.add_argument("--no-progress", action="store_true")
    _data_arg(c)
    c.add_argument("--tiny-cpu", action="store_true", help="the same path, tiny shapes, on the CPU (a dry run)")
    c.set_defaults(func=run_gpu_check_cmd)


def _random_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: build a random-weight Llama)")
    p.add_argument("--hidden", type=int, default=None, help="random model width (default 256; quick 64)")
    p.add_argument("--layers", type=int, default=None, help="random model depth (default 4; quick 2)")
    _data_arg(p)


def _data_arg(p: argparse.ArgumentParser) -> None:
    from apar.commands.bench import add_data_arg

    add_data_arg(p)


def _suite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer levels and requests, a smaller model: a "
                                                        "couple of minutes on 2 CPU cores")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for <workload>.json and .png")
    p.add_argument("--kv-blocks", type=int, default=None, help="the limited pool (default: --pool-fraction of "
                                                               "AR's peak with the pool unlimited, top level)")
    p.add_argument("--pool-fraction", type=float, default=0.4)
    p.add_argument("--levels", default=None, help="concurrency levels always run (default 1,4,16,64; quick 1,4,16)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="past the levels, double while tokens/s still grows, up to this")
    p.add_argument("--rounds", type=int, default=None, help="requests per level: rounds x concurrency")
    p.add_argument("--min-requests", type=int, default=None, help="requests per level at least")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on a CPU run)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--admit-watermark", type=float, default=0.04, help="share of the pool kept free on admission")
    p.add_argument("--fork-watermark", type=float, default=0.01, help="share of the pool below which forks are "
                   "refused")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--rows-kernel", action=argparse.BooleanOptionalAction, default=True,
                   help="the engines' CPU products of a few rows through the project's kernel (default on)")
    p.add_argument("--fork-token", default="[Fork]", help="'[SplitMask]' for the published APAR checkpoints")
    p.add_argument("--child-token", default="[Child]", help="'[SplitSop]' for the published APAR checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    from apar.engine.config import DRAFT_POLICIES, SPECULATE_CHOICES

    p.add_argument("--speculate", default="off", choices=SPECULATE_CHOICES,
                   help="also run APAR with this speculation inside its threads, beside plain APAR and AR in the "
                        "same run (trace: the replayed threads draft, checked against their known tokens)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="with --speculate: tokens drafted per "
                                                                          "thread and step")
    p.add_argument("--draft-policy", default="pays", choices=DRAFT_POLICIES,
                   help="with --speculate: pays, the drafted tokens that raise a step's expected tokens per "
                        "second; all, every drafted token (as apar serve's flag)")


def levels_arg(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--levels takes comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1 or list(levels) != sorted(set(levels)):
        raise UserError(f"--levels must be rising positive integers, got {text!r}")
    return levels


def settings(args, table: dict[bool, Defaults]):
    from apar.bench_suite.driver import LevelPlan
    from apar.bench_suite.workloads import SuiteSettings
    from apar.engine.config import ControlTokens, SpeculativeConfig

    d = table[args.quick]
    plan = LevelPlan(levels_arg(_pick(args.levels, d.levels)), _pick(args.max_concurrency, d.max_concurrency),
                     _pick(args.rounds, d.rounds), _pick(args.min_requests, d.min_requests))
    if plan.rounds < 1 or plan.min_requests < 1:
        raise UserError("--rounds and --min-requests must be >= 1")
    if args.kv_blocks is not None and args.kv_blocks < 1:
        raise UserError("--kv-blocks must be >= 1")
    if not 0 < args.pool_fraction <= 1:
        raise UserError("--pool-fraction must be in (0, 1]")
    cpu_threads(args.threads, args.device)
    return SuiteSettings(plan, kv_blocks=args.kv_blocks, pool_fraction=args.pool_fraction,
                         block_size=args.block_size, max_batch_tokens=args.max_batch_tokens,
                         admit_watermark=args.admit_watermark, fork_watermark=args.fork_watermark, device=args.device,
                         dtype=args.dtype, rows_kernel=args.rows_kernel,
                         control=ControlTokens(args.fork_token, args.child_token), progress=not args.no_progress,
                         data=args.data, speculate=SpeculativeConfig(args.speculate, args.num_speculative_tokens,
                                                                     policy=args.draft_policy))


def cpu_threads(threads: int | None, device: str | None) -> None:
    """Torch's CPU threads: as asked, else 1 on a CPU run. The small models here gain nothing from more,
    and on 2 shared cores 2 threads made steps 3-5x slower (threads spinning against each other)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif device == "cpu" or (device is None and not torch.cuda.is_available()):
        torch.set_num_threads(1)


def _pick(value, default):
    return default if value is None else value


@contextmanager
def _model_dir(args, quick_hidden: int = 64, quick_layers: int = 2):
    """The model directory: --model, or a random-weight one built now and removed afterwards."""
    from apar.commands.bench import _model

    args.hidden = args.hidden or (quick_hidden if args.quick else 256)
    args.layers = args.layers or (quick_layers if args.quick else 4)
    model_dir = _model(args)
    try:
        yield model_dir
    finally:
        if args.model is None:
            shutil.rmtree(model_dir, ignore_errors=True)


def _finish(report, out: Path) -> int:
    json_path, png_path = report.write(out)
    print(report.text())
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def run_trace_cmd(args) -> int:
    from apar.bench_suite.workloads import run_trace

    s = settings(args, _TRACE)
    with _model_dir(args) as model_dir:
        report = run_trace(model_dir, s, answers=args.answers or (16 if args.quick else 64),
                           max_answer_tokens=args.max_answer_tokens or (300 if args.quick else 400), seed=args.seed)
    return _finish(report, args.out)


def run_live_cmd(args) -> int:
    from apar.bench_suite.workloads import run_live

    s = settings(args, _LIVE)
    report = run_live(args.apar, args.ar, s, prompts=args.prompts or (8 if args.quick else 32),
                      max_tokens=args.max_tokens or (100 if args.quick else 200), temperature=args.temperature,
                      seed=args.seed)
    return _finish(report, args.out)


def run_hf_cmd(args) -> int:
    from apar.bench_suite.workloads import run_hf

    s = settings(args, _HF)
    with _model_dir(args) as model_dir:
        report = run_hf(model_dir, s, prompt_tokens=args.prompt_tokens,
                        new_tokens=args.new_tokens or (64 if args.quick else 128), seed=args.seed)
    return _finish(report, args.out)


def run_gpu_cmd(args) -> int:
    from apar.bench_suite.gpu import GpuSettings, check_cuda, gpu_table, run_gpu

    if not args.tiny_cpu:
        check_cuda()  # before building anything
    else:
        cpu_threads(None, "cpu")
    g = GpuSettings(levels=levels_arg(args.levels), model_cache=args.model_cache, answers=args.answers,
                    max_answer_tokens=args.max_answer_tokens, new_tokens=args.new_tokens, budget_s=args.budget_s,
                    tiny=args.tiny_cpu, attention=args.attention, compile=args.compile, progress=not args.no_progress,
                    data=args.data)
    report = run_gpu(g)
    json_path, png_path = report.write(args.out)
    print(f"{report.settings['device']}, {report.settings['shape']} random weights ({report.settings['dtype']}), "
          f"{report.settings['kv_blocks']} KV blocks; {report.settings['wall_s']:.0f} s in all", file=sys.stdout)
    print(gpu_table(report))
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def run_attention_cmd(args) -> int:
    import json

    from apar.bench_suite.attention import AttentionShape, attention_table, run_attention_bench
    from apar.engine.model_runner import pick_device, pick_dtype

    device = pick_device(args.device)
    cpu_threads(args.threads_cpu, device.type)
    shape = AttentionShape(threads=args.threads, context=args.context, shared=args.shared, heads=args.heads,
                           kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                           block_size=args.block_size, layers=args.layers)
    from apar.engine.backends import BACKENDS, native

    names = native(device) if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise UserError(f"--backends takes some of {', '.join(BACKENDS)}, got {args.backends!r}")
    result = run_attention_bench(shape, device, pick_dtype(args.dtype, device), names)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['device']} ({result['dtype']}, {result['torch_threads']} CPU threads): {shape.threads} threads x "
          f"{shape.context} positions, {shape.shared} shared; {shape.heads} heads ({shape.kv_heads} KV) x "
          f"{shape.head_dim}; floor: {result['floor_bytes'] / 2**20:.1f} MiB at {result['copy_gb_s']:.1f} GB/s")
    print(attention_table(result))
    ok = {n: r for n, r in result["backends"].items() if "ms" in r}
    if "portable" in ok:
        for name, r in ok.items():
            if name != "portable":
                print(f"{name}: {ok['portable']['ms'] / r['ms']:.2f}x faster than portable")
    return 0


def run_overhead_cmd(args) -> int:
    import json
    import shutil
    import tempfile

    from apar.bench import text_table
    from apar.bench_suite.overhead import run
    from apar.modelgen import ModelShape, make_model
    from apar.quiet import quiet_transformers

    quiet_transformers()
    cpu_threads(None, args.device)
    model_dir, made = args.model, None
    if model_dir is None:
        made = model_dir = Path(tempfile.mkdtemp(prefix="apar-overhead-"))
        make_model(model_dir, "llama", ModelShape(max_positions=4096))
    try:
        config = {"attention": args.attention, "device": args.device}
        rows = run(model_dir, [b.strip() for b in args.batches.split(",")], args.steps, args.repeats, **config)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    if args.json:
        print(json.dumps({"attention": args.attention, "batches": [r.as_dict() for r in rows]}))
        return 0
    print(f"{args.attention} attention, {args.steps} steps per run, best of {args.repeats}")
    print(text_table(["batch", "threads", "step ms", "forward ms", "outside ms"],
                     [[r.batch, str(r.threads), f"{r.step_ms:.2f}", f"{r.forward_ms:.2f}", f"{r.outside_ms:.2f}"]
                      for r in rows]))
    return 0


def run_gpu_check_cmd(args) -> int:
    from apar.bench_suite.gpu_check import CheckSettings, run_gpu_check

    if args.tiny_cpu:
        cpu_threads(None, "cpu")
    s = CheckSettings(out=args.out, model_cache=args.model_cache, budget_s=args.budget_s, tiny=args.tiny_cpu,
                      skip=frozenset(x.strip() for x in args.skip.split(",") if x.strip()),
                      progress=not args.no_progress, data=args.data, attention=args.attention,
                      golden=args.golden)
    return run_gpu_check(s)
