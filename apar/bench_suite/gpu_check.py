"""`apar bench gpu-check`: the fast decode path on one GPU, one command, one summary, one JSON.

Parts, in order, each skipped when the budget would run out before it starts (and reported so):
1. golden: every backend (or those of `--golden`), bf16 on CUDA, CUDA graphs on: every thread's logits at every
   step against the plain HF model's on its context (forks, nested forks, chunked prefill, GQA; a sliding
   window model), plus flex and triton with graphs off, to tell a graph fault from a kernel fault
   (cascade and triton group every span two threads share, so that their grouped paths run on these tiny
   models); the CPU dry run leaves triton out (its kernels run interpreted there; the tests cover them);
2. attention: `apar bench attention` at 64 threads x 2,048 positions, 1,536 shared, 32 heads x 128;
3. engine: the random Vicuna-7B-shaped Llama (`apar bench gpu`): HF generate beside the engine in AR
   mode at batch 1 and 64 (step time against the weights' floor: their bytes over the copy bandwidth),
   then trace replay, APAR beside AR, at concurrency 1 and 16.
Writes DIR/gpu-check.json (and the engine part's DIR/gpu.json, gpu.png); exits 1 when a golden run fails.

The import path needs torch, transformers, tokenizers, safetensors, numpy, matplotlib and tqdm only
(no gRPC tools, Redis, FastAPI, Kubernetes): it is checked by a test with those blocked. `--tiny-cpu` runs
the same path with tiny shapes on the CPU in float32 (the golden tolerance then 1e-4), as a dry run.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from apar.engine.errors import UserError

PARTS = ("golden", "attention", "engine")
# seconds a part needs at least to be worth starting (on a GPU; the tiny CPU run ignores them)
NEEDS = {"golden": 60.0, "attention": 30.0, "engine": 150.0}


@dataclass(frozen=True, slots=True)
class CheckSettings:
    out: Path = Path("bench-results")
    model_cache: Path | None = None
    budget_s: float = 420.0
    tiny: bool = False
    skip: frozenset[str] = frozenset()
    progress: bool = True
    data: Path | None = None
    attention: str = ""  # the engine part runs once with each of these (comma-separated); "": triton and
    # flex on a GPU, auto on the CPU dry run
    golden: str = ""  # the golden part's backends (comma-separated); "": every backend native to the device
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


# ---- 1. golden ----------------------------------------------------------------------------------------
def tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """float32: 1e-4 absolute. bf16: both sides round every op to an 8-bit significand (a relative step
    of 2^-8, 0.4%) and sum in different orders, through every layer and a long LM-head dot product, so
    logits differ by a few such steps at the scale of the row's largest |logit|: 3% of it, plus 0.05."""
    if dtype == torch.float32:
        return 1e-4
    return 0.05 + 0.03 * ref.abs().max().item()


def golden_run(model_dir: Path, attention: str, device: str, dtype: str, graphs: bool = True) -> dict:
    """Three replayed trees and one AR request through the engine; each sampled row's logits against
    the plain model's no-cache forward on that thread's context. `attention`: a backend, maybe with
    "+compile" or "+nocompile" (its decoder layers compiled or not; else the engine's default)."""
    from transformers import AutoModelForCausalLM

    from apar.engine.config import EngineConfig
    from apar.engine.engine import Engine
    from apar.engine.params import SamplingParams
    from apar.engine.replay import random_tree

    attention, compiled = variant(attention)
    eng = Engine(model_dir, EngineConfig(block_size=4, num_blocks=256, max_batch_tokens=16, device=device,
                                         dtype=dtype, attention=attention, cuda_graphs=graphs, compile=compiled),
                 keep_logits=True)
    backend = eng.runner.backend
    if hasattr(backend, "min_shared"):  # cascade, triton: group every span two threads share (4 positions on):
        backend.min_shared = 4  # the tiny K/V would never pay
    if hasattr(backend, "min_saved_bytes"):
        backend.min_saved_bytes = 0
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=eng.runner.dtype,
                                               attn_implementation="eager").to(device).eval()
    rng = random.Random(7)
    eos = next(iter(eng.eos_ids))
    plain = [i for i in range(5, 400) if i not in (eng.fork_id, eng.child_id, eos)]
    for _ in range(3):
        eng.add_request(rng.sample(plain, rng.randint(5, 40)), SamplingParams(max_tokens=500),
                        replay=random_tree(rng, plain, eng.fork_id, 2, eos))
    eng.add_request(rng.sample(plain, 9), SamplingParams(max_tokens=12, auto_parallel=False))
    checked = agree = failed = 0
    worst = worst_ratio = 0.0
    with torch.no_grad():
        while eng.has_work():
            for (_, _), (ctx, logits) in eng.step().logits.items():
                want = ref(input_ids=torch.tensor([ctx], device=device)).logits[0, -1].float().cpu()
                diff = (logits - want).abs().max().item()
                tol = tolerance(eng.runner.dtype, want)
                worst, worst_ratio = max(worst, diff), max(worst_ratio, diff / tol)
                failed += diff >= tol
                agree += int(logits.argmax()) == int(want.argmax())
                checked += 1
    graphs_used = eng.runner.graphs
    backend = eng.runner.backend
    return {"passed": failed == 0 and checked > 60, "checked": checked, "failed": failed, "worst_diff": worst,
            "worst_over_tolerance": worst_ratio, "argmax_agree": agree / max(1, checked),
            "backend": backend.name, "shared_steps": getattr(backend, "shared_steps", None),
            "compiled": eng.runner.compiled,
            "graph_replays": graphs_used.replays if graphs_used else 0,
            "graphs_off": graphs_used.off if graphs_used else "not built"}


