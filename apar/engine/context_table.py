"""Every thread's context slots, kept on the device and updated from what changed.

Layout: one int32 row per thread that holds KV in the ledger, one entry per position (index = position),
valid up to the thread's `n_ctx`::

    table[row(t), p] = the pool slot holding the K/V of position p of thread t's context

    root   [ s0 s1 s2 s3 s4 s5 | s8 s9 ...         ]   prompt, then its own tokens
    child  [ s0 s1 s2 s3 s4 s5 | s12 s13 ...       ]   the root's slots up to its [Fork], then its own

Why slots and not block ids: the ledger seals a parent's last block when a child forks, so a context
holds partly filled blocks in its middle (the parent's block before the fork, then fresh blocks): the
slot of position p is not `block_table[p // block_size] * block_size + p % block_size`. A slot per
position is one lookup whatever the seals did, and every backend derives what it needs from it: the
portable one gathers rows, the cascade one slices the runs a group of threads shares, the flex one checks
`table[row, pos(slot)] == slot`. It costs 4 bytes per position per thread (8 KiB for 2,048 positions),
next to 2 * layers * kv_heads * head_dim * 2 bytes of KV per position.

Updates, once per step, proportional to what changed: a token appends one entry (the ledger's slot for
it), a root that starts on a cached prefix appends that prefix's slots once (`reuse`), a fork copies the
parent's entries up to the `[Fork]` into the child's row on the device (no host data), a thread that
leaves the ledger gives its row back. The step's new entries travel in one int32 upload: a pinned host
buffer copied with `non_blocking=True` on CUDA, a plain tensor on the CPU.

Row 0 is never given out: it holds -1 everywhere, the context of padding queries.
"""
from __future__ import annotations

import torch

from apar.engine.sequence import Thread


