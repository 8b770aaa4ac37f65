"""`apar data trees` and `apar data stats`: conversations to paragraph trees, and what they would save;
`apar data import`: the repository's compressed copy of the AlpacaEval files.

IN is an AlpacaEval JSON file, a JSONL file of {"prompt", "response"} (either may be .xz-compressed), or
a directory of such files; left out, the AlpacaEval data (`apar.data.alpaca_split.data_dir`: $APAR_DATA, else the
repository's data/alpaca_eval). `stats` also reads a tree file that `apar data trees` wrote.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
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
from apar.data.readers import iter_file, read_conversations
from apar.data.rules import DEFAULT_MAX_DEPTH, TreeRules, build_tree
from apar.data.tree import Node, TreeError
from apar.engine.errors import UserError
from apar.data.alpaca_split import REPO_DATA, data_dir

# xz preset 9e: the smallest files; decompressing costs the same at any preset.
XZ_PRESET = 9 | lzma.PRESET_EXTREME
# Beside the copy: the SHA-256 of each uncompressed file, as `sha256sum` writes it (`NAME.json`).
SUMS_FILE = "SHA256SUMS"

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
    trees.add_argument("input", type=Path, metavar="IN", nargs="?",
                       help="AlpacaEval .json, .jsonl, or a directory (default: the AlpacaEval data)")
    trees.add_argument("--out", type=Path, required=True, metavar="OUT.jsonl", help="tree file to write")
    trees.add_argument("--split", choices=("all", "train", "test"), default="all",
                       help="keep only records of this split (by instruction hash; default: all)")
    _add_rule_flags(trees)
    trees.set_defaults(func=run_trees)

    stats = sub.add_parser("stats", help="forkable share, threads, depth, step bound",
                           description=_STATS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    stats.add_argument("input", type=Path, metavar="IN", nargs="?",
                       help="AlpacaEval .json, .jsonl, a directory, or a tree file from `apar data trees` "
                            "(default: the AlpacaEval data)")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("--tokenizer", type=Path, metavar="DIR",
                       help="count tokens with this Hugging Face tokenizer instead of the approximation")
    _add_rule_flags(stats)
    stats.set_defaults(func=run_stats)

    imp = sub.add_parser(
        "import", help="write the compressed copy of a folder of AlpacaEval .json files",
        description="Compress each SRC_DIR/NAME.json (a JSON list of records with instruction and output) "
                    "to OUT/NAME.json.xz (xz preset 9e), checking that it decompresses to the same bytes, "
                    "and write OUT/SHA256SUMS (the uncompressed files' SHA-256, `sha256sum` format). A file "
                    "whose copy already decompresses to the same bytes is left as it is.")
    imp.add_argument("src", type=Path, metavar="SRC_DIR", help="folder of AlpacaEval .json files")
    imp.add_argument("--out", type=Path, default=REPO_DATA,
                     help="folder to write (default: the repository's data/alpaca_eval)")
    imp.set_defaults(func=run_import)


def _add_rule_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-depth", type=int, default=DEFAULT_MAX_DEPTH, help="deepest fork nesting")
    parser.add_argument("--no-paragraphs", action="store_true", help="fork lists only, never paragraphs")


def _rules(args: argparse.Namespace) -> TreeRules:
    try:
        return TreeRules(max_depth=args.max_depth, paragraphs=not args.no_paragraphs)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _input(args: argparse.Namespace) -> Path:
    return args.input if args.input is not None else data_dir()


def run_trees(args: argparse.Namespace) -> int:
    rules = _rules(args)
    records = [tree_record(conv, rules) for conv in read_conversations(_input(args))]
    if args.split != "all":
        records = [r for r in records if r.split == args.split]
    written = write_trees(records, args.out)
    forked = sum(r.tree.num_threads > 1 for r in records)
    print(f"wrote {written} trees ({forked} forked) to {args.out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    count = _token_counter(args.tokenizer) if args.tokenizer else approx_tokens
    source = _input(args)
    if is_tree_file(source):
        pairs: list[tuple[Node, str]] = [(r.tree, r.response) for r in read_trees(source)]
    else:
        rules = _rules(args)
        pairs = []
        for conv in read_conversations(source):
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


def run_import(args: argparse.Namespace) -> int:
    src, out = args.src, args.out
    if not src.is_dir():
        raise UserError(f"{src}: no such directory")
    sources = sorted(p for p in src.iterdir() if p.suffix == ".json" and p.is_file())
    if not sources:
        raise UserError(f"{src}: directory holds no .json files")
    for path in sources:  # every file checked before anything is written
        if sum(1 for _ in iter_file(path)) == 0:
            raise UserError(f"{path}: no records")
    out.mkdir(parents=True, exist_ok=True)
    total_in = total_out = 0
    sums = []
    for path in sources:
        raw = path.read_bytes()
        sums.append(f"{hashlib.sha256(raw).hexdigest()}  {path.name}\n")
        target = out / f"{path.name}.xz"
        if target.is_file() and _decompressed(target) == raw:
            state = "unchanged"
        else:
            packed = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
            if lzma.decompress(packed) != raw:  # never write a copy that does not round-trip
                raise UserError(f"{path}: the compressed copy does not decompress to the same bytes")
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(packed)
            os.replace(tmp, target)
            state = "written"
        size = target.stat().st_size
        total_in, total_out = total_in + len(raw), total_out + size
        print(f"{target}  {len(raw):>9} -> {size:>8} bytes  {state}")
    (out / SUMS_FILE).write_text("".join(sums), encoding="utf-8")
    names = {f"{p.name}.xz" for p in sources}
    for stale in sorted(p for p in out.glob("*.xz") if p.name not in names):
        print(f"note: {stale} is not in {src} (left as it is)")
    print(f"{len(sources)} files, {total_in} -> {total_out} bytes, in {out}")
    return 0


def _decompressed(path: Path) -> bytes | None:
    try:
        return lzma.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError, EOFError):
        return None