def _golden_models(root: Path, data: Path | None, tiny: bool) -> dict[str, Path]:
    """Tiny random models: a Llama with grouped-query attention (4 heads, 2 KV heads), and (not in the
    CPU dry run, whose tests cover windows) a Mistral whose sliding window (8) is shorter than the
    contexts."""
    from apar.modelgen import ModelShape, build_tokenizer, model_config, random_model, save_model

    tok = build_tokenizer(1024, data=data)
    out = {}
    for name, arch, window in (("llama", "llama", None), ("mistral-window8", "mistral", 8))[: 1 if tiny else 2]:
        cfg = model_config(arch, ModelShape(), tok)
        if arch == "mistral":
            cfg.sliding_window = window
        out[name] = save_model(root / name, random_model(cfg, tok, seed=len(out)), tok)
    return out


def run_golden(s: CheckSettings, device: str, dtype: str) -> dict:
    from apar.engine.backends import native

    root = Path(tempfile.mkdtemp(prefix="apar-gpu-check-"))
    try:
        models = _golden_models(root, s.data, s.tiny)
        backends = _names(s.golden) or native(torch.device(device))
        runs = [(b, m, True) for m in models for b in backends] + [(b, "llama", False) for b in ("flex", "triton")
                                                                    if b in backends]
        results = {}
        for backend, model, graphs in runs:
            key = f"{backend}/{model}" + ("" if graphs or device != "cuda" else "/no-graphs")
            if key in results:
                continue
            if not s.tiny and s.left() < NEEDS["attention"] + NEEDS["engine"]:
                results[key] = {"skipped": "budget"}
                continue
            t0 = time.perf_counter()
            try:
                results[key] = golden_run(models[model], backend, device, dtype, graphs)
            except Exception as exc:  # noqa: BLE001 - reported, the other runs go on
                results[key] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                                "trace": traceback.format_exc()[-2000:]}
            results[key]["seconds"] = time.perf_counter() - t0
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _names(backends: str) -> list[str]:
    return [a.strip() for a in backends.split(",") if a.strip()]


def variant(name: str) -> tuple[str, bool | None]:
    """A backend and whether its decoder layers are compiled: "triton" -> ("triton", None: the engine's
    default, compiled on CUDA); "triton+compile" -> True; "triton+nocompile" -> False."""
    backend, _, extra = name.partition("+")
    options = {"": None, "compile": True, "nocompile": False}
    if extra not in options:
        raise UserError(f"a backend may be followed by +compile or +nocompile only, got {name!r}")
    return backend, options[extra]


# ---- 2. attention -------------------------------------------------------------------------------------
def run_attention(s: CheckSettings, device: str, dtype: str) -> dict:
    from apar.bench_suite.attention import AttentionShape, run_attention_bench
    from apar.engine.backends import native

    if s.tiny:
        shape = AttentionShape(threads=4, context=64, shared=48, heads=4, kv_heads=2, head_dim=16, layers=2)
    else:
        shape = AttentionShape(threads=64, context=2048, shared=1536, heads=32, kv_heads=32, head_dim=128, layers=32)
    return run_attention_bench(shape, torch.device(device), getattr(torch, dtype), native(torch.device(device)))