class Uploader:
    """Host int lists -> int32 device tensors, one copy per call.

    On CUDA the ints are packed into a pinned buffer and copied without blocking; a buffer is reused only
    once its copy has completed (an event per buffer), so a later upload never overwrites data still in
    flight. On the CPU the packed tensor is the result."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event]] = []

    def upload(self, *parts: list[int]) -> list[torch.Tensor]:
        flat: list[int] = []
        for p in parts:
            flat.extend(p)
        if self.device.type != "cuda":
            whole = torch.tensor(flat, dtype=torch.int32)
        else:
            host = self._free_buffer(len(flat))
            host[: len(flat)] = torch.tensor(flat, dtype=torch.int32)
            whole = host[: len(flat)].to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._buffers.append((host, event))
        out, at = [], 0
        for p in parts:
            out.append(whole[at : at + len(p)])
            at += len(p)
        return out

    def _free_buffer(self, n: int) -> torch.Tensor:
        for i, (buf, event) in enumerate(self._buffers):
            if buf.numel() >= n and event.query():
                del self._buffers[i]
                return buf
        return torch.empty(max(n, 4096), dtype=torch.int32, pin_memory=True)


class ContextTable:
    """The device table above; `version` changes whenever the table is reallocated (graphs recapture)."""

    def __init__(self, device: torch.device, max_positions: int, rows: int = 256, width: int = 4096) -> None:
        self.device = device
        self.max_positions = max_positions
        self.uploader = Uploader(device)
        self.table = torch.full((rows, min(width, max_positions)), -1, dtype=torch.int32, device=device)
        self.version = 0
        self._free = list(range(rows - 1, 0, -1))  # row 0: padding
        self._holders: dict[int, Thread] = {}  # row -> thread
        self._appends: tuple[list[int], list[int], list[int]] = ([], [], [])  # rows, positions, slots
        self._copies: list[tuple[int, int, int]] = []  # (from row, to row, entries)
        self._ended: set[int] = set()  # rows of threads whose request ended

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    @property
    def width(self) -> int:
        return self.table.shape[1]

    # ---- host side, as the engine allocates --------------------------------------------------------
    def push(self, t: Thread, slots: list[int]) -> None:
        """The ledger gave `t` these slots for its next positions (a root gets its row on its first)."""
        self._extend(t, slots)
        t.ctx.new_slots.extend(slots)  # the input builder takes them, in plan order

    def reuse(self, t: Thread, slots: list[int]) -> None:
        """A root just started reads its first positions from the prefix cache: these slots already hold
        their K/V (written for an earlier request), so they enter its context and are never written."""
        self._extend(t, slots)

    def _extend(self, t: Thread, slots: list[int]) -> None:
        ctx = t.ctx
        if ctx.row is None:
            ctx.row = self._take(t)
        rows, positions, values = self._appends
        n, at = len(slots), ctx.n_ctx
        rows.extend([ctx.row] * n)
        positions.extend(range(at, at + n))
        values.extend(slots)
        ctx.n_ctx = at + n
        if at + n > self.width:
            self._widen(at + n)

    def truncate(self, t: Thread, n: int) -> None:
        """`t`'s last `n` positions were rolled back (a rejected draft): its context ends before them. The
        entries past the end stay in the row, unread, until later tokens overwrite them."""
        if n > t.ctx.n_ctx:
            raise RuntimeError(f"thread {t.id}: {n} positions rolled back of {t.ctx.n_ctx}")
        t.ctx.n_ctx -= n

    def fork(self, parent: Thread, child: Thread) -> None:
        """`child` reads `parent`'s context up to its own start (the ledger just forked it)."""
        if parent.ctx.row is None:
            raise RuntimeError(f"fork from thread {parent.id}, which holds no context row")
        child.ctx.row = self._take(child)
        self._copies.append((parent.ctx.row, child.ctx.row, child.start_pos))
        child.ctx.n_ctx = child.start_pos

    def forget(self, threads: list[Thread]) -> None:
        """Their request ended: their rows come back at the next flush."""
        self._ended.update(t.ctx.row for t in threads if t.ctx.row is not None)

    # ---- device side, once per step ----------------------------------------------------------------
    def flush(self) -> None:
        """Apply the step's appends, then its fork copies in order (a copy reads what was appended
        before it: the parent's [Fork]; it writes only below the child's start, where no append goes),
        then give back the rows of threads that left the ledger."""
        rows, positions, values = self._appends
        if rows:
            r, p, v = self.uploader.upload(rows, positions, values)
            self.table[r.long(), p.long()] = v
            self._appends = ([], [], [])
        for src, dst, n in self._copies:
            self.table[dst, :n] = self.table[src, :n]
        self._copies.clear()
        self._collect()

    def _collect(self) -> None:
        """Rows of threads that hold no KV any more: finished (and not recomputed for a child),
        preempted, or of an ended request (`forget`). A fork happens only from a thread the ledger has
        running, so a row is never needed after this."""
        gone = [row for row, t in self._holders.items()
                if row in self._ended or not t.in_ledger or not (t.running or t.recompute.to > 0)]
        self._ended.clear()
        for row in gone:
            t = self._holders.pop(row)
            if t.ctx.row == row:
                t.ctx.row = None
            self._free.append(row)

    def _take(self, t: Thread) -> int:
        if t.ctx.row is not None and self._holders.get(t.ctx.row) is t:  # again after a preemption: a fresh start
            self._holders.pop(t.ctx.row)
            self._free.append(t.ctx.row)
        if not self._free:
            self._grow_rows()
        row = self._free.pop()
        self._holders[row] = t
        return row

    def _grow_rows(self) -> None:
        old = self.table
        self.table = torch.full((2 * old.shape[0], old.shape[1]), -1, dtype=torch.int32, device=self.device)
        self.table[: old.shape[0]] = old
        self._free.extend(range(2 * old.shape[0] - 1, old.shape[0] - 1, -1))
        self.version += 1

    def _widen(self, need: int) -> None:
        width = min(max(need, 2 * self.width), max(self.max_positions, need))
        old = self.table
        self.table = torch.full((old.shape[0], width), -1, dtype=torch.int32, device=self.device)
        self.table[:, : old.shape[1]] = old
        self.version += 1
