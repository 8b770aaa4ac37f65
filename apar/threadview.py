"""Threads side by side on a terminal: one column per thread, redrawn as their text grows.

Used by `apar generate --stream threads` when stdout is a terminal (a pipe gets JSON lines instead).
"""
from __future__ import annotations

import shutil
import textwrap


class ThreadView:
    def __init__(self, out, max_columns: int = 4) -> None:
        self.out = out
        self.max_columns = max_columns
        self.texts: dict[int, str] = {}
        self.state: dict[int, str] = {}
        self.parents: dict[int, int | None] = {}
        self._drawn_lines = 0

    def event(self, kind: str, thread: int, parent: int | None = None, text: str = "", reason: str | None = None):
        if kind == "started":
            self.texts[thread] = ""
            self.state[thread] = "running"
            self.parents[thread] = parent
        elif kind == "delta":
            self.texts[thread] = self.texts.get(thread, "") + text
        elif kind == "finished":
            self.state[thread] = reason or "done"
        self.draw()

    def draw(self) -> None:
        width, height = shutil.get_terminal_size((100, 30))
        running = [t for t in self.texts if self.state.get(t) == "running"]
        shown = (running or list(self.texts))[-self.max_columns:]
        col = max(12, (width - 3 * (len(shown) - 1)) // max(1, len(shown)))
        columns = []
        for t in shown:
            head = f"thread {t}" + ("" if self.parents.get(t) is None else f" <- {self.parents[t]}")
            head += f" [{self.state.get(t)}]"
            body = textwrap.wrap(self.texts[t].replace("\n", " / "), col) or [""]
            columns.append([head[:col], "-" * min(col, len(head))] + body[-(height - 6):])
        rows = max(len(c) for c in columns)
        lines = [" | ".join(c[i].ljust(col) if i < len(c) else " " * col for c in columns) for i in range(rows)]
        if self._drawn_lines:
            self.out.write(f"\x1b[{self._drawn_lines}F\x1b[J")  # back to the top of the last drawing
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self._drawn_lines = len(lines)