# ---- 3. engine ----------------------------------------------------------------------------------------
def run_engines(s: CheckSettings, golden: dict) -> dict:
    """The engine part once per backend of `--attention` (a comma-separated list), each in its share of the
    budget left; a backend whose golden run failed is not measured."""
    names = _names(s.attention or ("auto" if s.tiny else "triton,flex"))
    out = {}
    for i, name in enumerate(names):
        failed = [k for k, r in golden.items() if k.split("/")[0] == name and isinstance(r, dict)
                  and (r.get("passed") is False or "error" in r)]
        if failed:
            out[name] = {"skipped": f"golden failed ({', '.join(failed)})"}
        elif not s.tiny and s.left() < NEEDS["engine"]:
            out[name] = {"skipped": f"budget ({s.left():.0f} s left)"}
        else:
            t0 = time.perf_counter()
            try:
                out[name] = run_engine(s, name, (s.left() - 30.0) / (len(names) - i),
                                       s.out / name.replace("+", "-") if len(names) > 1 else s.out)
            except Exception as exc:  # noqa: BLE001 - reported; the next backend still runs
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500], "trace": traceback.format_exc()[-3000:]}
            out[name]["seconds"] = time.perf_counter() - t0
    return out


def run_engine(s: CheckSettings, attention: str, budget_s: float, out: Path) -> dict:
    from apar.bench_suite.gpu import GpuSettings, gpu_table, run_gpu

    levels, trace_levels = ((1,), (1,)) if s.tiny else ((1, 64), (1, 16))
    attention, compiled = variant(attention)
    g = GpuSettings(levels=levels, trace_levels=trace_levels, model_cache=s.model_cache,
                    answers=8 if s.tiny else 64, max_answer_tokens=200 if s.tiny else 400,
                    new_tokens=16 if s.tiny else 128, budget_s=max(30.0, budget_s - 30.0), tiny=s.tiny,
                    attention=attention, compile=compiled, progress=s.progress, data=s.data)
    report = run_gpu(g)
    report.write(out)
    print(gpu_table(report))
    trace, hf = report.runs
    by = {name: {x.concurrency: x.summary() for x in run.levels}
          for name, run in (("trace_ar", trace.modes["ar"]), ("trace_apar", trace.modes["apar"]),
                            ("hf", hf.modes["hf"]), ("engine_ar", hf.modes["ar"]))}
    floor = report.settings["weights_floor_ms"]
    steps = {}
    for b in levels:
        e, h = by["engine_ar"].get(b), by["hf"].get(b)
        steps[b] = {"engine_step_ms": e and e["step_ms_mean"], "hf_step_ms": h and h["step_ms_mean"],
                    "engine_tokens_per_s": e and e["tokens_per_s"], "hf_tokens_per_s": h and h["tokens_per_s"],
                    "engine_over_floor": e and e["step_ms_mean"] / floor}
    replay = {}
    for c in trace_levels:
        ar, ap = by["trace_ar"].get(c), by["trace_apar"].get(c)
        replay[c] = {"ar_latency_p50_s": ar and ar["latency_p50_s"], "apar_latency_p50_s": ap and ap["latency_p50_s"],
                     "ar_tokens_per_s": ar and ar["tokens_per_s"], "apar_tokens_per_s": ap and ap["tokens_per_s"],
                     "latency_ar_over_apar": ar and ap and ap["latency_p50_s"] and
                     ar["latency_p50_s"] / ap["latency_p50_s"]}
    return {"settings": report.settings, "ar_step": steps, "trace": replay, "weights_floor_ms": floor,
            **{f"profile_ar_batch{b}": report.settings[f"profile_ar_batch{b}"] for b in levels}}


# ---- the command --------------------------------------------------------------------------------------
def run_gpu_check(s: CheckSettings) -> int:
    import transformers

    from apar.engine.config import ATTENTION_CHOICES

    unknown = set(s.skip) - set(PARTS)
    if unknown:
        raise UserError(f"--skip takes some of {', '.join(PARTS)}, got {', '.join(sorted(unknown))}")
    for flag, value in (("--attention", s.attention), ("--golden", s.golden)):
        if any(variant(a)[0] not in ATTENTION_CHOICES for a in _names(value)):
            raise UserError(f"{flag} takes some of {', '.join(ATTENTION_CHOICES)}, each maybe with +compile or "
                            f"+nocompile, comma-separated; got {value!r}")
    if not s.tiny and not torch.cuda.is_available():
        raise UserError("apar bench gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); "
                        "--tiny-cpu runs the same path on the CPU")
    device, dtype = ("cpu", "float32") if s.tiny else ("cuda", "bfloat16")
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
              "torch": torch.__version__, "transformers": transformers.__version__, "parts": {}}
    parts = {"golden": lambda: run_golden(s, device, dtype), "attention": lambda: run_attention(s, device, dtype),
             "engine": lambda: run_engines(s, result["parts"].get("golden", {}))}
    for name in PARTS:
        if name in s.skip:
            result["parts"][name] = {"skipped": "--skip"}
        elif not s.tiny and s.left() < NEEDS[name]:
            result["parts"][name] = {"skipped": f"budget ({s.left():.0f} s left)"}
        else:
            print(f"== {name} ({s.left():.0f} s of the budget left)", flush=True)
            t0 = time.perf_counter()
            try:
                result["parts"][name] = parts[name]()
            except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' results
                result["parts"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500],
                                         "trace": traceback.format_exc()[-3000:]}
            result["parts"][name]["seconds"] = time.perf_counter() - t0
        result["wall_s"] = time.perf_counter() - s.started
        path = _write(result, s.out)  # after each part: a run cut short keeps what it measured
    print(summary(result))
    print(f"wrote {path}")
    golden = result["parts"].get("golden", {})
    failed = [k for k, r in golden.items() if isinstance(r, dict) and r.get("passed") is False]
    return 1 if failed or "error" in golden else 0


