"""CUDA graphs of decode steps: one capture per batch-size bucket, replayed from static buffers.

A decode step on a GPU is mostly kernel launches (a 7B model: hundreds per step, ~50 ms eager at batch
1 against 4.5 ms of weight reads), so a step where every thread feeds one token replays a captured
graph of the model's forward instead. Only CUDA, only with a backend whose decode metadata has fixed
shapes (`backend.graphs`: flex, triton), and only when `EngineConfig.cuda_graphs`; the CPU path never builds
this object.

    step (T threads) -> bucket B >= T -> static buffers [B]: ids, positions, write slots, table rows,
    lengths (rows T..B-1: padding, writing to the pool's trash slot, reading context row 0) ->
    backend.prepare (eager: its block tables, refilled in place) -> graph[B].replay() -> logits [B, V]

Eager where capture is impossible: steps with a chunk (prefill, recompute), more threads than the
largest bucket, or a capture that failed (then graphs are off, with a warning). A graph reads the context
table and the backend's buffers by address, so a reallocated table (`ContextTable.version`) drops every
graph; they are captured again on use. The engine's warm-up captures every bucket up front (`capture_all`).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from apar.engine.attention import AttentionInputs
from apar.engine.backends.base import DecodeQueries, ModelInputs

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, runner, buckets: tuple[int, ...] = BUCKETS) -> None:
        self.runner = runner
        self.buckets = buckets
        self.off: str | None = None if runner.backend.graphs else f"{runner.backend.name} attention"
        dev = runner.device
        top = buckets[-1]
        self.ids = torch.zeros(top, dtype=torch.int32, device=dev)
        self.positions = torch.zeros(top, dtype=torch.int32, device=dev)
        self.writes = torch.full((top,), runner.pool.trash, dtype=torch.long, device=dev)
        self.rows = torch.arange(top, dtype=torch.long, device=dev)
        self.table_rows = torch.zeros(top, dtype=torch.int32, device=dev)
        self.lens = torch.ones(top, dtype=torch.int32, device=dev)
        self.mempool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        self.graphs: dict[int, tuple] = {}  # bucket -> (replay, what it reads)
        self.version = runner.contexts.version
        self.replays = 0

    def fits(self, step: ModelInputs) -> bool:
        return self.off is None and step.decode_only and step.decode.count <= self.buckets[-1] \
            and self.runner.backend.graphs

    def run(self, step: ModelInputs) -> torch.Tensor | None:
        """Float32 logits [S, V] of the step's sampled rows, or None: run it eagerly."""
        d = step.decode
        count = d.count
        size = next(b for b in self.buckets if b >= count)
        padded = self._fill(step, size)
        meta = self.runner.backend.prepare(padded, fixed=True)
        if meta is None:  # more work than the graph's buffers hold
            return None
        self._drop_stale()
        if size not in self.graphs and not self._capture(size, padded, meta):
            return None
        logits = self.graphs[size][0]()  # [B, V]
        self.replays += 1
        return logits.index_select(0, step.sample_rows).float()  # [S, V]

    @torch.inference_mode()
    def capture_all(self, limit: int) -> int:
        """Capture now the graph of every bucket up to `limit` threads (the engine's warm-up), so that no
        request waits for a capture: each from a step of padding rows only (reading context row 0,
        writing to the pool's trash slot). Returns how many graphs there are. In inference mode, as a
        step is: the backends' buffers that the warm-up's steps made are inference tensors, which only
        inference mode may update in place."""
        self._drop_stale()
        for size in self.buckets:
            if size > limit or self.off is not None:
                break
            if size not in self.graphs:
                padded = self._fill(None, size)
                meta = self.runner.backend.prepare(padded, fixed=True)
                if meta is not None:
                    self._capture(size, padded, meta)
        return len(self.graphs)

    def _drop_stale(self) -> None:
        """A reallocated context table: every graph read the old one."""
        if self.runner.contexts.version != self.version:
            self.graphs.clear()
            self.version = self.runner.contexts.version

    def _fill(self, step: ModelInputs | None, size: int) -> ModelInputs:
        """The static buffers hold the step's T rows (none for a step of padding only), then padding up
        to `size`."""
        d = step.decode if step is not None else None
        n = d.count if d is not None else 0
        if d is not None:
            if d.host_rows[-1] != n - 1:
                raise RuntimeError("a decode-only step's rows are 0..T-1 in order")
            self.ids[:n].copy_(step.input_ids)
            self.positions[:n].copy_(step.positions)
            self.writes[:n].copy_(step.write_slots)
            self.table_rows[:n].copy_(d.table_rows)
            self.lens[:n].copy_(d.lens)
        self.ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.writes[n:size].fill_(self.runner.pool.trash)
        self.table_rows[n:size].zero_()
        self.lens[n:size].fill_(1)
        pad = size - n
        rows, lens, families, runs = (d.host_table_rows, d.host_lens, d.families, d.runs) if d else ([], [], [], [])
        decode = DecodeQueries(self.rows[:size], self.table_rows[:size], self.lens[:size], list(range(size)),
                               rows + [0] * pad, lens + [1] * pad, families + [-1 - i for i in range(pad)],
                               runs + [()] * pad if self.runner.backend.uses_runs else [])
        return ModelInputs(self.ids[:size], self.positions[:size], self.writes[:size], self.rows[:size], decode, [],
                        self.runner.contexts)

    def _capture(self, size: int, padded: ModelInputs, meta) -> bool:
        runner = self.runner
        batch = AttentionInputs(runner.pool, padded.write_slots, runner.backend, meta)

        def forward() -> torch.Tensor:
            return runner.call_model(padded, batch, 0)  # [B, V]

        try:
            replay = self._record(forward)
        except Exception as exc:  # noqa: BLE001 - any capture failure: decode eagerly from now on
            self.off = f"capture failed: {type(exc).__name__}: {exc}"
            log.warning("CUDA graphs off (%s)", self.off)
            self.graphs.clear()
            return False
        self.graphs[size] = (replay, padded, batch, meta)  # keeps alive what the graph reads
        return True

    def _record(self, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Capture `forward` as a CUDA graph; return what replays it and gives its logits [B, V] (a
        buffer the next replay overwrites)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: compiles what the graph launches (writes the same K/V)
            forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            logits = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay
