"""Matrix products of a few rows on the CPU: a small AVX2 kernel (csrc/rows_gemm.cpp) for the model's
linear layers when a step multiplies at most `MAX_ROWS` rows in float32.

Why our own kernel (docs/design.md, "Products of a few rows on the CPU"): the BLAS that torch's CPU wheel
ships multiplies 2 to 16 rows 2-3x slower than one row, while a decode step of a few rows is bound by
reading the weights once; so on the CPU a step's second row, a drafted token's or a forked thread's, cost
nearly as much as its first. The kernel reads every weight row once a call and keeps the rows' cost near
one row's. Each output row is the same sequence of operations whatever else is in the batch.

It is compiled once per machine on first use (torch's C++ extension loader, about a minute; cached under
~/.cache/torch_extensions); where it cannot be (no compiler, no AVX2 and FMA), products stay torch's own.
`python -m apar.engine.rows_gemm` builds it ahead.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MAX_ROWS = 16  # above this torch's BLAS is about as fast, at 32 faster (prefill chunks, busy steps)
SOURCE = Path(__file__).parent / "csrc" / "rows_gemm.cpp"

_lock = threading.Lock()
_kernel = None  # the loaded extension's function, once built
_tried = False


def supported() -> bool:
    """This CPU runs the kernel: x86 with AVX2 and FMA (torch's own dispatch level says so)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def kernel():
    """The compiled `rows_linear(x [M, K], w [N, K], bias | None) -> [M, N]`, or None where it cannot be built."""
    global _kernel, _tried
    with _lock:
        if not _tried:
            _tried = True
            if supported():
                log.info("loading the CPU rows kernel (built once per machine, about a minute the first time)")
                try:
                    from torch.utils.cpp_extension import load

                    _kernel = load(name="apar_rows_gemm", sources=[str(SOURCE)],
                                   extra_cflags=["-O3", "-mavx2", "-mfma"], verbose=False).rows_linear
                except Exception as exc:  # no compiler, a failed build: torch's products still serve
                    log.warning("the CPU rows kernel could not be built (%s); using torch's matrix products",
                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            else:
                log.info("the CPU rows kernel needs AVX2 and FMA; using torch's matrix products")
        return _kernel


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the kernel where the rows are few and everything is float32 on the CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (0 < rows <= MAX_ROWS and _kernel is not None and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.device.type == "cpu" and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        out = _kernel(x.reshape(rows, x.shape[-1]).contiguous(), weight,
                      None if bias is None else bias.contiguous())
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class RowsLinear(nn.Linear):
    """An nn.Linear whose product goes through `linear` (the class a model's Linear modules take on)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_rows_kernel(model: nn.Module) -> int:
    """Route `model`'s float32 CPU products through the kernel: every nn.Linear becomes a RowsLinear (same
    parameters, nothing copied) and fused projections (apar/engine/fusion.py) take `linear` as their
    product. Returns how many modules changed; 0 where the kernel is not available."""
    if kernel() is None:
        return 0
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        if type(module) is nn.Linear:
            module.__class__ = RowsLinear
            changed += 1
        elif hasattr(module, "product"):
            module.product = linear
            changed += 1
    return changed


if __name__ == "__main__":  # build it ahead; fails where this CPU could run it and it did not build
    logging.basicConfig(level=logging.INFO)
    built = kernel() is not None
    print("rows kernel:", "built" if built else "not available on this machine")
    raise SystemExit(0 if built or not supported() else 1)
