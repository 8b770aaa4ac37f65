"""`apar data trees` and `apar data stats`: conversations to paragraph trees, and what they would save.

IN is an AlpacaEval JSON file, a JSONL file of {"prompt", "response"}, or a directory of such files;
`stats` also reads a tree file that `apar data trees` wrote.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from apar.data.pipeline import (
    approx_tokens,
    compute_stats,
    is_tree_file,
    read_trees,
    tree_record,
    write_trees,
)
from apar.data.readers import read_conversations
from apar.data.rules import DEFAULT_MAX_DEPTH, TreeRules, build_tree
from apar.data.tree import Node, TreeError
from apar.errors import UserError

_STATS_HELP = """\
Prints: records; forkable (share of responses with at least one fork); threads_mean (threads per
response, 1 for a linear one); depth_max (deepest fork nesting); step_bound (generation steps of a
perfect APAR decode over AR steps: tokens on each tree's longest root-to-leaf chain, one per [Fork] and
per thread's EOS, summed over records, divided by the summed tokens of the responses plus EOS; tokens
are counted without a tokenizer as runs of letters/digits, single punctuation marks and line-break runs,
or with --tokenizer DIR by that Hugging Face tokenizer); restore_mismatches (trees whose restored text
differs from the response; must be 0)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build paragraph trees from conversations; data statistics")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    trees = sub.add_parser("trees", help="write one paragraph tree per record as JSONL")
    trees.add_argument("input", type=Path, metavar="IN", help="AlpacaEval .json, .jsonl, or a directory")
    trees.add_argument("--out", type=Path, required=True, metavar="OUT.jsonl", help="tree file to write")
    trees.add_argument("--split", choices=("all", "train", "test"), default="all",
                       help="keep only records of this split (by instruction hash; default: all)")
    _add_rule_flags(trees)
    trees.set_defaults(func=run_trees)

    stats = sub.add_parser("stats", help="forkable share, threads, depth, step bound",
                           description=_STATS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    stats.add_argument("input", type=Path, metavar="IN",
                       help="AlpacaEval .json, .jsonl, a directory, or a tree file from `apar data trees`")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("--tokenizer", type=Path, metavar="DIR",
                       help="count tokens with this Hugging Face tokenizer instead of the approximation")
    _add_rule_flags(stats)
    stats.set_defaults(func=run_stats)


def _add_rule_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-depth", type=int, default=DEFAULT_MAX_DEPTH, help="deepest fork nesting")
    parser.add_argument("--no-paragraphs", action="store_true", help="fork lists only, never paragraphs")


def _rules(args: argparse.Namespace) -> TreeRules:
    try:
        return TreeRules(max_depth=args.max_depth, paragraphs=not args.no_paragraphs)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def run_trees(args: argparse.Namespace) -> int:
    rules = _rules(args)
    records = [tree_record(conv, rules) for conv in read_conversations(args.input)]
    if args.split != "all":
        records = [r for r in records if r.split == args.split]
    written = write_trees(records, args.out)
    forked = sum(r.tree.num_threads > 1 for r in records)
    print(f"wrote {written} trees ({forked} forked) to {args.out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    count = _token_counter(args.tokenizer) if args.tokenizer else approx_tokens
    if is_tree_file(args.input):
        pairs: list[tuple[Node, str]] = [(r.tree, r.response) for r in read_trees(args.input)]
    else:
        rules = _rules(args)
        pairs = []
        for conv in read_conversations(args.input):
            try:
                pairs.append((build_tree(conv.response, rules), conv.response))
            except TreeError as exc:
                raise UserError(f"{conv.source}: {exc}") from None
    stats = compute_stats(pairs, count).to_json()
    if args.json:
        print(json.dumps(stats))
    else:
        width = max(map(len, stats))
        for key, value in stats.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _token_counter(directory: Path) -> Callable[[str], int]:
    if not directory.is_dir():
        raise UserError(f"{directory}: not a tokenizer directory")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise UserError(f"{directory}: cannot load a tokenizer: {exc}") from None
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
