"""The EAGLE-style drafter trained by self-distillation (`apar train-medusa --kind eagle`; the layer and
how the engine drafts with it: apar/engine/eagle.py).

Data flow: a `Reading` (apar/train/medusa_data.py: the frozen model's final hidden state at every
position of every thread, the token it gave, the model's own next token) -> its threads as sequences
(the rows chained by `nxt`) -> the layer runs each thread as the engine's drafting does
(`EagleHeads.unrolled`: the true pairs up to a position, then its own guesses fed back with the
tokens that follow) -> at depth d, index j: cross-entropy of the frozen LM head (restricted to the
reading's vocabulary) on the guess against the model's own token at j + 1, plus `feature_loss` times a
smooth L1 pull of the guess towards the model's hidden state at j + 1. A share of the threads is held
out; the weights of the epoch that drafts best on them are kept.
"""
from __future__ import annotations

import copy
import random

import torch

from apar.data.packing import IGNORE
from apar.engine.eagle import EagleHeads
from apar.engine.errors import UserError
from apar.train.medusa_data import Reading
from apar.train.medusa_eval import CUTS, ROW_COST


def threads_of(reading: Reading) -> list[torch.Tensor]:
    """The reading's threads: each the rows of consecutive positions of one thread, in order."""
    nxt = reading.nxt
    has_pred = torch.zeros(len(reading), dtype=torch.bool)
    has_pred[nxt[nxt >= 0]] = True
    out = []
    nxt_list = nxt.tolist()
    for r in torch.nonzero(~has_pred).flatten().tolist():
        chain = [r]
        while nxt_list[chain[-1]] >= 0:
            chain.append(nxt_list[chain[-1]])
        out.append(torch.tensor(chain))
    return out


def _batches(threads: list[torch.Tensor], tokens: int, rng: random.Random | None) -> list[list[torch.Tensor]]:
    """Threads grouped by length into batches of about `tokens` padded positions (shuffled with `rng`)."""
    order = sorted(threads, key=len)
    out, cur = [], []
    for t in order:
        if cur and (len(cur) + 1) * len(t) > tokens:
            out.append(cur)
            cur = []
        cur.append(t)
    if cur:
        out.append(cur)
    if rng is not None:
        rng.shuffle(out)
    return out


def _step_io(reading: Reading, batch: list[torch.Tensor], emb: torch.Tensor, local_of: torch.Tensor):
    """Padded tensors of a batch: f [B, L, H], e [B, L, H], valid [B, L], targets [B, L] (the local id of
    the model's token after index j + 1, IGNORE where none), want [B, L] (the row of index j + 1, -1)."""
    B, L = len(batch), max(len(t) for t in batch)
    rows = torch.full((B, L), -1, dtype=torch.long)
    for b, t in enumerate(batch):
        rows[b, : len(t)] = t
    valid = rows >= 0
    r = rows.clamp(min=0)
    f = reading.hidden[r] * valid[..., None]
    e = emb[reading.follow[r]] * valid[..., None]
    nxt_row = torch.cat([rows[:, 1:], torch.full((B, 1), -1, dtype=torch.long)], dim=1)  # index j + 1
    ok = nxt_row >= 0
    targets = torch.where(ok, local_of[reading.argmax[nxt_row.clamp(min=0)]], IGNORE)
    return f, e, valid, targets, nxt_row


def _accuracy(heads: EagleHeads, reading: Reading, threads: list[torch.Tensor], emb, sub, local_of,
              depth: int, cuts: tuple[float, ...] = ()) -> tuple[list[float], float, dict]:
    """Teacher-forced top-1 per depth; the tokens a chain of `depth` drafts would have accepted per
    position (each position as a tip; a draft token holds while every one before it held); and per
    (K, cut) the drafted and accepted tokens per position with the chain cut at the first token below
    the cut (its confidences read teacher-forced: exact up to the first wrong token, after which nothing
    is accepted). Also the chain top-1 per depth."""
    hits, counts, chain = torch.zeros(depth), torch.zeros(depth), torch.zeros(depth)
    drafted = {(k, c): 0.0 for k in range(1, depth + 1) for c in cuts}
    accepted_at = dict(drafted)
    positions = 0
    with torch.no_grad():
        for batch in _batches(threads, 8192, None):
            f, e, valid, targets, _ = _step_io(reading, batch, emb, local_of)
            outs = heads.unrolled(f.to(sub.dtype), e.to(sub.dtype), valid, depth)
            L = f.shape[1]
            right, conf = [], []
            for d, out in enumerate(outs):
                y = targets.clone()
                y[:, :d] = IGNORE
                ok = y != IGNORE
                p, idx = (out @ sub.T).float().softmax(-1).max(-1)
                r = (idx == y) & ok
                hits[d] += r.sum()
                counts[d] += ok.sum()
                right.append(r)
                conf.append(p)
            tips = targets != IGNORE  # [B, L] positions with a next token
            run = tips.clone()
            held, sure = [], []
            for d in range(depth):  # tip j: depth d + 1 checked at index j + d
                at_r, at_c = torch.zeros_like(run), torch.zeros_like(conf[d])
                at_r[:, : L - d], at_c[:, : L - d] = right[d][:, d:], conf[d][:, d:]
                run = run & at_r
                chain[d] += run.sum()
                held.append(run.clone())
                sure.append(at_c)
            for c in cuts:
                keep = tips.clone()
                for d in range(depth):
                    keep = keep & (sure[d] >= c)
                    for k in range(d + 1, depth + 1):
                        drafted[(k, c)] += float(keep.sum())
                        accepted_at[(k, c)] += float((keep & held[d]).sum())
            positions += int(tips.sum())
    n = max(1, positions)
    table = [{"k": k, "cut": c, "drafted": round(drafted[(k, c)] / n, 3), "accepted": round(accepted_at[(k, c)] / n, 3),
              "speedup": round((1 + accepted_at[(k, c)] / n) / (1 + ROW_COST * drafted[(k, c)] / n), 3)}
             for (k, c) in drafted]
    result = {"positions": positions, "top1": [round(x, 4) for x in (hits / counts.clamp(min=1)).tolist()],
              "chain_top1": [round(x, 4) for x in (chain / n).tolist()], "table": table}
    return (hits / counts.clamp(min=1)).tolist(), float(chain.sum()) / n, result


