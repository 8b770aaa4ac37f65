"""Repetition, frequency and presence penalties, applied on the device to the logits rows of the threads
whose request asks for one.

Which tokens count for a thread: those of its own context, never a sibling's (nor its parent's after the
fork, nor a child's), and never a control token ([Fork], [Child]: they neither count nor get penalized):
  - `repetition_penalty` (HF's and vLLM's): every token of the context, the prompt included (for a child:
    the prompt, its ancestors' tokens up to its fork, its own). A positive logit is divided by the
    penalty, a negative one multiplied, once per token id however often it occurs.
  - `frequency_penalty`, `presence_penalty` (OpenAI's): the generated tokens of the context (the same
    without the prompt): logit -= count * frequency_penalty + (count > 0) * presence_penalty.

State: a thread's context holds few distinct token ids next to the vocabulary, so each penalized thread
keeps the list of the distinct ids its context has seen, with how often each was generated, in one row
of two device tables; the host keeps, per thread, where each id sits in its row:

    seen[row(t), j]       the j-th distinct token id of t's context (int32)
    generated[row(t), j]  how often it was generated in t's context (float32; 0: only in the prompt)
    t.penalty.slots       {token id: j}, on the host

A root's row starts with its prompt's distinct ids; a child's (and an answer root's) is a copy of its
parent's at the fork (the parent's tokens up to its [Fork], which never counts). A new token costs one
host dict lookup; the step's new entries and counts reach the device in one upload and one scatter when
the step ends (`flush`), and a step's penalties touch only the P x W entries of its penalized rows (W:
the most distinct ids one of them has seen), not P x vocabulary. A row given back during a step returns
to the free list only after that flush, so no row is reused while an update for its old thread is pending.
"""
from __future__ import annotations

import torch

from apar.engine.context_table import Uploader
from apar.engine.sequence import PenaltyRow, Request, Thread


class Penalties:
    def __init__(self, device: torch.device, control_ids: set[int], rows: int = 16, width: int = 256) -> None:
        self.device = device
        self.control = frozenset(control_ids)
        self.seen = torch.zeros((rows, width), dtype=torch.int32, device=device)
        self.generated = torch.zeros((rows, width), dtype=torch.float32, device=device)
        self._free = list(range(rows - 1, -1, -1))
        self.uploader = Uploader(device)
        self._new: tuple[list[int], list[int], list[int]] = ([], [], [])  # the step's new entries: row, j, token
        self._counts: tuple[list[int], list[int]] = ([], [])  # the step's generated tokens: row, j
        self._closing: list[int] = []  # rows given back in the step

    @property
    def in_use(self) -> int:
        return self.seen.shape[0] - len(self._free)

    # ---- host side, as threads come and go -----------------------------------------------------------
    def open_request(self, req: Request) -> None:
        """A request that asks for a penalty: its root's row starts with the prompt's distinct ids."""
        root = req.root
        root.penalty = PenaltyRow(self._take(), {})
        for token in dict.fromkeys(req.prompt):
            self._add(root, token)

    def open_thread(self, t: Thread, parent: Thread) -> None:
        """`t` reads `parent`'s context up to here (a forked child, an answer's root): a copy of its row."""
        self._sync()  # the parent's row as its tokens so far left it
        src = parent.penalty
        t.penalty = PenaltyRow(row := self._take(), dict(src.slots))  # type: ignore[union-attr]
        n = len(t.penalty.slots)
        if n > self.seen.shape[1]:
            self._widen(n)
        self.seen[row, :n] = self.seen[src.row, :n]  # type: ignore[union-attr]
        self.generated[row, :n] = self.generated[src.row, :n]  # type: ignore[union-attr]

    def count(self, t: Thread, token: int) -> None:
        """`token` was generated into `t`'s context."""
        j = self._add(t, token)
        if j is not None:
            self._counts[0].append(t.penalty.row)  # type: ignore[union-attr]
            self._counts[1].append(j)

    def close_thread(self, t: Thread) -> None:
        if t.penalty is not None:
            self._closing.append(t.penalty.row)
            t.penalty = None

    def close_request(self, req: Request) -> None:
        for t in req.threads:
            self.close_thread(t)

    def _add(self, t: Thread, token: int) -> int | None:
        """The entry of `token` in t's row, new if needed (None for a control token)."""
        if token in self.control:
            return None
        pen = t.penalty
        slots = pen.slots  # type: ignore[union-attr]
        j = slots.get(token)
        if j is None:
            j = slots[token] = len(slots)
            if j >= self.seen.shape[1]:
                self._widen(j + 1)
            self._new[0].append(pen.row)  # type: ignore[union-attr]
            self._new[1].append(j)
            self._new[2].append(token)
        return j

    def _take(self) -> int:
        if not self._free:
            old = self.seen.shape[0]
            self.seen = torch.cat([self.seen, torch.zeros_like(self.seen)])
            self.generated = torch.cat([self.generated, torch.zeros_like(self.generated)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        row = self._free.pop()
        self.generated[row] = 0.0
        return row

    def _widen(self, need: int) -> None:
        width = max(need, 2 * self.seen.shape[1])
        pad = width - self.seen.shape[1]
        self.seen = torch.nn.functional.pad(self.seen, (0, pad))
        self.generated = torch.nn.functional.pad(self.generated, (0, pad))

    # ---- device side, once per step ------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, samplers: list[tuple[Request, Thread]]) -> None:
        """Penalize, in place, the rows of `logits` ([S, V], row i for samplers[i]) whose request asks for
        a penalty; the other rows are left alone (nothing runs when no request asks)."""
        if not self.in_use:
            return
        picked = [i for i, (_, t) in enumerate(samplers) if t.penalty is not None]
        if not picked:
            return
        self._sync()  # entries added since the last step (a new request's prompt)
        threads = [samplers[i][1] for i in picked]
        sizes = [len(t.penalty.slots) for t in threads]  # type: ignore[union-attr]
        width = max(sizes)
        if not width:
            return
        index, rows, n = (x.long() for x in self.uploader.upload(picked, [t.penalty.row for t in threads], sizes))
        params = [samplers[i][0].params for i in picked]
        factors = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                               dtype=logits.dtype, device=self.device)  # [P, 3]
        valid = torch.arange(width, device=self.device)[None, :] < n[:, None]  # [P, W]
        at, j = valid.nonzero(as_tuple=True)  # [E] each: the valid entries, row-major
        cols = self.seen[rows[at], j].long()  # [E] token ids
        counts = self.generated[rows[at], j]  # [E]
        rep, freq, pres = factors[at].unbind(dim=1)  # [E] each
        vals = logits[index[at], cols]  # [E]
        vals = torch.where(vals > 0, vals / rep, vals * rep) - counts * freq - (counts > 0) * pres
        logits[index[at], cols] = vals

    def _sync(self) -> None:
        """The new entries and counts so far to the device, in one upload."""
        (rows, js, tokens), (count_rows, count_js) = self._new, self._counts
        if not rows and not count_rows:
            return
        r, j, tok, cr, cj = (x.long() for x in self.uploader.upload(rows, js, tokens, count_rows, count_js))
        if rows:
            self.seen[r, j] = tok.to(self.seen.dtype)
        if count_rows:
            self.generated.index_put_((cr, cj), torch.ones(len(count_rows), device=self.device), accumulate=True)
        self._new, self._counts = ([], [], []), ([], [])

    def flush(self) -> None:
        """After a step: its new entries and counts to the device, then the rows closed in it given back."""
        self._sync()
        if self._closing:
            self._free.extend(self._closing)
            self._closing = []
