"""`apar bench served`: an APAR model beside its AR twin, each behind its own `apar serve`, on test-split
prompts, closed loop at each concurrency level.

Data flow: the test split's prompts (never trained on) -> two `apar serve` processes (the APAR model,
auto-parallel on; its twin, every request `auto_regressive`) -> per level C, C client threads each send
the next prompt as soon as their answer ends (gRPC Generate, streamed, greedy) -> per request: latency
(send to final message) and the answer's tokens (its text tokenized again, so control tokens never
count) -> per level: answer tokens / wall time and the median latency, and their APAR/AR ratios.
The two servers alternate level by level, so drift on the machine falls on both alike.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from apar.engine.errors import UserError


@dataclass(frozen=True, slots=True)
class Answered:
    prompt: str
    text: str
    seconds: float
    threads: int
    steps: int
    finish_reason: str


@dataclass(frozen=True, slots=True)
class Level:
    model: str
    concurrency: int
    requests: int
    wall_s: float
    answer_tokens: int
    tokens_per_s: float
    p50_s: float
    steps_mean: float
    threads_mean: float
    eos_share: float
    max_s: float = 0.0  # the longest answer's latency
    preemptions: int = 0  # the server's requests preempted under KV pressure during the level
    recomputed_tokens: int = 0  # and the tokens it computed again for them


def ask(stub, pb, prompt: str, max_tokens: int, ar: bool) -> Answered:
    A = pb.apar_pb2
    req = A.GenerateRequest(prompt=prompt, stream=A.STREAM_MODE_FINAL, auto_regressive=ar,
                            sampling=pb.common_pb2.SamplingParameters(max_tokens=max_tokens, temperature=0.0))
    started = time.perf_counter()
    final = None
    for resp in stub.Generate(req, timeout=600):
        if resp.WhichOneof("event") == "final":
            final = resp.final
    if final is None or final.finish_reason == "error":
        raise UserError(f"the server answered no final message: {final.error if final else ''}")
    return Answered(prompt, final.text, time.perf_counter() - started, final.usage.threads, final.usage.steps,
                    final.finish_reason)


def run_level(address: str, name: str, prompts: list[str], concurrency: int, max_tokens: int, ar: bool,
              count_tokens) -> tuple[Level, list[Answered]]:
    from apar.protogen import stubs

    pb = stubs()
    with grpc.insecure_channel(address) as channel:
        stub = pb.apar_pb2_grpc.AparStub(channel)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            answers = list(pool.map(lambda p: ask(stub, pb, p, max_tokens, ar), prompts))
        wall = time.perf_counter() - started
    tokens = sum(count_tokens(a.text) for a in answers)
    n = len(answers)
    return Level(name, concurrency, n, wall, tokens, tokens / wall, statistics.median(a.seconds for a in answers),
                 sum(a.steps for a in answers) / n, sum(a.threads for a in answers) / n,
                 sum(a.finish_reason == "stop" for a in answers) / n, max(a.seconds for a in answers)), answers


PRESSURE = {"apar_num_preemptions_total": "preemptions", "apar_recomputed_tokens_total": "recomputed_tokens"}


def pressure(metrics_port: int) -> dict[str, int]:
    """The server's preemption counters, read from its Prometheus metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = dict.fromkeys(PRESSURE.values(), 0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in PRESSURE:
                out[PRESSURE[sample.name]] += int(sample.value)
    return out


