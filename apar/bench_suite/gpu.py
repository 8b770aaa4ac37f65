"""`apar bench gpu`: one command on one GPU, a random Llama with Vicuna-7B's shape, in under 8 minutes.

Order, so memory holds one model at a time and the budget goes to what matters: build the model on the
GPU in bf16 (seconds) and save it once (reused from --model-cache on the next run); HF `generate` at
each batch size with that in-memory model; free it; load the engine; the engine in AR mode on the same
fixed-length prompts; then trace replay, AR beside APAR, at each concurrency (no level starts after
--budget-s). One table, DIR/gpu.json and DIR/gpu.png. A hidden --tiny-cpu runs the same path with a
tiny shape on the CPU (for tests).
"""
from __future__ import annotations

import gc
import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from apar.bench import text_table
from apar.bench_suite.driver import LevelPlan, ModeRun, run_levels
from apar.bench_suite.report import Report, Run
from apar.bench_suite.workloads import (SuiteSettings, engine_mode, fixed_jobs, hf_mode, trace_jobs,
                                        unlimited_blocks, warm_up)
from apar.engine.errors import UserError
from apar.modelgen import ModelShape

VICUNA_7B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, max_positions=2048,
                       vocab=32000)
TINY = ModelShape(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=172, max_positions=2048, vocab=32000)


@dataclass(frozen=True, slots=True)
class GpuSettings:
    levels: tuple[int, ...] = (1, 16, 64)
    trace_levels: tuple[int, ...] | None = None  # None: `levels`
    model_cache: Path | None = None  # None: a folder under the system's temp dir, per shape
    answers: int = 64
    max_answer_tokens: int = 400
    prompt_tokens: int = 64
    new_tokens: int = 128
    budget_s: float = 360.0  # no trace level starts after this many seconds from the start
    max_batch_tokens: int = 2048
    tiny: bool = False  # the tiny shape on the CPU: checks the code path without a GPU
    attention: str = "auto"  # the engine's decode attention (`--attention`)
    compile: bool | None = None  # torch.compile the engine's decoder layers (`--compile`; None: on CUDA)
    seed: int = 0
    progress: bool = True
    data: Path | None = None  # the AlpacaEval folder; None: `apar.data.alpaca_split.data_dir()`
    started: float = field(default_factory=time.perf_counter)

    @property
    def cache(self) -> Path:
        name = "apar-bench-tiny" if self.tiny else "apar-bench-vicuna-7b-shape"
        return self.model_cache or Path(tempfile.gettempdir()) / name


def check_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError("apar bench gpu needs a CUDA GPU and torch built with CUDA (torch.cuda.is_available() is "
                        "False here); on CPU run `apar bench trace`")