def _write(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu-check.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path


def summary(result: dict) -> str:
    """The lines that answer the check: golden per run, attention against its floor, the goals."""
    lines = [f"gpu-check on {result['device']} ({result['dtype']}), torch {result['torch']}, transformers "
             f"{result['transformers']}, {result['wall_s']:.0f} s"]
    parts = result["parts"]
    golden = parts.get("golden", {})
    for key, r in golden.items():
        if key == "seconds" or not isinstance(r, dict):
            continue
        if "skipped" in r:
            lines.append(f"golden {key}: skipped ({r['skipped']})")
        elif "error" in r:
            lines.append(f"golden {key}: FAILED {r['error']}")
        else:
            lines.append(f"golden {key}: {'passed' if r['passed'] else 'FAILED'} ({r['checked']} rows, worst "
                         f"{r['worst_diff']:.3g} = {r['worst_over_tolerance']:.2f} of tolerance, argmax agree "
                         f"{r['argmax_agree']:.1%}, {r['graph_replays']} graph replays; {r['seconds']:.0f} s)")
    att = parts.get("attention", {})
    if "backends" in att:
        floor = att["floor_ms"]
        for name, r in att["backends"].items():
            lines.append(f"attention {name}: " + (r["error"] if "error" in r else
                         f"{r['ms']:.3f} ms/layer = {r['ms'] / floor:.2f}x the prefix-once floor {floor:.3f} ms "
                         f"(goal <= 1.5x)"))
    for name, eng in parts.get("engine", {}).items():
        if not isinstance(eng, dict):
            continue
        if "ar_step" not in eng:
            lines.append(f"engine ({name} attention): {eng.get('error') or 'skipped (' + eng['skipped'] + ')'}")
            continue
        s = eng["settings"]
        lines.append(f"engine: {s['attention']} attention, layers {'compiled' if s.get('compile') else 'eager'}, "
                     f"CUDA graphs {s['cuda_graphs']}; weights floor "
                     f"{eng['weights_floor_ms']:.2f} ms")
        for b, r in eng["ar_step"].items():
            lines.append(f"AR step at batch {b}: engine {_ms(r['engine_step_ms'])}, HF generate "
                         f"{_ms(r['hf_step_ms'])}; engine / floor {_x(r['engine_over_floor'])}"
                         + (" (goal <= 1.5x)" if b == 1 else ""))
        for c, r in eng["trace"].items():
            lines.append(f"trace at concurrency {c}: latency p50 AR {_s(r['ar_latency_p50_s'])}, APAR "
                         f"{_s(r['apar_latency_p50_s'])}: AR/APAR {_x(r['latency_ar_over_apar'])}"
                         + (" (goal >= 1.8x)" if c == 1 else ""))
        for b in eng["ar_step"]:
            p = eng.get(f"profile_ar_batch{b}")
            if p:
                lines.append(f"profile of the AR step at batch {b}: {p['wall_ms']:.2f} ms wall, device busy "
                             f"{p['device_busy_ms']:.2f} ms in {p.get('kernels_per_step', 0):.0f} kernels; top: "
                             + ", ".join(f"{k['name'][:40]} {k['ms']:.2f} ms" for k in p["top_kernels"][:5])
                             + "; host: " + ", ".join(f"{k['name'][:30]} {k['ms']:.2f} ms"
                                                      for k in p["top_host_ops"][:4])
                             + "; most launched: " + ", ".join(f"{k['name'][:30]} x{k['per_step']:.0f}"
                                                               for k in p.get("most_launched", [])[:6]))
    for name, r in parts.items():
        if isinstance(r, dict) and ("error" in r or "skipped" in r) and name != "golden":
            lines.append(f"{name}: {r.get('error') or 'skipped (' + r['skipped'] + ')'}")
    return "\n".join(lines)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def _s(v) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"
