"""Draft heads trained by self-distillation on a frozen model (`apar train-medusa`; the heads and how the
engine drafts with them: apar/engine/medusa.py; what they read: apar/train/medusa_data.py).

Data flow: training-split prompts answered greedily by the model itself through the engine
(`--answers`), and/or training-split trees packed and read by the frozen model (`--records`) -> a
`Reading`: the final hidden state at every position of every thread, the token that follows it, the
model's own next token -> only the heads train: head k at row r learns the model's own token k + 1
positions after r (the token a draft is checked against), through the model's own (frozen) LM head
restricted to the vocabulary of the reading (saved with the heads; the engine guesses within it);
hydra heads read their input tokens teacher-forced (the tokens that follow in the thread, which in the
model's own answers are its own tokens). A target past a thread's end (its EOS) does not exist and is
left out.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from apar.data.packing import IGNORE
from apar.data.pipeline import TreeRecord
from apar.data.tree import CHILD, FORK
from apar.engine.errors import UserError
from apar.engine.medusa import KINDS, Heads, load_heads, make_heads, save_heads
from apar.train.medusa_data import Reading, control_ids, read_answers, read_records


def train_heads(reading: Reading, table: torch.Tensor, embed: torch.Tensor | None, vocab: list[int],
                kind: str = "hydra", num_heads: int = 4, blocks: int | None = None, epochs: int = 3,
                batch_size: int = 512, lr: float = 1e-3, seed: int = 0, log=print,
                feature_loss: float = 0.0) -> tuple[Heads, list[float]]:
    """Fit K heads of `kind` on the reading's starting rows: table [V, H] the frozen LM head, embed [V, H]
    the frozen input embeddings (hydra), `vocab` the ids the softmax runs over (every target among them).
    `feature_loss` > 0 (hydra, as EAGLE) adds that weight of a smooth L1 loss pulling head k's state
    z_k towards the model's own hidden state k positions on (the one whose LM head gives its target).
    Returns the heads and each head's top-1 agreement with its targets (teacher-forced) on the last epoch."""
    torch.manual_seed(seed)
    heads = make_heads(kind, reading.hidden.shape[1], num_heads, blocks)
    if kind == "hydra" and embed is None:
        raise UserError("hydra heads need the model's input embeddings")
    rows = torch.nonzero(reading.start & (reading.nxt >= 0)).flatten()
    if not len(rows):
        raise UserError("no training positions: the threads are too short for the heads")
    inputs, targets = reading.heads_io(num_heads, rows)  # [P, K], [P, K]
    later = reading.chains(num_heads, rows)[:, 1:]  # [P, K] the rows whose hidden state z_k stands for
    local_of = torch.full((max(max(vocab), int(targets.max())) + 1,), IGNORE, dtype=torch.long)
    local_of[torch.tensor(vocab)] = torch.arange(len(vocab))
    local = torch.where(targets != IGNORE, local_of[targets.clamp(min=0)], IGNORE)  # [P, K]
    if bool(((targets != IGNORE) & (local == IGNORE)).any()):
        raise UserError("a target lies outside the heads' vocabulary")
    sub = table.detach().index_select(0, torch.tensor(vocab)).contiguous()  # [V', H]
    emb = None if embed is None else embed.detach()
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    order = list(range(len(rows)))
    rng = random.Random(seed)
    steps = epochs * ((len(order) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.05, 1.0 - s / max(1, steps)))
    acc = [0.0] * num_heads
    for epoch in range(epochs):
        rng.shuffle(order)
        hits, counts, total = torch.zeros(num_heads), torch.zeros(num_heads), 0.0
        for i in range(0, len(order), batch_size):
            b = torch.tensor(order[i:i + batch_size])
            h, y = reading.hidden[rows[b]], local[b]  # [B, H], [B, K]
            e = None if kind != "hydra" else emb[inputs[b]]  # [B, K, H]
            z = heads(h, e)  # [B, K, H]
            logits = z @ sub.T  # [B, K, V']
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                     ignore_index=IGNORE)
            if feature_loss > 0:
                at = later[b]  # [B, K]
                ok = at >= 0
                want = reading.hidden[at.clamp(min=0)]  # [B, K, H]
                loss = loss + feature_loss * torch.nn.functional.smooth_l1_loss(z[ok], want[ok])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
            with torch.no_grad():
                valid = y != IGNORE
                hits += ((logits.argmax(-1) == y) & valid).sum(0).float()
                counts += valid.sum(0).float()
        acc = (hits / counts.clamp(min=1)).tolist()
        log(f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.3f}, top-1 per head "
            + " ".join(f"{a:.2f}" for a in acc))
    return heads, acc


