"""What the draft heads learn from and are measured on (apar/train/medusa.py): a `Reading`, the frozen
model's final hidden state at positions of threads, each with the token that follows it in its thread
and the model's own next token there.

Two sources:
- `read_records`: training-split `TreeRecord`s, each tree tokenized and packed as the APAR trainer packs
  it (apar/data/packing.py: one sequence per tree, every token seeing only its own path) and read by ONE
  forward of the frozen model per batch: the tokens are the data's, the model's own next token its argmax.
- `read_answers`: the model's own greedy APAR answers to prompts, written by the engine in batches
  (threads, forks and all); the engine's hidden rows are kept as they are made (`Recorder`, in the place
  of a drafter), so no second forward is needed. There the token that follows a position IS the model's
  own next token: the heads learn (and are measured on) exactly what the engine will check them against.

A row r: hidden[r] ([H], the hidden state at a position t), follow[r] (the token at t + 1 in the thread:
in the engine, the pending token when the heads run), argmax[r] (the model's own token after t), nxt[r]
(the row of position t + 1 of the same thread, -1 when none was kept or t + 1 holds EOS), start[r]
(whether heads are trained or measured from this row). Head k at row r reads the chain r_0 = r,
r_j = nxt[r_{j-1}]: its input token follow[r_{k-1}], its target argmax[r_k].
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from apar.data.packing import IGNORE, ControlIds, collate, pack, tokenize_tree
from apar.data.pipeline import TreeRecord
from apar.data.tree import CHILD, FORK, linear, restore
from apar.engine.errors import UserError


@dataclass
class Reading:
    hidden: torch.Tensor  # [P, H]
    follow: torch.Tensor  # [P] long
    argmax: torch.Tensor  # [P] long
    nxt: torch.Tensor  # [P] long, -1: none
    start: torch.Tensor  # [P] bool

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def chains(self, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[R, k + 1]: each row's chain r_0..r_k (-1 from where the thread has no more rows)."""
        r = torch.arange(len(self)) if rows is None else rows
        out = [r]
        for _ in range(k):
            prev = out[-1]
            out.append(torch.where(prev >= 0, self.nxt[prev.clamp(min=0)], -1))
        return torch.stack(out, dim=1)

    def heads_io(self, k: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For `rows` ([R]): (inputs [R, K] head k's input token follow[r_{k-1}], targets [R, K]
        argmax[r_k] or IGNORE where the thread has no position k further)."""
        ch = self.chains(k, rows)  # [R, K + 1]
        ok = ch >= 0
        inputs = torch.where(ok[:, :-1], self.follow[ch[:, :-1].clamp(min=0)], 0)
        targets = torch.where(ok[:, 1:], self.argmax[ch[:, 1:].clamp(min=0)], IGNORE)
        return inputs, targets

    def seen(self) -> set[int]:
        return set(self.follow.tolist()) | set(self.argmax.tolist())

    @staticmethod
    def cat(parts: Sequence[Reading]) -> Reading:
        offset, nxts = 0, []
        for p in parts:
            nxts.append(torch.where(p.nxt >= 0, p.nxt + offset, -1))
            offset += len(p)
        return Reading(torch.cat([p.hidden for p in parts]), torch.cat([p.follow for p in parts]),
                       torch.cat([p.argmax for p in parts]), torch.cat(nxts), torch.cat([p.start for p in parts]))

    def save(self, path: Path, key: dict) -> None:
        torch.save({"key": key, "hidden": self.hidden, "follow": self.follow, "argmax": self.argmax,
                    "nxt": self.nxt, "start": self.start}, path)

    @staticmethod
    def load(path: Path | None, key: dict) -> Reading | None:
        """The reading cached in `path` for exactly `key`, else None."""
        if path is None or not path.is_file():
            return None
        kept = torch.load(path)
        if kept.get("key") != key:
            return None
        return Reading(kept["hidden"], kept["follow"], kept["argmax"], kept["nxt"], kept["start"])


def from_threads(threads: Sequence[tuple[torch.Tensor, Sequence[int], Sequence[int]]], eos: Sequence[int]) -> Reading:
    """A reading of whole threads: each (hidden [n, H] at its positions, follow [n], argmax [n]); every
    row starts a chain, and a row whose follow is EOS ends its thread."""
    ends = set(eos)
    hidden, follow, argmax, nxt = [], [], [], []
    offset = 0
    for h, f, a in threads:
        n = h.shape[0]
        hidden.append(h)
        follow += list(f)
        argmax += list(a)
        nxt += [offset + i + 1 if i + 1 < n and f[i] not in ends else -1 for i in range(n)]
        offset += n
    if not hidden:
        raise UserError("no positions to read")
    return Reading(torch.cat(hidden), torch.tensor(follow), torch.tensor(argmax), torch.tensor(nxt),
                   torch.ones(offset, dtype=torch.bool))


def control_ids(tokenizer, fork: str = FORK, child: str = CHILD) -> tuple[ControlIds, bool]:
    """The control ids, and whether the model reads linear text (it has no control tokens)."""
    try:
        return ControlIds.from_tokenizer(tokenizer, fork, child), False
    except UserError:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise
        return ControlIds(-1, -2, int(eos), fork, child), True


@torch.no_grad()
def read_records(model, tokenizer, records: list[TreeRecord], max_length: int, fork: str = FORK,
                 child: str = CHILD, batch_size: int = 4) -> Reading:
    """The frozen model over the records' packed trees (the module's docstring): one row per position
    that predicts a response token. A model without the control tokens reads the restored linear text."""
    control, flat = control_ids(tokenizer, fork, child)
    examples = []
    for record in records:
        tree = linear(restore(record.tree)) if flat else record.tree
        examples.append(pack(tokenize_tree(record.prompt, tree, tokenizer, control), control, max_length))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else control.eos
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    parts = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = collate(chunk, pad)
        out = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=batch["attention_mask"]).last_hidden_state  # [B, L, H]
        for b, ex in enumerate(chunk):
            n = len(ex)
            keep = [u for u in range(n) if ex.labels[u] != IGNORE]
            if not keep:
                continue
            row_of = {u: j for j, u in enumerate(keep)}
            succ = [-1] * n  # the next packed index of the same thread
            for u in range(1, n):
                if ex.previous[u] == u - 1:
                    succ[u - 1] = u
            h = out[b, keep]  # [R, H]
            follow = [ex.labels[u] for u in keep]  # the data's token after u in its thread
            nxt = [row_of.get(succ[u], -1) if ex.labels[u] != control.eos else -1 for u in keep]
            parts.append(Reading(h.clone(), torch.tensor(follow), head(h).argmax(dim=-1), torch.tensor(nxt),
                                 torch.ones(len(keep), dtype=torch.bool)))
    if not parts:
        raise UserError("no training positions: the records are too short for the heads")
    return Reading.cat(parts)


class Recorder:
    """Stands in for the engine's drafter (it drafts nothing): after every step `Speculation._propose`
    hands it each running thread's verified run (`ByThread.propose`): every hidden row with the token
    it gave, kept here by thread with the context length that token ends."""

    by_thread = True

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], list[tuple[int, int, torch.Tensor]]] = {}

    def propose(self, keys, lengths, hidden, tokens, counts) -> None:
        at = 0
        for key, length, n in zip(keys, lengths, counts):
            for j in range(n):
                self.rows.setdefault(key, []).append((length - n + 1 + j, tokens[at + j],
                                                      hidden[at + j].detach().float().clone()))
            at += n

    def skip(self, keys, lengths, hidden, tokens, counts) -> None:  # a paused step is recorded all the same
        self.propose(keys, lengths, hidden, tokens, counts)

    def proposal(self, key, length, k) -> list[int]:
        return []

    def draft(self, context, k) -> list[int]:
        return []


@torch.no_grad()
def read_answers(model_dir: Path, prompts: list[list[int]], max_tokens: int, concurrency: int = 32,
                 fork: str = FORK, child: str = CHILD, log=print) -> Reading:
    """The model's own greedy APAR answers to `prompts` (token ids), `concurrency` requests at a time,
    read as the engine writes them (the module's docstring)."""
    from apar.engine.config import ControlTokens, EngineConfig
    from apar.engine.engine import Engine
    from apar.engine.events import RequestFinished
    from apar.engine.params import SamplingParams

    eng = Engine(model_dir, EngineConfig(control=ControlTokens(fork=fork, child=child)))
    recorder = Recorder()
    eng.drafter = recorder
    eng.runner.keep_hidden()
    params = SamplingParams(max_tokens=max_tokens, auto_parallel=eng.auto_parallel)
    queue = list(prompts)
    active = 0
    while queue or eng.has_work():
        while queue and active < concurrency:
            eng.add_request(queue.pop(0), params)
            active += 1
        res = eng.step()
        active -= sum(1 for ev in res.events if isinstance(ev, RequestFinished))
    threads = []
    for key in sorted(recorder.rows):
        by_length = {length: (tok, h) for length, tok, h in recorder.rows[key]}  # (a recomputed row: once)
        run: list[int] = []
        for length in sorted(by_length) + [-1]:  # runs of consecutive context lengths
            if run and length != run[-1] + 1:
                toks = [by_length[n][0] for n in run]
                threads.append((torch.stack([by_length[n][1] for n in run]), toks, toks))
                run = []
            run.append(length)
    reading = from_threads(threads, sorted(eng.eos_ids))
    log(f"{len(reading)} positions in {len(recorder.rows)} threads of {len(prompts)} greedy answers")
    return reading
