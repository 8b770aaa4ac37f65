"""How well draft heads guess, on the model's own greedy answers to TEST-split prompts (never trained on):
`apar eval-medusa`. The figures the engine's speed follows (docs/design.md, "Speculation"):

- top-1 per head, teacher-forced: head k's guess equals the model's own token k + 1 positions on, its
  inputs (hydra) the true tokens before it;
- chain top-1 per head: the chain as the engine runs it (each hydra head reading the guess before it)
  is right up to and including head k;
- per (K, cut): drafted tokens per position (the chain cut before a control token, at the first head
  below the confidence cut, and at K) and accepted tokens per position (its leading tokens equal to the
  model's own), with the estimate of the speed-up at concurrency 1 on the CPU: a step gives 1 + accepted
  tokens for a cost of 1 + ROW_COST x drafted (one thread's step ~80 ms, each drafted row ~3.3 ms more).

Positions are those the engine drafts after: a thread's pending token is not a control token, and the
thread goes on after it.
"""
from __future__ import annotations

import torch

from apar.data.packing import IGNORE
from apar.engine.medusa import MedusaDrafter
from apar.train.medusa_data import Reading

ROW_COST = 3.3 / 80  # a drafted row's share of a one-thread step on the CPU (docs/benchmarks.md)
CUTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@torch.inference_mode()
def measure(drafter: MedusaDrafter, reading: Reading, stop_ids, cuts=CUTS, chunk: int = 2048) -> dict:
    """The module's figures for `drafter`'s heads on `reading`."""
    k = drafter.num_heads
    stops = torch.tensor(sorted(stop_ids) or [-1])
    rows = torch.nonzero(reading.start & (reading.nxt >= 0) & ~torch.isin(reading.follow, stops)).flatten()
    hits, counts, chain_hits = torch.zeros(k), torch.zeros(k), torch.zeros(k)
    drafted = {(kk, c): 0.0 for kk in range(1, k + 1) for c in cuts}
    accepted = dict(drafted)
    heads, dtype = drafter.heads, drafter.table.dtype
    for i in range(0, len(rows), chunk):
        r = rows[i:i + chunk]
        inputs, targets = reading.heads_io(k, r)  # [R, K] each
        h = reading.hidden[r].to(dtype)
        # teacher-forced top-1
        e = None if drafter.embed is None else drafter.embed[inputs].to(dtype)  # [R, K, H]
        forced = drafter._local((heads(h, e) @ drafter.table.T).argmax(-1))  # [R, K]
        valid = targets != IGNORE
        hits += ((forced == targets) & valid).sum(0).float()
        counts += valid.sum(0).float()
        # the chain as the engine runs it
        toks, conf = drafter.chain(h, reading.follow[r])  # [R, K]
        right = (toks == targets).int().cumprod(dim=-1)  # [R, K] 1 while every guess so far is right
        chain_hits += right.sum(0).float()
        free = (~torch.isin(toks, stops)).int().cumprod(dim=-1)  # before the first control token
        for c in cuts:
            sure = (conf >= c).int().cumprod(dim=-1) * free  # [R, K]
            for kk in range(1, k + 1):
                drafted[(kk, c)] += float(sure[:, :kk].sum())
                accepted[(kk, c)] += float((sure[:, :kk] * right[:, :kk]).sum())
    n = max(1, len(rows))
    table = []
    for (kk, c), d in drafted.items():
        a = accepted[(kk, c)] / n
        table.append({"k": kk, "cut": c, "drafted": round(d / n, 3), "accepted": round(a, 3),
                      "speedup": round((1 + a) / (1 + ROW_COST * d / n), 3)})
    return {"positions": len(rows), "top1": [round(x, 4) for x in (hits / counts.clamp(min=1)).tolist()],
            "chain_top1": [round(x, 4) for x in (chain_hits / n).tolist()], "table": table}


def report(result: dict, min_confidence: float, k: int) -> str:
    """A few lines: top-1 per head, then per K the drafted and accepted tokens and the speed-up estimate
    by cut, the engine's setting marked."""
    top1, chain = (" ".join(f"{x:.2f}" for x in result[key]) for key in ("top1", "chain_top1"))
    lines = [f"{result['positions']} positions; top-1 per head (teacher-forced) {top1}; chain {chain}",
             "K  cut   drafted/pos accepted/pos accepted/drafted est.speed-up"]
    for row in result["table"]:
        mark = " <- engine" if row["k"] == k and abs(row["cut"] - min_confidence) < 1e-9 else ""
        share = row["accepted"] / row["drafted"] if row["drafted"] else 0.0
        lines.append(f"{row['k']}  {row['cut']:.1f}   {row['drafted']:10.3f} {row['accepted']:12.3f} "
                     f"{share:16.2f} {row['speedup']:12.3f}{mark}")
    return "\n".join(lines)
