"""Tree-packed training examples: a whole paragraph tree as ONE sequence (docs/design.md, "Paragraph trees").

Data flow: `tokenize_tree(prompt, tree, tokenizer)` -> `TokenTree` (prompt ids + each thread's ids, a
child's starting with `[Child]`, every thread ending with EOS) -> `pack(token_tree)` -> `PackedExample`
-> `collate([...])` -> tensors for the model. `per_thread_examples` is the reference formulation (one
ordinary sequence per thread) that packing must match in loss.

Layout of a packed sequence (prompt P, root R with one fork F, child C):

    index:     0  1 | 2  3  4  5  | 6  7  8
    token:     p0 p1| a  F  b  E  | C  x  E        threads in pre-order, each after its parent
    previous: -1  0 | 1  2  3  4  | 3  6  7        the token before it on its own path
    position:  0  1 | 2  3  4  5  | 4  5  6        previous's position + 1 ([Child] at anchor + 1)
    label:     -  a | F  b  E  -  | x  E  -        the next token of the same thread, never [Child]

Every token attends to the chain of `previous` links from itself back to the prompt's first token: its
thread's earlier tokens, and each ancestor's tokens up to and including the [Fork] leading to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from apar.data.tree import CHILD, FORK, Node, thread_texts
from apar.engine.errors import UserError

IGNORE = -100


@dataclass(frozen=True, slots=True)
class ControlIds:
    """Token ids of the control tokens and EOS, looked up from their strings."""

    fork: int
    child: int
    eos: int
    fork_text: str = FORK
    child_text: str = CHILD

    @classmethod
    def from_tokenizer(cls, tokenizer, fork: str = FORK, child: str = CHILD) -> ControlIds:
        ids = {}
        for text in (fork, child):
            found = tokenizer.convert_tokens_to_ids(text)
            if found is None or found == tokenizer.unk_token_id or tokenizer.decode([found]) != text:
                raise UserError(f"the tokenizer has no {text!r} token (add the control tokens first)")
            ids[text] = int(found)
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token")
        return cls(ids[fork], ids[child], int(tokenizer.eos_token_id), fork, child)


@dataclass(frozen=True, slots=True)
class ThreadTokens:
    """One thread's ids; `anchor` is the index in the parent's ids of the [Fork] that spawned it."""

    parent: int | None
    anchor: int | None
    ids: list[int]


@dataclass(frozen=True, slots=True)
class TokenTree:
    """A conversation as tokens: prompt ids and the threads in pre-order (root first)."""

    prompt: list[int]
    threads: list[ThreadTokens]

    @property
    def response_tokens(self) -> int:
        """Tokens the model is trained to produce (everything but the forced [Child]s)."""
        return sum(len(t.ids) - (t.parent is not None) for t in self.threads)


def prompt_ids(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int]:
    """The prompt as the server encodes it: the chat template with a generation prompt, when present."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return [int(t) for t in tokenizer(prompt, add_special_tokens=True)["input_ids"]]


def tokenize_tree(prompt: str, tree: Node, tokenizer, control: ControlIds,
                  use_chat_template: bool = True) -> TokenTree:
    """Tokenize every thread's text (control strings become their single ids) and find the anchors."""
    texts = thread_texts(tree, control.fork_text, control.child_text)
    threads: list[ThreadTokens] = []
    for text in texts:
        ids = [int(t) for t in tokenizer(text.text, add_special_tokens=False)["input_ids"]]
        ids.append(control.eos)
        anchor = None
        if text.parent is not None:
            forks = [i for i, t in enumerate(threads[text.parent].ids) if t == control.fork]
            anchor = forks[text.fork_ordinal]
            if ids[0] != control.child:
                raise UserError(f"{control.child_text!r} did not tokenize to one id")
        threads.append(ThreadTokens(text.parent, anchor, ids))
    for index, thread in enumerate(threads):
        expected = sum(1 for t in texts if t.parent == index)
        if thread.ids.count(control.fork) != expected:
            raise UserError(f"{control.fork_text!r} did not tokenize to one id per fork")
    return TokenTree(prompt_ids(tokenizer, prompt, use_chat_template), threads)


