"""Conversations -> checked tree records -> a tree file (JSONL) and statistics.

`tree_record` builds a conversation's tree and checks it (structure valid, no control-token string in
the prompt or response, restoration equal to the response byte for byte); `write_trees` writes records
to a temporary file and renames it into place, so a tree file is never partial or broken; `read_trees`
reads one back and checks every record again. `compute_stats` gives the figures of `apar data stats`.

A tree file holds one JSON object per line:
    {"source": "gpt4.json#3", "split": "train", "prompt": "...", "tree": ["1. A:", {"fork": [" x"]}, ...]}
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from apar.data.readers import Conversation, read_conversations
from apar.data.rules import TreeRules, build_tree
from apar.data.tree import CHILD, FORK, Node, TreeError, from_json, longest_chain, restore, to_json, validate
from apar.engine.errors import UserError
from apar.data.alpaca_split import is_test_instruction

_APPROX_TOKEN = re.compile(r"\w+|[^\w\s]|\n+")


@dataclass(frozen=True, slots=True)
class TreeRecord:
    """A conversation with its checked paragraph tree; `split` is "train" or "test" (by the prompt)."""

    source: str
    prompt: str
    tree: Node
    split: str

    @property
    def response(self) -> str:
        return restore(self.tree)

    def to_json(self) -> dict:
        return {"source": self.source, "split": self.split, "prompt": self.prompt, "tree": to_json(self.tree)}


def split_of(prompt: str) -> str:
    return "test" if is_test_instruction(prompt) else "train"


def tree_record(conv: Conversation, rules: TreeRules | None = None) -> TreeRecord:
    """The checked tree record of one conversation; a `UserError` naming its source if it cannot be."""
    for token in (FORK, CHILD):
        if token in conv.response or token in conv.prompt:
            raise UserError(f"{conv.source}: the text contains the control token {token!r}")
    try:
        tree = build_tree(conv.response, rules)
        validate(tree)
    except TreeError as exc:
        raise UserError(f"{conv.source}: {exc}") from None
    if restore(tree) != conv.response:
        raise UserError(f"{conv.source}: the restored tree differs from the response (a rules bug)")
    return TreeRecord(conv.source, conv.prompt, tree, split_of(conv.prompt))


def write_trees(records: Iterable[TreeRecord], out: Path) -> int:
    """Write records as JSONL via a temporary file renamed into place; returns how many were written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def read_trees(path: Path) -> list[TreeRecord]:
    """Read a tree file written by `write_trees`, checking every record's structure."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict) or not {"prompt", "tree"} <= set(data):
            raise UserError(f"{where}: a tree record needs 'prompt' and 'tree'")
        if not isinstance(data["prompt"], str):
            raise UserError(f"{where}: 'prompt' must be a string")
        try:
            tree = from_json(data["tree"])
            validate(tree)
        except TreeError as exc:
            raise UserError(f"{where}: unbalanced tree: {exc}") from None
        source = str(data.get("source", f"{path}:{number}"))
        records.append(TreeRecord(source, data["prompt"], tree, split_of(data["prompt"])))
    return records


def load_records(path: Path, rules: TreeRules | None = None) -> list[TreeRecord]:
    """Checked tree records from a tree file, or built from conversations (a file or a directory)."""
    if is_tree_file(path):
        return read_trees(path)
    return [tree_record(conv, rules) for conv in read_conversations(path)]


def is_tree_file(path: Path) -> bool:
    """True for a JSONL file whose first record has a 'tree' (a file `apar data trees` wrote)."""
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "tree" in first
    return False


def approx_tokens(text: str) -> int:
    """A tokenizer-free token count: runs of letters/digits, single punctuation marks, line-break runs."""
    return len(_APPROX_TOKEN.findall(text))


@dataclass(frozen=True, slots=True)
class Stats:
    """Figures of a data set; `step_bound` = sum of longest-chain steps / sum of AR steps (both with EOS)."""

    records: int
    forkable: float
    threads_mean: float
    depth_max: int
    step_bound: float
    restore_mismatches: int

    def to_json(self) -> dict:
        return {
            "records": self.records,
            "forkable": round(self.forkable, 4),
            "threads_mean": round(self.threads_mean, 3),
            "depth_max": self.depth_max,
            "step_bound": round(self.step_bound, 4),
            "restore_mismatches": self.restore_mismatches,
        }


def compute_stats(
    pairs: Iterable[tuple[Node, str]], count: Callable[[str], int] = approx_tokens
) -> Stats:
    """Stats over (tree, original response) pairs; a pair whose tree does not restore is a mismatch."""
    records = forkable = threads = depth_max = mismatches = 0
    chain_steps = ar_steps = 0
    for tree, response in pairs:
        records += 1
        forkable += tree.num_threads > 1
        threads += tree.num_threads
        depth_max = max(depth_max, tree.depth)
        mismatches += restore(tree) != response
        chain_steps += longest_chain(tree, count)
        ar_steps += count(response) + 1
    if records == 0:
        raise UserError("no records to compute statistics on")
    return Stats(records, forkable / records, threads / records, depth_max, chain_steps / ar_steps, mismatches)
