"""`apar bench rows`: a decode step's matrix products on the CPU by rows, torch's BLAS beside the rows
kernel (apar/engine/rows_gemm.py), on random weights of a model's shapes (default SmolLM2-135M's)."""
from __future__ import annotations

import argparse
import json
import time

ROWS = "1,2,3,4,5,8,16,32"  # past the engine's MAX_ROWS (16) too, to show where torch's BLAS takes over
MOST_ROWS = 256


def register(sub) -> None:
    r = sub.add_parser("rows", help="the CPU's matrix products of a decode step by rows: torch's BLAS beside "
                                    "the rows kernel")
    r.add_argument("--hidden", type=int, default=576, help="hidden size (default 576: SmolLM2-135M)")
    r.add_argument("--intermediate", type=int, default=1536)
    r.add_argument("--layers", type=int, default=30)
    r.add_argument("--kv-size", type=int, default=192, help="k and v projections' width (kv heads x head dim)")
    r.add_argument("--vocab", type=int, default=49152, help="the LM head's rows")
    r.add_argument("--rows", default=ROWS, help=f"row counts to time (default {ROWS})")
    r.add_argument("--repeats", type=int, default=5, help="timings of each, alternating; the fastest counts")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the engine on a CPU)")
    r.add_argument("--json", action="store_true",
                   help='print {"rows": {M: {"torch_ms": ..., "kernel_ms": ...}}, "kernel": "avx2" or "avx512"}')
    r.set_defaults(func=run_rows_cmd)


def run_rows_cmd(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from apar.engine import rows_gemm
    from apar.engine.errors import UserError

    kernel = rows_gemm.kernel()
    if kernel is None:
        raise UserError("the rows kernel is not available on this machine (needs AVX2, FMA and g++)")
    try:
        rows = [int(x) for x in args.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or any(m < 1 or m > MOST_ROWS for m in rows):
        raise UserError(f"--rows: comma-separated row counts, each between 1 and {MOST_ROWS}")
    torch.set_num_threads(args.threads)
    h, i, kv = args.hidden, args.intermediate, args.kv_size
    # the engine's products a layer: q, k, v fused; o; gate and up fused; down (apar/engine/fusion.py)
    shapes = [(h + 2 * kv, h), (h, h), (2 * i, h), (h, i)]
    layers = [[torch.randn(n, k) * 0.02 for n, k in shapes] for _ in range(args.layers)]
    head = torch.randn(args.vocab, h) * 0.02
    out = {}

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    packed = rows_gemm.packed_kernel()  # AVX-512: the weights packed once, as the engine does at load
    kind = "avx2" if packed is None else "avx512"
    for w in [*(w for layer in layers for w in layer), head]:
        rows_gemm.packed_weight(w)

    def product(x, w):
        p = rows_gemm.packed_weight(w)
        return kernel(x, w, None) if p is None else packed(x, p, None)

    for m in rows:
        xs = {k: torch.randn(m, k) for k in (h, i)}

        def step(product) -> None:
            for layer in layers:
                for w in layer:
                    product(xs[w.shape[1]], w)
            product(xs[h], head)

        best = {"torch": float("inf"), "kernel": float("inf")}
        for _ in range(args.repeats):
            best["torch"] = min(best["torch"], timed(lambda: step(F.linear)))
            best["kernel"] = min(best["kernel"], timed(lambda: step(product)))
        out[m] = {"torch_ms": round(best["torch"], 2), "kernel_ms": round(best["kernel"], 2)}
    if args.json:
        print(json.dumps({"rows": out, "threads": args.threads, "kernel": kind}))
        return 0
    mb = (sum(n * k for n, k in shapes) * args.layers + args.vocab * h) * 4 / 2**20
    print(f"{args.layers} layers of hidden {h} and the LM head ({mb:.0f} MB of float32 weights), "
          f"{args.threads} thread(s); ms a step's products, the fastest of {args.repeats}; the engine uses "
          f"the kernel up to {rows_gemm.MAX_ROWS} rows; kernel: "
          + ("AVX2" if packed is None else "AVX-512 over packed weights"))
    print(f"{'rows':>5} {'torch':>9} {'kernel':>9} {'torch/kernel':>13} {'kernel/1 row':>13}")
    for m, r in out.items():
        print(f"{m:>5} {r['torch_ms']:>9.1f} {r['kernel_ms']:>9.1f} {r['torch_ms'] / r['kernel_ms']:>12.2f}x "
              f"{r['kernel_ms'] / out[rows[0]]['kernel_ms']:>12.2f}x")
    return 0
