"""Read conversations (prompt, response) from the two input formats; every problem is a `UserError`.

- AlpacaEval JSON (`data/alpaca_eval/*.json.xz`): one JSON list of records with `instruction` and
  `output` (other keys are ignored).
- JSONL: one JSON object per line with `prompt` and `response` (blank lines are skipped).

Either may be xz-compressed (`.json.xz`, `.jsonl.xz`): it is decompressed as it is read. A directory is
read as all its data files, sorted by name. Errors name the file and the record (0-based index in the
list, or the 1-based line of a JSONL file).
"""
from __future__ import annotations

import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from apar.engine.errors import UserError

# Key pairs accepted for (prompt, response), in the order they are tried.
_KEYS = (("prompt", "response"), ("instruction", "output"))


@dataclass(frozen=True, slots=True)
class Conversation:
    """One prompt and its response; `source` says where it came from (`file.json#12`, `file.jsonl:3`)."""

    prompt: str
    response: str
    source: str


# File kinds read, each also as `<kind>.xz`.
KINDS = (".json", ".jsonl")


def kind(path: Path) -> str:
    """The data suffix of `path` with any `.xz` taken off: `a.json.xz` -> `.json`."""
    return Path(path.name[: -len(".xz")]).suffix if path.name.endswith(".xz") else path.suffix


def data_files(directory: Path) -> list[Path]:
    """A directory's data files (`.json`, `.jsonl`, either as `.xz`), sorted by name."""
    return sorted(p for p in directory.iterdir() if kind(p) in KINDS and p.is_file())


def read_text(path: Path) -> str:
    """The UTF-8 text of a file, decompressed first when its name ends with `.xz`."""
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes()).decode("utf-8")
    return path.read_text(encoding="utf-8")


def input_files(path: Path) -> list[Path]:
    """The data files behind `path`: the file itself, or a directory's data files."""
    if path.is_dir():
        files = data_files(path)
        if not files:
            raise UserError(f"{path}: directory holds no .json, .jsonl, .json.xz or .jsonl.xz files")
        return files
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    return [path]


def read_conversations(path: Path) -> list[Conversation]:
    """Every conversation in `path` (a file or a directory), in file then record order."""
    return [conv for file in input_files(path) for conv in iter_file(file)]


def iter_file(path: Path) -> Iterator[Conversation]:
    """Conversations of one file: a JSON list for `.json` (or any text starting with `[`), else JSONL."""
    try:
        text = read_text(path)
    except (OSError, UnicodeDecodeError, lzma.LZMAError, EOFError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    suffix = kind(path)
    if suffix == ".json" or (suffix != ".jsonl" and text.lstrip().startswith("[")):
        yield from _iter_json_list(path, text)
    else:
        yield from _iter_jsonl(path, text)


def _iter_json_list(path: Path, text: str) -> Iterator[Conversation]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of records")
    for index, record in enumerate(records):
        yield _conversation(record, f"{path}#{index}", f"{path}: record {index}")


def _iter_jsonl(path: Path, text: str) -> Iterator[Conversation]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        yield _conversation(record, f"{path}:{number}", f"{path}: line {number}")


def _conversation(record: object, source: str, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for prompt_key, response_key in _KEYS:
        if prompt_key in record or response_key in record:
            break
    else:
        raise UserError(f"{where}: missing 'prompt'/'response' (or 'instruction'/'output')")
    for key in (prompt_key, response_key):
        if key not in record:
            raise UserError(f"{where}: missing {key!r}")
        if not isinstance(record[key], str):
            raise UserError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    if not record[response_key].strip():
        raise UserError(f"{where}: empty response")
    return Conversation(record[prompt_key], record[response_key], source)