def train_eagle(reading: Reading, table: torch.Tensor, embed: torch.Tensor, vocab: list[int], num_heads: int = 4,
                epochs: int = 8, tokens_per_batch: int = 256, lr: float = 2e-3, seed: int = 0,
                feature_loss: float = 0.1, held_out: float = 0.05, depth: int = 2,
                log=print) -> tuple[EagleHeads, dict]:
    """Fit the layer (the module's docstring), unrolled to `depth` drafts (the later ones run the same
    weights on their own guesses; each needs every one before it to hold, so they weigh less). Returns
    it and a summary: per epoch the held-out top-1 per depth and accepted tokens per position."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    threads = [t for t in threads_of(reading) if len(t) >= 2]
    if len(threads) < 2:
        raise UserError("no training positions: the threads are too short for the eagle heads")
    rng.shuffle(threads)
    n_val = max(1, int(len(threads) * held_out)) if held_out > 0 else 0
    val, train = threads[:n_val], threads[n_val:]  # without a held-out share: measured on what it learns
    heads = EagleHeads(reading.hidden.shape[1], num_heads)
    local_of = torch.full((max(max(vocab), int(reading.argmax.max())) + 1,), IGNORE, dtype=torch.long)
    local_of[torch.tensor(vocab)] = torch.arange(len(vocab))
    sub = table.detach().index_select(0, torch.tensor(vocab)).contiguous()  # [V', H]
    emb = embed.detach()
    depth = max(1, min(depth, num_heads))
    weights = [1.0 / (d + 1) for d in range(depth)]  # later drafts matter less: each needs the ones before
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.01)
    n_batches = len(_batches(train, tokens_per_batch, None))
    steps = epochs * n_batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1.0 - s / max(1, steps)))
    best, best_state, history = -1.0, None, []
    for epoch in range(epochs):
        heads.train()
        total, seen = 0.0, 0
        for batch in _batches(train, tokens_per_batch, rng):
            f, e, valid, targets, nxt_row = _step_io(reading, batch, emb, local_of)
            outs = heads.unrolled(f, e, valid, depth)
            want = reading.hidden[nxt_row.clamp(min=0)]  # [B, L, H]
            loss = 0.0
            for d, out in enumerate(outs):
                y = targets.clone()
                y[:, :d] = IGNORE  # no true pair for the chain to start from
                ok = y != IGNORE
                if not bool(ok.any()):
                    continue
                ce = torch.nn.functional.cross_entropy(out[ok] @ sub.T, y[ok])
                reg = torch.nn.functional.smooth_l1_loss(out[ok], want[ok])
                loss = loss + weights[d] * (ce + feature_loss * reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach())
            seen += 1
        heads.eval()
        acc, per_pos, _ = _accuracy(heads, reading, val or train, emb, sub, local_of, num_heads)
        history.append({"epoch": epoch + 1, "loss": round(total / max(1, seen), 4),
                        "held_out_top1": [round(a, 4) for a in acc], "held_out_accepted_per_position": round(per_pos, 4)})
        log(f"epoch {epoch + 1}/{epochs}: loss {total / max(1, seen):.3f}, held-out top-1 per depth "
            + " ".join(f"{a:.2f}" for a in acc) + f", accepted a position {per_pos:.3f}")
        if per_pos > best:
            best, best_state = per_pos, copy.deepcopy(heads.state_dict())
    heads.load_state_dict(best_state)
    return heads, {"epochs": history, "best_accepted_per_position": round(best, 4),
                   "threads": len(train), "held_out_threads": len(val)}


def measure_eagle(heads: EagleHeads, reading: Reading, table: torch.Tensor, embed: torch.Tensor,
                  vocab: list[int]) -> dict:
    """The figures of `apar eval-medusa` (apar/train/medusa_eval.py) for the layer, on a whole reading (the
    model's own answers to test-split prompts); the vocabulary restricted as in the engine (a token
    outside it counts as missed)."""
    local_of = torch.full((max(max(vocab), int(reading.argmax.max())) + 1,), -2, dtype=torch.long)
    local_of[torch.tensor(vocab)] = torch.arange(len(vocab))
    sub = table.detach().index_select(0, torch.tensor(vocab)).contiguous()
    heads.eval()
    _, _, result = _accuracy(heads, reading, threads_of(reading), embed.detach(), sub, local_of, heads.num_heads, CUTS)
    return result