def run(apar_dir: Path, ar_dir: Path, prompts: list[str], levels: list[int], max_tokens: int,
        requests_per_level: int | None = None, serve_args: list[str] = ()) -> dict:
    """Both servers up at once; each level runs on the APAR server, then on the twin's. Each level also
    counts the server's preemptions (from its metrics): a level that ran out of KV blocks says so.

    A level sends `requests_per_level` requests (at least C; default 4 C): with only C, the level is one
    burst whose wall time is its longest answer's (an APAR answer that never forks takes all its steps at
    the pace of a batch crowded by the others' threads), not the server's pace with C in flight."""
    from transformers import AutoTokenizer

    from apar.bench_serve import _port, _Proc

    tokenizer = AutoTokenizer.from_pretrained(str(ar_dir))
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    ports = {"apar": _port(), "ar": _port()}
    metrics_ports = {"apar": _port(), "ar": _port()}
    procs = []
    levels_out, samples = [], {}
    try:
        for name, directory in (("apar", apar_dir), ("ar", ar_dir)):
            procs.append(_Proc("serve", "--model", str(directory), "--port", str(ports[name]), "--metrics-port",
                               str(metrics_ports[name]), *serve_args))
            procs[-1].wait_ready(timeout=300)
        warm = prompts[:1]
        for name in ports:
            run_level(f"127.0.0.1:{ports[name]}", name, warm, 1, 16, name == "ar", count)
        for c in levels:
            asked = [prompts[i % len(prompts)] for i in range(max(c, requests_per_level or 4 * c))]
            pair = {}
            for name in ("apar", "ar"):
                before = pressure(metrics_ports[name])
                level, answers = run_level(f"127.0.0.1:{ports[name]}", name, asked, c, max_tokens, name == "ar", count)
                after = pressure(metrics_ports[name])
                level = dataclasses.replace(level, **{k: after[k] - before[k] for k in after})
                levels_out.append(level)
                pair[name] = level
                samples.setdefault(name, [asdict(a) for a in answers[:3]])
                print(f"c={c} {name}: {level.tokens_per_s:.1f} tok/s, p50 {level.p50_s:.1f} s, "
                      f"{level.steps_mean:.0f} steps, {level.threads_mean:.2f} threads, "
                      f"{level.preemptions} preemptions", flush=True)
    finally:
        for p in reversed(procs):
            p.stop()
    ratios = []
    for c in levels:
        a = next(x for x in levels_out if x.model == "apar" and x.concurrency == c)
        b = next(x for x in levels_out if x.model == "ar" and x.concurrency == c)
        ratios.append({"concurrency": c, "tokens_per_s_ratio": a.tokens_per_s / b.tokens_per_s,
                       "p50_speedup": b.p50_s / a.p50_s})
    return {"levels": [asdict(x) for x in levels_out], "ratios": ratios, "samples": samples,
            "settings": {"apar": str(apar_dir), "ar": str(ar_dir), "max_tokens": max_tokens, "greedy": True,
                         "requests_per_level": requests_per_level, "prompts": len(prompts),
                         "serve_args": list(serve_args)}}


def register(sub) -> None:
    from apar.commands.bench import add_data_arg

    p = sub.add_parser("served", help="an APAR model beside its AR twin, each behind apar serve, test-split "
                                      "prompts, greedy, closed loop at each concurrency")
    p.add_argument("--apar", type=Path, required=True, help="APAR model directory (served with auto-parallel on)")
    p.add_argument("--ar", type=Path, required=True, help="its AR twin (every request auto-regressive)")
    p.add_argument("--levels", default="4,16", help="concurrency levels (default 4,16)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (at least C; default 4 C, so the closed loop runs at C in flight "
                        "for most of the level, not one burst timed by its longest answer)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--structured-only", action="store_true",
                   help="only prompts whose reference answers mostly fork (lists, paragraphs)")
    p.add_argument("--kv-memory-mb", type=float, default=None,
                   help="each server's KV pool (default: apar serve's); a level that preempts says so")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results here")
    add_data_arg(p)
    p.set_defaults(func=run_cmd)


def run_cmd(args) -> int:
    from apar.bench import text_table
    from apar.data.pipeline import load_records
    from apar.data.alpaca_split import data_dir
    from apar.train.evaluate import held_out_prompts

    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if not levels or min(levels) <= 0 or (args.requests is not None and args.requests <= 0) or args.max_tokens <= 0:
        raise UserError("levels, requests and max tokens must be positive")
    for directory in (args.apar, args.ar):
        if not (directory / "config.json").is_file():
            raise UserError(f"{directory}: not a model directory (no config.json)")
    prompts = held_out_prompts(load_records(data_dir(args.data)))
    if args.structured_only:
        prompts = [p for p in prompts if p[1]]
    if args.kv_memory_mb is not None and args.kv_memory_mb <= 0:
        raise UserError("--kv-memory-mb must be positive")
    serve_args = [] if args.kv_memory_mb is None else ["--kv-memory-mb", str(args.kv_memory_mb)]
    result = run(args.apar, args.ar, [p for p, _ in prompts], levels, args.max_tokens, args.requests, serve_args)
    head = ["model", "C", "requests", "tok/s", "p50 s", "max s", "steps", "threads", "EOS", "preempted",
            "recomputed"]
    body = [[x["model"], str(x["concurrency"]), str(x["requests"]), f"{x['tokens_per_s']:.1f}",
             f"{x['p50_s']:.2f}", f"{x['max_s']:.2f}", f"{x['steps_mean']:.0f}", f"{x['threads_mean']:.2f}", f"{x['eos_share']:.2f}",
             str(x["preemptions"]), str(x["recomputed_tokens"])] for x in result["levels"]]
    print(text_table(head, body))
    for r in result["ratios"]:
        print(f"C={r['concurrency']}: tokens/s APAR/AR {r['tokens_per_s_ratio']:.2f}x, "
              f"p50 AR/APAR {r['p50_speedup']:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
