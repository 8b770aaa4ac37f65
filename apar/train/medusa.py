"""Medusa heads trained by self-distillation on a frozen model (`apar train-medusa`; the heads and how the
engine drafts with them: apar/engine/medusa.py).

Data flow: training-split `TreeRecord`s -> each tree tokenized and packed as the APAR trainer packs it
(apar/data/packing.py: one sequence per tree, every token seeing only its own path) -> ONE forward of the
frozen model per batch, no gradient: the final hidden state h_u and the model's own argmax a_u at every
position u -> the targets: head k at u learns a at the position k steps further along u's thread (the
model's own guess at the token k + 1 after u, the token a draft would be checked against) -> only the
heads are trained, cross-entropy through the model's own (frozen) LM head, restricted to the vocabulary of
the data and of the targets (saved with the heads; the engine guesses within it).

Positions are those that predict a response token (as the trainer's labels), on threads long enough for
the head's target; a target past a thread's end (its EOS) does not exist and is left out.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from apar.data.packing import IGNORE, ControlIds, collate, pack, tokenize_tree
from apar.data.pipeline import TreeRecord
from apar.data.tree import CHILD, FORK, linear, restore
from apar.engine.errors import UserError
from apar.engine.medusa import MedusaHeads, save_heads


def _successors(previous: list[int]) -> list[int]:
    """For each packed index the next index of the same thread (-1: none)."""
    nxt = [-1] * len(previous)
    for u in range(1, len(previous)):
        if previous[u] == u - 1:
            nxt[u - 1] = u
    return nxt


@torch.no_grad()
def distill_targets(model, tokenizer, records: list[TreeRecord], num_heads: int, max_length: int,
                    fork: str = FORK, child: str = CHILD, batch_size: int = 4
                    ) -> tuple[torch.Tensor, torch.Tensor, set[int]]:
    """The frozen model over the records' packed trees: (hidden [P, H], targets [P, K] with IGNORE where
    a head has no target, the token ids seen). A model without the control tokens reads the restored
    linear text."""
    try:
        control = ControlIds.from_tokenizer(tokenizer, fork, child)
        flat = False
    except UserError:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise
        control = ControlIds(-1, -2, int(eos), fork, child)
        flat = True
    examples = []
    for record in records:
        tree = linear(restore(record.tree)) if flat else record.tree
        examples.append(pack(tokenize_tree(record.prompt, tree, tokenizer, control), control, max_length))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else control.eos
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden_rows, target_rows, seen = [], [], set()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = collate(chunk, pad)
        out = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=batch["attention_mask"]).last_hidden_state  # [B, L, H]
        for b, ex in enumerate(chunk):
            n = len(ex)
            h = out[b, :n]  # [n, H]
            guess = head(h).argmax(dim=-1).tolist()  # [n]: the model's own next token at each position
            seen.update(ex.input_ids)
            seen.update(guess)
            nxt = _successors(ex.previous)
            keep, targets = [], []
            for u in range(n):
                if ex.labels[u] == IGNORE:
                    continue
                row, v = [], u
                for _ in range(num_heads):
                    v = nxt[v] if v >= 0 else -1
                    if v >= 0 and ex.input_ids[v] == control.eos:
                        v = -1  # the thread ended: nothing follows
                    row.append(guess[v] if v >= 0 else IGNORE)
                if row[0] != IGNORE:
                    keep.append(u)
                    targets.append(row)
            if keep:
                hidden_rows.append(h[keep].clone())
                target_rows.append(torch.tensor(targets, dtype=torch.long))
    if not hidden_rows:
        raise UserError("no training positions: the records are too short for the heads")
    return torch.cat(hidden_rows), torch.cat(target_rows), seen


def train_heads(hidden: torch.Tensor, targets: torch.Tensor, table: torch.Tensor, vocab: list[int],
                epochs: int = 3, batch_size: int = 512, lr: float = 1e-3, seed: int = 0,
                log=print) -> tuple[MedusaHeads, list[float]]:
    """Fit K heads: hidden [P, H], targets [P, K] (token ids or IGNORE), table [V, H] the frozen LM head,
    `vocab` the ids the softmax runs over (every target among them). Returns the heads and each head's
    top-1 agreement with its targets on the last epoch."""
    torch.manual_seed(seed)
    k = targets.shape[1]
    heads = MedusaHeads(hidden.shape[1], k)
    index = {tok: j for j, tok in enumerate(vocab)}
    local = targets.clone()
    flat = local.view(-1)
    for j, tok in enumerate(flat.tolist()):
        if tok != IGNORE:
            flat[j] = index[tok]
    sub = table.detach().index_select(0, torch.tensor(vocab)).contiguous()  # [V', H]
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    order = list(range(hidden.shape[0]))
    rng = random.Random(seed)
    steps = epochs * ((len(order) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.05, 1.0 - s / max(1, steps)))
    acc = [0.0] * k
    for epoch in range(epochs):
        rng.shuffle(order)
        hits, counts, total = torch.zeros(k), torch.zeros(k), 0.0
        for i in range(0, len(order), batch_size):
            rows = torch.tensor(order[i:i + batch_size])
            h, y = hidden[rows], local[rows]  # [B, H], [B, K]
            logits = heads(h) @ sub.T  # [B, K, V']
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                     ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(rows)
            with torch.no_grad():
                valid = y != IGNORE
                hits += ((logits.argmax(-1) == y) & valid).sum(0).float()
                counts += valid.sum(0).float()
        acc = (hits / counts.clamp(min=1)).tolist()
        log(f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.3f}, top-1 per head "
            + " ".join(f"{a:.2f}" for a in acc))
    return heads, acc


def train_medusa(model_dir: Path, records: list[TreeRecord], out: Path, num_heads: int = 4,
                 max_records: int = 64, max_length: int = 512, epochs: int = 3, batch_size: int = 512,
                 lr: float = 1e-3, seed: int = 0, fork: str = FORK, child: str = CHILD, log=print,
                 cache: Path | None = None) -> dict:
    """Heads for the model in `model_dir`, written to `out` (the module's docstring); a summary. `cache`:
    a file keeping the frozen model's reading (hidden states, targets, vocabulary) for later runs of the
    same model, records and head count: read when it exists, written otherwise."""
    from apar.train.trainer import load_model

    if num_heads < 1:
        raise UserError("--heads must be at least 1")
    if max_records < 1 or epochs < 1 or batch_size < 1 or max_length < 16:
        raise UserError("--records, --epochs and --batch-size must be positive, --max-length at least 16")
    train = [r for r in records if r.split == "train"]
    if not train:
        raise UserError("the data has no training-split records")
    random.Random(seed).shuffle(train)
    train = train[:max_records]
    started = time.monotonic()
    model, tokenizer = load_model(model_dir)
    model.eval().requires_grad_(False)
    key = {"model": str(Path(model_dir).resolve()), "records": [r.prompt for r in train], "heads": num_heads,
           "max_length": max_length}
    if cache is not None and cache.is_file() and torch.load(cache)["key"] == key:
        kept = torch.load(cache)
        hidden, targets, seen = kept["hidden"], kept["targets"], set(kept["seen"])
    else:
        hidden, targets, seen = distill_targets(model, tokenizer, train, num_heads, max_length, fork, child)
        if cache is not None:
            torch.save({"key": key, "hidden": hidden, "targets": targets, "seen": sorted(seen)}, cache)
    read = time.monotonic() - started
    log(f"{hidden.shape[0]} positions from {len(train)} trees in {read:.0f} s (the model frozen)")
    table = model.get_output_embeddings().weight  # [V, H]
    vocab = sorted(t for t in seen if 0 <= t < table.shape[0])
    heads, acc = train_heads(hidden, targets, table, vocab, epochs, batch_size, lr, seed, log)
    summary = {"base_model": str(model_dir), "records": len(train), "positions": int(hidden.shape[0]),
               "vocab": len(vocab), "epochs": epochs, "lr": lr, "max_length": max_length, "seed": seed,
               "top1_per_head": [round(a, 4) for a in acc], "seconds": round(time.monotonic() - started, 1)}
    save_heads(out, heads, vocab, {"trained": summary})
    return summary


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2)
