"""`apar bench attention`: one layer's decode attention alone, every backend, beside the memory floor.

The shape of APAR's hard case: T threads decoding, each over a context of C positions whose first S are
one shared prefix (a root's prompt and tokens up to the fork), the rest each thread's own. The pool is
filled as the engine fills it: the prefix in the root's blocks (its last one sealed, partly filled, when
S is not a multiple of the block size), the suffixes in blocks handed out round-robin (threads decoding
side by side open their blocks in turn). The context table is filled through its own push and fork.

Per backend: `prepare` once (the step's metadata) and `attend` per layer, timed after a warm-up (flex
compiles there), the median of the runs; the output is checked against portable's. The floor: the
bytes the layer must read with the prefix read once, (S + T * (C - S)) * 2 * Hkv * D * element size, over
the device's measured copy bandwidth (read plus write of a 256 MiB buffer).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from apar.engine.errors import UserError


@dataclass(frozen=True, slots=True)
class AttentionShape:
    threads: int = 16
    context: int = 1024
    shared: int = 768
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    block_size: int = 16
    layers: int = 32  # per-step figures multiply the layer's time by this

    def check(self) -> None:
        if min(self.threads, self.context, self.heads, self.kv_heads, self.head_dim, self.layers) < 1:
            raise UserError("threads, context, heads, kv-heads, head-dim and layers must be >= 1")
        if not 0 <= self.shared < self.context:
            raise UserError(f"--shared must be in [0, context), got {self.shared}")
        if self.heads % self.kv_heads:
            raise UserError(f"--heads ({self.heads}) must be a multiple of --kv-heads ({self.kv_heads})")

    @property
    def unique_positions(self) -> int:
        return self.shared + self.threads * (self.context - self.shared)


def _step(shape: AttentionShape, device: torch.device, dtype: torch.dtype):
    """(pool, the past as one step that wrote every slot, the decode step): T threads forked from one
    prefix writer, every context C long."""
    from apar.engine.attention import KVPool
    from apar.engine.backends.base import DecodeQueries, ModelInputs
    from apar.engine.context_table import ContextTable
    from apar.engine.sequence import Thread
    from apar.engine.input_builder import context_runs

    bs = shape.block_size
    own = shape.context - shape.shared
    blocks = -(-shape.shared // bs) + shape.threads * -(-own // bs)
    pool = KVPool(1, blocks, bs, shape.kv_heads, shape.head_dim, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    for t in (pool.k[0], pool.v[0]):
        t.copy_(torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32).to(dtype))
    table = ContextTable(device, max_positions=shape.context + 1, rows=max(64, 2 * shape.threads))
    root = Thread(id=0, parent=None, anchor=-1, start_pos=0, depth=0, kv_tokens=[], in_ledger=True)
    written: list[int] = []  # every slot, in position order per thread (the steps that wrote them)
    positions: list[int] = []
    next_block = 0
    if shape.shared:
        n_root = -(-shape.shared // bs)
        table.push(root, [b * bs + o for b in range(n_root) for o in range(bs)][: shape.shared])
        written += root.ctx.new_slots
        positions += range(shape.shared)
        next_block = n_root
    kids = [Thread(id=i + 1, parent=root, anchor=0, start_pos=shape.shared, depth=1, kv_tokens=[], in_ledger=True)
            for i in range(shape.threads)]
    for kid in kids:
        table.fork(root, kid)
    per_kid = -(-own // bs)
    for k, kid in enumerate(kids):  # block j of thread k: the j-th round of a round-robin hand-out
        slots = [(next_block + j * shape.threads + k) * bs + o for j in range(per_kid) for o in range(bs)]
        table.push(kid, slots[:own])
        written += kid.ctx.new_slots
        positions += range(shape.shared, shape.context)
    table.flush()
    past = table.uploader.upload(written, positions)
    history = ModelInputs(past[0], past[1], past[0].long(), past[0][:0].long(), None, [], table)
    rows = [kid.ctx.row for kid in kids]
    lens = [shape.context] * shape.threads
    tensors = table.uploader.upload(list(range(shape.threads)), rows, lens, [0] * shape.threads,
                                    [shape.context - 1] * shape.threads)
    decode = DecodeQueries(tensors[0], tensors[1], tensors[2], list(range(shape.threads)), rows, lens,
                           [0] * shape.threads, [context_runs(kid, shape.context) for kid in kids])
    step = ModelInputs(tensors[3], tensors[4], torch.full((shape.threads,), pool.trash, device=device),
                    tensors[0].long(), decode, [], table)
    return pool, history, step


CUDA_REPS = 10  # calls between a pair of CUDA events: the launches queue up ahead of the device, so the
# time is the device's (as in a CUDA graph's replay), not the host's launch latency


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(CUDA_REPS):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / CUDA_REPS
    else:
        def run(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
    return run


def _measure(fn, device: torch.device, min_runs: int, min_s: float) -> float:
    """Median ms of `fn` over at least `min_runs` runs and `min_s` seconds."""
    timer = _timer(device)
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - t0 < min_s:
        times.append(timer(fn))
        if len(times) >= 200:
            break
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(mib << 18, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = _measure(lambda: dst.copy_(src), device, 3, 0.2)
    return 2 * src.numel() * 4 / (ms / 1e3)


def run_attention_bench(shape: AttentionShape, device: torch.device, dtype: torch.dtype, backends: list[str],
                        min_runs: int = 3, min_s: float = 0.3) -> dict:
    """{"backends": {name: {"ms", "prepare_ms", "step_ms", "max_diff"} or {"error"}}, "floor_ms", ...}."""
    from apar.engine.attention import KVPool
    from apar.engine.backends import make_backend

    shape.check()
    pool, history, step = _step(shape, device, dtype)
    k_pool, v_pool = pool.k[0], pool.v[0]
    gen = torch.Generator(device=device).manual_seed(1)
    query = torch.randn(shape.threads, shape.heads, shape.head_dim, generator=gen, device=device).to(dtype)
    scale = shape.head_dim ** -0.5
    per_position = KVPool.bytes_per_block(1, 1, shape.kv_heads, shape.head_dim, dtype)
    results: dict[str, dict] = {}
    reference = None
    with torch.inference_mode():
        for name in backends:
            try:
                backend = make_backend(name, device, pool.slots, per_position, shape.heads // shape.kv_heads)
                backend.prepare(history)  # what earlier steps told it (flex: each slot's position)
                meta = backend.prepare(step)
                out = backend.attend(meta, query, k_pool, v_pool, scale, None)  # warm-up (flex compiles)
                prep = _measure(lambda: backend.prepare(step), device, min_runs, min_s / 3)
                ms = _measure(lambda: backend.attend(meta, query, k_pool, v_pool, scale, None), device, min_runs, min_s)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            if reference is None:
                reference = out.float()
            results[name] = {"ms": ms, "prepare_ms": prep, "step_ms": ms * shape.layers + prep,
                             "max_diff": (out.float() - reference).abs().max().item()}
    bandwidth = copy_bandwidth(device)
    floor_bytes = shape.unique_positions * per_position
    return {"backends": results, "floor_ms": 1e3 * floor_bytes / bandwidth, "floor_bytes": floor_bytes,
            "copy_gb_s": bandwidth / 1e9, "shape": {k: getattr(shape, k) for k in AttentionShape.__slots__},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads()}


def attention_table(result: dict) -> str:
    from apar.bench import text_table

    floor = result["floor_ms"]
    rows = []
    for name, r in result["backends"].items():
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", r["error"][:60]])
            continue
        rows.append([name, f"{r['ms']:.3f}", f"{r['ms'] / floor:.1f}x", f"{r['prepare_ms']:.3f}",
                     f"{r['step_ms']:.1f}", f"{r['max_diff']:.1e}"])
    rows.append(["floor (prefix once)", f"{floor:.3f}", "1.0x", "-", f"{floor * result['shape']['layers']:.1f}", ""])
    return text_table(["backend", "ms/layer", "vs floor", "prepare ms", "ms/step", "max diff"], rows)
