"""The rules that turn a response into a paragraph tree (docs/design.md, "Paragraph trees").

`build_tree(response)` cuts the response at character offsets only, so the tree's parts partition the
text and restoration is exact by construction. Each fork is a span `(title_end, detail_end)`: the parent
keeps everything up to `title_end` (list marker, title and its separator such as `:`), then `[Fork]`;
the child gets `text[title_end:detail_end]` (the details, starting with the whitespace after the title,
ending at the last non-blank line of the item, without its newline); the parent goes on with the line
break(s) and the next item's marker and title. A child's text is searched again for lists (nesting).

Rules, in order, for each thread (a child's first line, the rest of its item's line, is never a start):
1. Lists: a numbered list (`1.`, `2.`, ... consecutive, same indentation) or a bullet list (`-`, `*`,
   `+`, `•`, same indentation) of at least `min_items` items, EVERY item titled and with details. Titles:
   `Title:`, `**Title**:`, `**Title:**` (or any bold title ending in `.`, `?`, `!`), `**Title** - ...`,
   and a bold title alone on its line. With `sentence_titles` (this project's addition, on by default)
   an item without such a title whose first line holds more than one sentence is titled by its first
   sentence, as a paragraph is. A list with an untitled item does not fork (no half lists).
2. Otherwise paragraphs: at least `min_paragraphs` one-line prose paragraphs (blank-line separated, not a
   list item, heading, quote or table row) of more than one sentence; each forks after its first sentence.
3. A response with a code block, a table or maths stays linear (one thread), as does a thread at
   `max_depth`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from apar.data.tree import Fork, Node, TreeError, linear

# A list item at the start of a line: indentation, then `N.`/`N)` or a bullet, then a blank, then text.
_ITEM = re.compile(r"([ \t]*)(?:(\d{1,3})([.)])|([-*+•]))[ \t]+(?=\S)")
_HEADING = re.compile(r"[ \t]*#{1,6}[ \t]")
_BOLD = re.compile(r"\*\*([^*\n]+?)\*\*")
_DASH = re.compile(r"[ \t]+[-–—](?=[ \t]+\S)")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=[ \t]+[\"'“‘(\[]?\w)")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc e.g i.e eg ie no fig approx inc ltd co dept est u.s u.k a.m p.m".split()
)
_TABLE_ROW = re.compile(r"^[ \t]*\|.*\|[ \t]*\r?$", re.M)
_MATH = re.compile(r"\$\$|\\\(|\\\[|\\begin\{|\$[^$\n]*\\[a-zA-Z]+[^$\n]*\$")


DEFAULT_MAX_DEPTH = 3


@dataclass(frozen=True, slots=True)
class TreeRules:
    """How eagerly responses fork; the defaults follow docs/design.md, "Paragraph trees"."""

    min_items: int = 3
    min_paragraphs: int = 3
    max_depth: int = DEFAULT_MAX_DEPTH
    max_title_chars: int = 100
    paragraphs: bool = True
    sentence_titles: bool = True

    def __post_init__(self) -> None:
        if self.min_items < 2 or self.min_paragraphs < 2:
            raise ValueError("min_items and min_paragraphs must be at least 2")
        if self.max_depth < 0 or self.max_title_chars < 1:
            raise ValueError("max_depth must be >= 0 and max_title_chars >= 1")


@dataclass(frozen=True, slots=True)
class _Line:
    start: int  # text[start:end] is the line without its newline
    end: int
    indent: int
    blank: bool
    heading: bool  # a markdown heading (`# ...`)
    kind: tuple[str, str] | None  # ("num", "." or ")") or ("bullet", char) for a list item line
    number: int  # the item's number for a numbered item, else 0
    content: int  # where the item's text starts (after the marker), else `start`


def has_unforkable_blocks(text: str) -> bool:
    """True when the text holds a code block, a table or maths, which forking would break."""
    if "```" in text or "~~~" in text:
        return True
    return bool(_TABLE_ROW.search(text) or _MATH.search(text))


def build_tree(response: str, rules: TreeRules | None = None) -> Node:
    """The paragraph tree of `response`; `restore(build_tree(r)) == r` always holds."""
    if not response.strip():
        raise TreeError("empty response")
    rules = rules or TreeRules()
    if has_unforkable_blocks(response):
        return linear(response)
    return _build(response, rules, depth=0, continuation=False)


def _build(text: str, rules: TreeRules, depth: int, continuation: bool) -> Node:
    spans = find_forks(text, rules, continuation) if depth < rules.max_depth else []
    parts: list[str | Fork] = []
    pos = 0
    for title_end, detail_end in spans:
        parts.append(text[pos:title_end])
        parts.append(Fork(_build(text[title_end:detail_end], rules, depth + 1, continuation=True)))
        pos = detail_end
    if pos < len(text):
        parts.append(text[pos:])
    return Node(parts)


def find_forks(text: str, rules: TreeRules, continuation: bool = False) -> list[tuple[int, int]]:
    """Fork spans `(title_end, detail_end)` of one thread's text, sorted and disjoint."""
    lines = _split_lines(text)
    first = 1 if continuation else 0
    spans: list[tuple[int, int]] = []
    rejected: set[int] = set()
    i = first
    while i < len(lines):
        if lines[i].kind is None or i in rejected:
            i += 1
            continue
        items = _grow_list(lines, i)
        forks = _list_forks(text, lines, items, rules) if len(items) >= rules.min_items else None
        if forks is None:
            rejected.update(item for item, _ in items)
            i += 1
            continue
        spans.extend(forks)
        i = items[-1][1] + 1
    if spans or not rules.paragraphs:
        return spans
    return _paragraph_forks(text, lines, first, rules)