def _sample_prompts(records: list[TreeRecord], split: str, count: int, seed: int) -> list[str]:
    """`count` distinct prompts of the split, a seeded sample (test: in first-seen order)."""
    prompts = list(dict.fromkeys(r.prompt for r in records if r.split == split))
    if split == "train":
        random.Random(seed).shuffle(prompts)
    return prompts[:count]


def answers_reading(model_dir: Path, tokenizer, prompts: list[str], max_tokens: int, cache: Path | None,
                    fork: str = FORK, child: str = CHILD, log=print) -> Reading:
    """The model's own greedy answers to `prompts` (apar/train/medusa_data.py: `read_answers`), cached in
    `cache` for the same model, prompts and length."""
    from apar.text.prompt import encode_prompt

    key = {"model": str(Path(model_dir).resolve()), "answers": prompts, "max_tokens": max_tokens}
    found = Reading.load(cache, key)
    if found is not None:
        return found
    reading = read_answers(model_dir, [encode_prompt(tokenizer, p) for p in prompts], max_tokens,
                           fork=fork, child=child, log=log)
    if cache is not None:
        reading.save(cache, key)
    return reading


def train_medusa(model_dir: Path, records: list[TreeRecord], out: Path, num_heads: int = 4, kind: str = "hydra",
                 blocks: int | None = None, answers: int = 64, answer_tokens: int = 256, max_records: int = 32,
                 max_length: int = 512, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                 fork: str = FORK, child: str = CHILD, log=print, cache: Path | None = None,
                 vocab_size: int | None = None, command: str | None = None) -> dict:
    """Heads for the model in `model_dir`, written to `out` (the module's docstring); a summary. `answers`
    training-split prompts answered by the model (up to `answer_tokens` each) and `max_records` packed
    training-split trees. `cache`: a file keeping the reading for later runs with the same model and
    data (read when it holds them, written otherwise). `command`: the command line, kept in the summary."""
    from apar.train.trainer import load_model

    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}")
    if num_heads < 1:
        raise UserError("--heads must be at least 1")
    if answers < 0 or max_records < 0 or answers + max_records == 0:
        raise UserError("--answers and --records must not be negative, and one of them positive")
    if vocab_size is not None and (kind != "eagle" or vocab_size < 1):
        raise UserError("--vocab is for --kind eagle, and positive")
    if epochs < 1 or batch_size < 1 or max_length < 16 or answer_tokens < 8:
        raise UserError("--epochs and --batch-size must be positive, --max-length at least 16, "
                        "--answer-tokens at least 8")
    train = [r for r in records if r.split == "train"]
    if not train:
        raise UserError("the data has no training-split records")
    random.Random(seed).shuffle(train)
    train = train[:max_records]
    prompts = _sample_prompts(records, "train", answers, seed)
    started = time.monotonic()
    model, tokenizer = load_model(model_dir)
    model.eval().requires_grad_(False)
    key = {"model": str(Path(model_dir).resolve()), "records": [r.prompt for r in train], "answers": prompts,
           "answer_tokens": answer_tokens, "max_length": max_length}
    reading = Reading.load(cache, key)
    if reading is None:
        parts = []
        if prompts:
            parts.append(read_answers(model_dir, _encode(tokenizer, prompts), answer_tokens, fork=fork, child=child,
                                      log=log))
        if train:
            parts.append(read_records(model, tokenizer, train, max_length, fork, child))
        reading = Reading.cat(parts)
        if cache is not None:
            reading.save(cache, key)
    read = time.monotonic() - started
    log(f"{len(reading)} positions from {len(prompts)} answers and {len(train)} trees in {read:.0f} s "
        f"(the model frozen)")
    table = model.get_output_embeddings().weight  # [V, H]
    embed = model.get_input_embeddings().weight  # [V, H]
    vocab = sorted(t for t in reading.seen() if 0 <= t < table.shape[0])
    if vocab_size:  # the eagle layer's guesses within the most frequent of the model's own tokens
        counts = torch.bincount(reading.argmax.clamp(min=0), minlength=table.shape[0])[: table.shape[0]]
        vocab = sorted(counts.argsort(descending=True)[: min(vocab_size, int((counts > 0).sum()))].tolist())
    extra: dict = {}
    if kind == "eagle":
        from apar.train.eagle import train_eagle

        heads, extra = train_eagle(reading, table, embed, vocab, num_heads, epochs, lr=lr, seed=seed, log=log,
                                   tokens_per_batch=2 * batch_size)
        acc = extra["epochs"][-1]["held_out_top1"]
    else:
        heads, acc = train_heads(reading, table, embed, vocab, kind, num_heads, blocks, epochs, batch_size, lr, seed,
                                 log)
    summary = {"base_model": str(model_dir), "kind": kind, "answers": len(prompts), "answer_tokens": answer_tokens,
               "vocab_size": vocab_size,
               "records": len(train), "positions": len(reading), "vocab": len(vocab), "epochs": epochs, "lr": lr,
               "max_length": max_length, "seed": seed, "top1_per_head": [round(a, 4) for a in acc],
               "seconds": round(time.monotonic() - started, 1), **extra}
    if command:
        summary["command"] = command
    save_heads(out, heads, vocab, {"trained": summary})
    return summary


