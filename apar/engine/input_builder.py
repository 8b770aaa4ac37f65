"""From the step's work to the backend-neutral `ModelInputs`: the flat batch and where each context is.

Data flow: the scheduler plans `Work` (thread, n tokens), the engine allocates their slots in the ledger
and pushes them into the context table (`ContextTable.push`, `fork`); `build` then walks the work once,
in plan order, and lays out the flat batch: token ids, positions, the slots their K/V goes to, which
rows sample, and per thread its table row and context length (single-token threads as `DecodeQueries`,
longer ones as `ChunkQuery`s). The table's pending updates and all these ints reach the device in one
upload each. Per-step host work is proportional to the tokens computed, never to the contexts' lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

from apar.engine.backends.base import ChunkQuery, DecodeQueries, ModelInputs, Run
from apar.engine.context_table import ContextTable
from apar.engine.scheduler import Work
from apar.engine.sequence import Request, Thread


def context_runs(t: Thread, length: int) -> tuple[Run, ...]:
    """Thread t's context of `length` positions as runs by writer, root first: each ancestor's
    positions up to where the path to t leaves it, then t's own."""
    runs = [Run(id(t), t.start_pos, length)]
    child = t
    while child.parent is not None:
        parent = child.parent
        runs.append(Run(id(parent), parent.start_pos, child.start_pos))
        child = parent
    return tuple(reversed(runs))


@dataclass(slots=True)
class DraftRows:
    """A draft to verify: its thread is `samplers[sampler]`, whose sampled row gives the logits after its
    pending token; the logits after each draft token are rows `first_row ..` of the step's logits."""

    sampler: int
    draft: tuple[int, ...]
    first_row: int
    replay_state: tuple | None = None  # a replayed thread's cursor before its draft was checked
    replay_read: int = 0  # the known tokens read past its first one, checking the draft


class InputBuilder:
    def __init__(self, contexts: ContextTable) -> None:
        self.contexts = contexts

    def build(self, work: list[Work], with_runs: bool) -> tuple[ModelInputs, list[tuple[Request, Thread]],
                                                                 list[DraftRows]]:
        """The model inputs (before the engine counts the tokens as computed), in row order the
        (request, thread) of each sampled row, and the drafts to verify. `with_runs`: the backend groups
        threads by their runs. A thread with a draft computes its pending token and the draft as one
        chunk; its first logits row is its sampled row, the draft's rows come after every sampled row."""
        ids: list[int] = []
        positions: list[int] = []
        writes: list[int] = []
        d_rows: list[int] = []
        d_table: list[int] = []
        d_lens: list[int] = []
        families: list[int] = []
        runs: list[tuple[Run, ...]] = []
        chunks: list[ChunkQuery] = []
        sample_rows: list[int] = []
        samplers: list[tuple[Request, Thread]] = []
        draft_rows: list[int] = []
        drafts: list[DraftRows] = []
        ahead: dict[int, int] = {}  # a thread with several chunks in this step: tokens laid out so far
        for w in work:
            t, n, m = w.thread, w.n, w.tokens
            row = len(ids)
            first = t.computed + ahead.get(id(t), 0)
            ahead[id(t)] = first + n - t.computed
            ids.extend(t.tokens(first, first + n))
            ids.extend(w.draft)
            pos0 = t.start_pos + first
            positions.extend(range(pos0, pos0 + m))
            ctx = t.ctx
            if len(ctx.new_slots) < m:
                raise RuntimeError(f"thread {t.id} got {len(ctx.new_slots)} slots for {m} tokens")
            writes.extend(ctx.new_slots[:m])
            del ctx.new_slots[:m]
            if m == 1:
                d_rows.append(row)
                d_table.append(ctx.row)
                d_lens.append(pos0 + 1)
                families.append(id(w.request))
                if with_runs:
                    runs.append(context_runs(t, pos0 + 1))
            else:
                chunks.append(ChunkQuery(row, m, ctx.row, pos0 + m))
            if t.running and t.n_tokens == first + n:  # its last pending token: it samples from this row
                sample_rows.append(row + n - 1)
                samplers.append((w.request, t))
                if w.draft:
                    drafts.append(DraftRows(len(samplers) - 1, w.draft, len(draft_rows)))
                    draft_rows.extend(range(row + n, row + m))
        for d in drafts:  # (their rows follow the sampled ones)
            d.first_row += len(sample_rows)
        sample_rows += draft_rows
        self.contexts.flush()
        ids_t, pos_t, writes_t, rows_t, table_t, lens_t, sample_t = self.contexts.uploader.upload(
            ids, positions, writes, d_rows, d_table, d_lens, sample_rows)
        decode = None
        if d_rows:
            decode = DecodeQueries(rows_t, table_t, lens_t, d_rows, d_table, d_lens, families, runs)
        step = ModelInputs(ids_t, pos_t, writes_t.long(), sample_t.long(), decode, chunks, self.contexts)
        return step, samplers, drafts