def _split_lines(text: str) -> list[_Line]:
    lines: list[_Line] = []
    start = 0
    n = len(text)
    while start <= n:
        end = text.find("\n", start)
        if end < 0:
            end = n
        m = _ITEM.match(text, start, end)
        stripped = len(text[start:end].lstrip(" \t"))
        indent = (end - start) - stripped
        if m:
            kind = ("num", m.group(3)) if m.group(2) else ("bullet", m.group(4))
            number = int(m.group(2)) if m.group(2) else 0
            lines.append(_Line(start, end, indent, False, False, kind, number, m.end()))
        else:
            blank = stripped == 0 or not text[start:end].strip()
            heading = bool(_HEADING.match(text, start, end))
            lines.append(_Line(start, end, indent, blank, heading, None, 0, start))
        start = end + 1
    return lines


def _grow_list(lines: list[_Line], first: int) -> list[tuple[int, int]]:
    """Items `(item_line, last_line)` of the list starting at line `first`.

    An item goes on through blank lines, deeper-indented lines, and lines right after a non-blank one
    (lazy continuation, e.g. flush-left sub-bullets); a heading, a restarted number, or a shallow line
    after a blank line ends the list.
    """
    head = lines[first]
    items: list[tuple[int, int]] = []
    item, last = first, first
    saw_blank = False
    j = first + 1
    while j < len(lines):
        line = lines[j]
        if line.blank:
            saw_blank = True
        elif line.kind == head.kind and line.indent == head.indent:
            if head.kind[0] == "num" and line.number != lines[item].number + 1:
                break
            items.append((item, last))
            item, last, saw_blank = j, j, False
        elif line.heading and line.indent <= head.indent:
            break
        elif line.indent > head.indent or not saw_blank:
            last, saw_blank = j, False
        else:
            break
        j += 1
    items.append((item, last))
    return items


def _list_forks(
    text: str, lines: list[_Line], items: list[tuple[int, int]], rules: TreeRules
) -> list[tuple[int, int]] | None:
    forks: list[tuple[int, int]] = []
    for item, last in items:
        line = lines[item]
        title_end = _title_end(text, line.content, line.end, rules.max_title_chars)
        if title_end is None and rules.sentence_titles:
            cut = first_sentence_end(text[line.content:line.end])
            title_end = None if cut is None else line.content + cut
        if title_end is None:
            return None
        detail_end = lines[last].end
        if not text[title_end:detail_end].strip():
            return None
        forks.append((title_end, detail_end))
    return forks


def _title_end(text: str, start: int, end: int, max_chars: int) -> int | None:
    """Where an item's title (with its separator) ends, or None for an untitled item."""
    line = text[start:end]
    if line.startswith("**"):
        bold = _BOLD.match(line)
        if bold:
            after = bold.end()
            if line[after:after + 1] == ":":
                return start + after + 1
            if bold.group(1).rstrip().endswith((":", ".", "?", "!")) or not line[after:].strip():
                return start + after
            dash = _DASH.match(line, after)
            if dash:
                return start + dash.end()
    colon = line.find(":")
    if colon <= 0 or colon > max_chars:
        return None
    if colon + 1 < len(line) and line[colon + 1] not in " \t\r":
        return None
    title = line[:colon]
    if not any(c.isalnum() for c in title) or _SENTENCE_END.search(title):
        return None
    return start + colon + 1


def _paragraph_forks(
    text: str, lines: list[_Line], first: int, rules: TreeRules
) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for j in range(first, len(lines)):
        line = lines[j]
        if line.blank or line.kind is not None:
            continue
        alone = (j == 0 or lines[j - 1].blank) and (j + 1 == len(lines) or lines[j + 1].blank)
        if not alone or j == first and first == 1:
            continue
        body = text[line.start:line.end]
        if body.lstrip().startswith(("#", ">", "|")):
            continue
        cut = first_sentence_end(body)
        if cut is not None and text[line.start + cut:line.end].strip():
            spans.append((line.start + cut, line.end))
    return spans if len(spans) >= rules.min_paragraphs else []


def first_sentence_end(text: str) -> int | None:
    """Offset just past the first sentence's closing punctuation, when another sentence follows."""
    for m in _SENTENCE_END.finditer(text):
        word = text[:m.start()].rsplit(None, 1)[-1].lower() if text[:m.start()].strip() else ""
        word = word.lstrip("(\"'“‘")
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            continue
        nxt = text[m.end():].lstrip(" \t\"'“‘([")[:1]
        if nxt and (nxt.isupper() or nxt.isdigit()):
            return m.end()
    return None