@dataclass(frozen=True, slots=True)
class PackedExample:
    """One packed sequence; all lists have the same length L (see the module docstring)."""

    input_ids: list[int]
    position_ids: list[int]
    previous: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)

    def visible(self) -> torch.Tensor:
        """allowed[t, s]: token t attends to token s. # [L, L] bool"""
        n = len(self.input_ids)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for t, prev in enumerate(self.previous):
            if prev >= 0:
                allowed[t] = allowed[prev]  # prev < t: its row is complete
            allowed[t, t] = True
        return allowed


def pack(tree: TokenTree, control: ControlIds, max_length: int | None = None) -> PackedExample:
    """The packed sequence of a tokenized tree, cut to `max_length` tokens (a prefix keeps every kept
    token's ancestors, because each thread comes after its parent)."""
    if not tree.prompt:
        raise UserError("an empty prompt: the first response token would have nothing to follow")
    ids = list(tree.prompt)
    previous = list(range(-1, len(tree.prompt) - 1))
    starts: list[int] = []  # packed index of each thread's first token
    for thread in tree.threads:
        start = len(ids)
        starts.append(start)
        if thread.parent is None:
            first_prev = len(tree.prompt) - 1
        else:
            first_prev = starts[thread.parent] + thread.anchor
        ids.extend(thread.ids)
        previous.append(first_prev)
        previous.extend(range(start, start + len(thread.ids) - 1))
    if max_length is not None:
        ids, previous = ids[:max_length], previous[:max_length]
    positions: list[int] = []
    labels = [IGNORE] * len(ids)
    child_starts = {starts[i] for i, t in enumerate(tree.threads) if t.parent is not None}
    for u, prev in enumerate(previous):
        positions.append(0 if prev < 0 else positions[prev] + 1)
        if u >= len(tree.prompt) and u not in child_starts:
            labels[prev] = ids[u]  # the prompt and the forced [Child] are never targets
    return PackedExample(ids, positions, previous, labels)


def per_thread_examples(tree: TokenTree) -> list[tuple[list[int], list[int]]]:
    """Reference formulation: per thread, (ids, labels) of prompt + ancestors up to the fork + own ids.

    Labels follow the Hugging Face convention (the model shifts them): -100 on the prompt, the
    ancestors and a child's [Child]; the thread's own ids elsewhere.
    """
    examples = []
    for thread in tree.threads:
        context: list[int] = []
        node = thread
        while node.parent is not None:
            parent = tree.threads[node.parent]
            context = parent.ids[: node.anchor + 1] + context
            node = parent
        own_labels = list(thread.ids)
        if thread.parent is not None:
            own_labels[0] = IGNORE
        ids = tree.prompt + context + thread.ids
        labels = [IGNORE] * (len(tree.prompt) + len(context)) + own_labels
        examples.append((ids, labels))
    return examples


def collate(examples: list[PackedExample], pad_id: int, dtype: torch.dtype = torch.float32) -> dict:
    """Right-padded batch tensors; padding tokens see only themselves and carry no label.

    Returns input_ids, position_ids, labels: [B, L] long (labels already aligned: position t predicts
    labels[t], no shift), and attention_mask: [B, 1, L, L] additive float (0 visible, dtype min hidden).
    """
    length = max(len(e) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    allowed = torch.eye(length, dtype=torch.bool).repeat(batch, 1, 1)  # [B, L, L]
    for b, ex in enumerate(examples):
        n = len(ex)
        input_ids[b, :n] = torch.tensor(ex.input_ids)
        position_ids[b, :n] = torch.tensor(ex.position_ids)
        labels[b, :n] = torch.tensor(ex.labels)
        allowed[b, :n, :n] = ex.visible()
    mask = torch.zeros((batch, 1, length, length), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "attention_mask": mask}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over positions with a label, and their count.

    logits: [B, L, V]; labels: [B, L] aligned (position t predicts labels[t]).
    """
    flat = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((flat != IGNORE).sum())