def run_gpu(g: GpuSettings) -> Report:
    from apar.data.alpaca_split import data_dir

    if not g.tiny:
        check_cuda()
    data = data_dir(g.data)  # before building anything: trace needs it
    shape, device, dtype = (TINY, "cpu", "float32") if g.tiny else (VICUNA_7B, "cuda", "bfloat16")
    model_dir, model = _model(g, shape, device, getattr(torch, dtype))
    plan = LevelPlan(g.levels, rounds=1, min_requests=4, deadline=g.started + g.budget_s)
    trace_plan = replace(plan, levels=g.trace_levels or g.levels)
    s = SuiteSettings(plan, max_batch_tokens=g.max_batch_tokens, device=device, dtype=dtype, attention=g.attention,
                      compile=g.compile, progress=g.progress, data=data)
    top = max(g.levels + trace_plan.levels)
    fixed = fixed_jobs(model.config.vocab_size, plan.requests(max(g.levels)), g.prompt_tokens, g.new_tokens, g.seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hf = run_levels([hf_mode(model, fixed, s.block_size)], plan, "gpu: HF generate", g.progress)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    ar_jobs, apar_jobs = trace_jobs(model_dir, s, g.answers, g.max_answer_tokens, g.seed)
    blocks = max(unlimited_blocks(ar_jobs + apar_jobs, top, s.block_size),
                 unlimited_blocks(fixed, top, s.block_size))
    engine = warm_up(s.engine(model_dir, blocks), fixed)
    ours = run_levels([engine_mode("ar", "engine AR", engine, fixed)], plan, "gpu: engine AR", g.progress)
    trace = run_levels([engine_mode("ar", "AR", engine, ar_jobs), engine_mode("apar", "APAR", engine, apar_jobs)],
                       trace_plan, "gpu: trace", g.progress)
    from apar.bench_suite.attention import copy_bandwidth

    profiles = {b: profile_ar_step(engine, [job.prompt for job in fixed[:b]]) for b in (1, max(g.levels))}
    runner = engine.runner
    bandwidth = copy_bandwidth(runner.device)
    graphs = runner.graphs
    settings = {"model": str(model_dir), "shape": "tiny (CPU check)" if g.tiny else "Vicuna-7B",
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
                "answers": len(apar_jobs), "max_answer_tokens": g.max_answer_tokens,
                "prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens, "kv_blocks": blocks,
                "attention": runner.backend.name, "compile": runner.compiled, "fused_projections": runner.fused,
                "cuda_graphs": "off" if graphs is None else graphs.off or f"on ({graphs.replays} replays)",
                "weight_bytes": weight_bytes, "copy_gb_s": bandwidth / 1e9,
                "weights_floor_ms": 1e3 * weight_bytes / bandwidth, "trace_levels": list(trace_plan.levels),
                **{f"profile_ar_batch{b}": p for b, p in profiles.items()},
                "wall_s": time.perf_counter() - g.started, **s.describe()}
    return Report("gpu", settings, [Run("trace", blocks, "ar", "apar", trace),
                                    Run("hf", blocks, "hf", "ar", {**hf, **ours})])


def profile_ar_step(engine, prompts: list[list[int]], steps: int = 24, top: int = 12) -> dict:
    """Where an AR decode step at batch len(prompts) goes: its wall time (no profiler), then under
    torch.profiler the device's busy time per step (every kernel's own time), the kernels and host ops
    that take most, and the kernels launched most often.
    Wall well above busy: the step waits on the host (Python, launches, syncs); busy near wall: kernels."""
    from torch.profiler import ProfilerActivity, profile

    from apar.engine.params import SamplingParams

    cuda = engine.runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=2 * steps + 8, auto_parallel=False, ignore_eos=True))
    while any(r.root.computed < len(r.prompt) for r in engine.requests.values()):  # the prefill chunks
        engine.step()
    for _ in range(3):  # the first decode steps (a graph captured)
        engine.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    wall = 1e3 * (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    while engine.has_work():
        engine.step()
    events = prof.key_averages()

    def own(e, kind: str) -> float:  # ms per step (attribute names moved from cuda_ to device_)
        names = (f"self_{kind}_time_total",) if kind == "cpu" else ("self_device_time_total", "self_cuda_time_total")
        return next((getattr(e, n) for n in names if hasattr(e, n)), 0.0) / 1e3 / steps

    kernels = sorted(((own(e, "device"), e.key, e.count / steps) for e in events if own(e, "device") > 0),
                     reverse=True)
    host = sorted(((own(e, "cpu"), e.key, e.count / steps) for e in events), reverse=True)
    return {"steps": steps, "batch": len(prompts), "wall_ms": wall, "device_busy_ms": sum(k[0] for k in kernels),
            "kernels_per_step": sum(k[2] for k in kernels),
            "top_kernels": [{"name": n[:120], "ms": ms, "per_step": c} for ms, n, c in kernels[:top]],
            # the many small kernels, which a launch-bound step spends its gaps on
            "most_launched": [{"name": n[:120], "ms": ms, "per_step": c}
                              for ms, n, c in sorted(kernels, key=lambda k: -k[2])[:top]],
            "top_host_ops": [{"name": n[:120], "ms": ms, "per_step": c} for ms, n, c in host[:top]]}


def _model(g: GpuSettings, shape: ModelShape, device: str, dtype: torch.dtype):
    """(directory, in-memory model): reused from the cache when its config has this shape, else built on
    `device` in `dtype` and saved there once."""
    from transformers import AutoModelForCausalLM

    from apar.modelgen import build_tokenizer, model_config, random_model, save_model

    path = g.cache
    if _cached(path, shape):
        print(f"model: reusing {path}")
        return path, AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    t0 = time.perf_counter()
    tok = build_tokenizer(shape.vocab, data=g.data)
    model = random_model(model_config("llama", shape, tok, vocab=shape.vocab), tok, g.seed, dtype, device)
    save_model(path, model, tok)
    print(f"model: random {'tiny' if g.tiny else 'Vicuna-7B-shaped'} Llama built and saved to {path} in "
          f"{time.perf_counter() - t0:.0f} s")
    return path, model


def _cached(path: Path, shape: ModelShape) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    want = {"hidden_size": shape.hidden, "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "intermediate_size": shape.intermediate}
    return all(cfg.get(k) == v for k, v in want.items()) and any(path.glob("*.safetensors")) \
        and (path / "tokenizer.json").is_file()


def gpu_table(report: Report) -> str:
    """One row per level: trace AR and APAR, then HF generate beside the engine in AR mode."""
    trace, hf = report.runs
    by = _by_level(trace.modes["ar"]), _by_level(trace.modes["apar"]), _by_level(hf.modes["hf"]), \
        _by_level(hf.modes["ar"])
    levels = sorted(set().union(*by))
    rows = []
    for c in levels:
        ar, apar, h, ours = (m.get(c) for m in by)
        rows.append([str(c), _f(ar, "tokens_per_s"), _f(apar, "tokens_per_s"), _r(apar, ar, "tokens_per_s"),
                     _f(ar, "latency_p50_s"), _f(apar, "latency_p50_s"), _r(ar, apar, "latency_p50_s"),
                     _r(ar, apar, "steps_per_request"), _f(h, "tokens_per_s"), _f(ours, "tokens_per_s"),
                     _r(ours, h, "tokens_per_s")])
    head = ["C", "AR tok/s", "APAR tok/s", "APAR/AR", "AR p50 s", "APAR p50 s", "AR/APAR p50",
            "steps/req AR/APAR", "HF tok/s", "engine AR tok/s", "engine/HF"]
    return text_table(head, rows)


def _by_level(mode: ModeRun) -> dict[int, dict]:
    return {x.concurrency: x.summary() for x in mode.levels}


def _f(s: dict | None, key: str) -> str:
    return "-" if s is None else f"{s[key]:.2f}" if s[key] < 100 else f"{s[key]:.0f}"


def _r(num: dict | None, den: dict | None, key: str) -> str:
    if num is None or den is None or not den[key]:
        return "-"
    return f"{num[key] / den[key]:.2f}x"
