"""Matrix products of a few rows on the CPU: a small AVX2 kernel (csrc/rows_gemm.cpp) for the model's
linear layers when a step multiplies at most `MAX_ROWS` rows in float32 (`MAX_PACKED_ROWS` with AVX-512).

Why our own kernel (docs/design.md, "Products of a few rows on the CPU"): the BLAS that torch's CPU wheel
ships multiplies 2 to 16 rows 2-3x slower than one row, while a decode step of a few rows is bound by
reading the weights once; so on the CPU a step's second row, a drafted token's or a forked thread's, cost
nearly as much as its first. The kernel reads every weight row once a call and keeps the rows' cost near
one row's. Each output row is the same sequence of operations whatever else is in the batch.

On a CPU with AVX-512 the products run a second kernel of the same source over a packed copy of each
weight (`packed_weight`: made once per weight, kept beside it, so the weights then take twice their
memory): tiles of up to 6 input rows by 64 outputs, fed by one sequential stream, keep up to 6 rows'
products near the cost of reading the weights once and 8 rows' at about 1.5x (the AVX2 kernel's: 3.8x),
and stay ahead of torch's BLAS up to `MAX_PACKED_ROWS` rows (docs/benchmarks.md, "Products of a few
rows on the CPU"). A weight takes one of the two paths always, so a row's bits never depend on its batch.

It is compiled once per machine on first use (torch's C++ extension loader, about a minute; cached under
~/.cache/torch_extensions); where it cannot be (no compiler, no AVX2 and FMA), products stay torch's own.
`python -m apar.engine.rows_gemm` builds it ahead.
"""
from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MAX_ROWS = 16  # above this torch's BLAS is about as fast, at 32 faster (prefill chunks, busy steps)
# the AVX-512 kernel over packed weights beats torch's BLAS by 1.4-2.3x from 16 to 128 rows on a Zen 4 core
# (docs/benchmarks.md, "Products of a few rows on the CPU"); past that the rows no longer stay in its caches
MAX_PACKED_ROWS = 128
PACK_BLOCK = 64  # output rows a block of the packed layout holds (csrc/rows_gemm.cpp)
SOURCE = Path(__file__).parent / "csrc" / "rows_gemm.cpp"

_lock = threading.Lock()
_kernel = None  # the loaded extension's function, once built
_packed_kernel = None  # its AVX-512 function over packed weights, where the CPU has AVX-512
_pack = None  # [N, K] -> the packed layout
_tried = False
# (data pointer, shape) -> (a weak reference to the tensor owning the memory, its version, the packed copy)
_packs: dict[tuple[int, tuple[int, ...]], tuple[weakref.ref, int, torch.Tensor]] = {}


def supported() -> bool:
    """This CPU runs the kernel: x86 with AVX2 and FMA (torch's own dispatch level says so)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def kernel():
    """The compiled `rows_linear(x [M, K], w [N, K], bias | None) -> [M, N]`, or None where it cannot be built."""
    global _kernel, _packed_kernel, _pack, _tried
    with _lock:
        if not _tried:
            _tried = True
            if supported():
                log.info("loading the CPU rows kernel (built once per machine, about a minute the first time)")
                try:
                    from torch.utils.cpp_extension import load

                    module = load(name="apar_rows_gemm", sources=[str(SOURCE)],
                                  extra_cflags=["-O3", "-mavx2", "-mfma"], verbose=False)
                    _kernel = module.rows_linear
                    if module.has_avx512():
                        _packed_kernel, _pack = module.rows_linear_packed, module.pack_weight
                except Exception as exc:  # no compiler, a failed build: torch's products still serve
                    log.warning("the CPU rows kernel could not be built (%s); using torch's matrix products",
                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            else:
                log.info("the CPU rows kernel needs AVX2 and FMA; using torch's matrix products")
        return _kernel


def packed_kernel():
    """The AVX-512 function over packed weights, or None (no AVX-512, or no kernel): after `kernel()`."""
    return _packed_kernel


def packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [N, K] in the AVX-512 kernel's layout: packed on first use and kept while the weight lives
    and is not changed in place (its version); None where that kernel is not available or the shape does
    not pack (N not a multiple of `PACK_BLOCK`: such a weight always takes the AVX2 kernel)."""
    if _pack is None or weight.dim() != 2 or weight.shape[0] % PACK_BLOCK or not weight.shape[1]:
        return None
    key = (weight.data_ptr(), tuple(weight.shape))
    owner = weight if weight._base is None else weight._base  # a view's memory lives as long as its base
    found = _packs.get(key)
    if found is not None and found[0]() is owner and found[1] == weight._version:
        return found[2]
    packed = _pack(weight.detach())
    _packs[key] = (weakref.ref(owner, lambda _, key=key: _packs.pop(key, None)), weight._version, packed)
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the kernel where the rows are few and everything is float32 on the CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (0 < rows <= MAX_PACKED_ROWS and _kernel is not None and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.device.type == "cpu" and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        packed = packed_weight(weight)
        if packed is not None or rows <= MAX_ROWS:
            x2 = x.reshape(rows, x.shape[-1]).contiguous()
            b = None if bias is None else bias.contiguous()
            out = _kernel(x2, weight, b) if packed is None else _packed_kernel(x2, packed, b)
            return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class RowsLinear(nn.Linear):
    """An nn.Linear whose product goes through `linear` (the class a model's Linear modules take on)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_rows_kernel(model: nn.Module) -> int:
    """Route `model`'s float32 CPU products through the kernel: every nn.Linear becomes a RowsLinear (same
    parameters) and fused projections (apar/engine/fusion.py) take `linear` as their product; with AVX-512
    their weights are packed here (`packed_weight`). Returns how many modules changed; 0 where the kernel
    is not available."""
    if kernel() is None:
        return 0
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        if type(module) is nn.Linear:
            module.__class__ = RowsLinear
        elif hasattr(module, "product"):
            module.product = linear
        else:
            continue
        changed += 1
        if weight.is_contiguous():
            packed_weight(weight)  # packed now rather than in the first step
    return changed


if __name__ == "__main__":  # build it ahead; fails where this CPU could run it and it did not build
    logging.basicConfig(level=logging.INFO)
    built = kernel() is not None
    print("rows kernel:", "built" if built else "not available on this machine")
    raise SystemExit(0 if built or not supported() else 1)