def evaluate_medusa(model_dir: Path, records: list[TreeRecord], heads_dir: Path, prompts: int = 16,
                    max_tokens: int = 256, cache: Path | None = None, fork: str = FORK, child: str = CHILD,
                    log=print) -> tuple[dict, str]:
    """The heads in `heads_dir` measured on the model's own greedy answers to the first `prompts`
    test-split prompts (apar/train/medusa_eval.py): (figures, a report)."""
    from apar.engine.medusa import MIN_CONFIDENCE, MedusaDrafter
    from apar.train.medusa_eval import measure, report
    from apar.train.trainer import load_model

    texts = _sample_prompts(records, "test", prompts, 0)
    if not texts:
        raise UserError("the data has no test-split records")
    model, tokenizer = load_model(model_dir)
    model.eval().requires_grad_(False)
    control, _ = control_ids(tokenizer, fork, child)
    reading = answers_reading(model_dir, tokenizer, texts, max_tokens, cache, fork, child, log)
    stops = [t for t in (control.fork, control.child) if t >= 0]
    heads, vocab, _ = load_heads(heads_dir)
    if heads.kind == "eagle":  # the layer reads whole threads (apar/train/eagle.py)
        from apar.engine.eagle import MIN_CONFIDENCE as EAGLE_MIN_CONFIDENCE
        from apar.train.eagle import measure_eagle

        ids = vocab.tolist() if vocab is not None else list(range(model.get_output_embeddings().weight.shape[0]))
        result = measure_eagle(heads, reading, model.get_output_embeddings().weight, model.get_input_embeddings().weight,
                               ids)
        result["prompts"] = len(texts)
        return result, report(result, EAGLE_MIN_CONFIDENCE, heads.num_heads)
    drafter = MedusaDrafter.load(heads_dir, model.get_output_embeddings().weight, stops, 1,
                                 model.get_input_embeddings().weight)
    result = measure(drafter, reading, stops)
    result["prompts"] = len(texts)
    return result, report(result, MIN_CONFIDENCE, drafter.num_heads)


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    from apar.text.prompt import encode_prompt

    return [encode_prompt(tokenizer, p) for p in prompts]


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2)
