"""One request's output: engine events in, user-facing stream items out (linear deltas, thread events,
the final messages). Used alike by the in-process CLI and the router's front doors.

A request asks for `n` answers (1 by default). Each answer is a thread tree of its own: the engine
announces an answer's root as a thread without a parent, so parentless threads are answers 0, 1, ... in
the order they start, and a child belongs to its parent's answer. Every item carries its answer's
`index`.

Stop strings apply to each answer's restored text: the linear stream holds back the tail that could
still begin one, and where one appears the answer's text ends just before it, its finish reason is
`stop` and nothing more of it is emitted. `all_stopped` tells the caller that every answer has ended so,
and the request can be finished on the worker.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from apar.engine.events import Event, RequestFinished, ThreadFinished, ThreadStarted, TokenEvent
from apar.text.stitch import Stitcher, ThreadDelta

STREAM_MODES = ("linear", "threads", "final")


@dataclass(frozen=True, slots=True)
class LinearDelta:
    text: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class Final:
    text: str
    finish_reason: str
    usage: dict[str, int]  # the whole request's (every answer's) usage
    error: str | None = None
    index: int = 0


StreamItem = LinearDelta | ThreadDelta | Final


class _Answer:
    def __init__(self, index: int, stitcher: Stitcher) -> None:
        self.index = index
        self.stitcher = stitcher
        self.sent = 0  # characters of the restored text already emitted
        self.stopped_at: int | None = None  # where a stop string cut the text
        self.length = False  # a thread of it ended for length


class RequestStream:
    def __init__(self, tokenizer, fork_id: int | None, child_id: int | None, hidden_ids: Iterable[int] = (),
                 stop: Iterable[str] = ()) -> None:
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False,  # noqa: E731
                                                    clean_up_tokenization_spaces=False)
        self._ids = (fork_id, child_id, tuple(hidden_ids))
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.answers: list[_Answer] = []
        self._answer_of: dict[int, _Answer] = {}  # thread id -> its answer
        self.finals: list[Final] = []

    @property
    def final(self) -> Final | None:
        """The first answer's final message (the only one unless n > 1)."""
        return self.finals[0] if self.finals else None

    @property
    def all_stopped(self) -> bool:
        return bool(self.answers) and all(a.stopped_at is not None for a in self.answers)

    def feed(self, event: Event) -> list[StreamItem]:
        out: list[StreamItem] = []
        if isinstance(event, ThreadStarted):
            if event.parent is None:
                answer = _Answer(len(self.answers), Stitcher(self._decode, *self._ids))
                self.answers.append(answer)
            else:
                answer = self._answer_of[event.parent]
            self._answer_of[event.thread] = answer
            answer.stitcher.start(event.thread, event.parent, event.anchor)
            self._drain(answer, out)
        elif isinstance(event, TokenEvent):
            answer = self._answer_of[event.thread]
            answer.stitcher.token(event.thread, event.token)
            self._drain(answer, out)
        elif isinstance(event, ThreadFinished):
            answer = self._answer_of.get(event.thread)
            if answer is not None:  # a thread that never started ends with nothing to say
                answer.length |= event.reason.value == "length"
                answer.stitcher.finish(event.thread, event.reason.value)
                self._drain(answer, out)
        elif isinstance(event, RequestFinished):
            self._finish(event, out)
        return out

    def _drain(self, answer: _Answer, out: list[StreamItem], final: bool = False) -> None:
        """Move the answer's thread events and its new linear text (what no stop string can still
        claim) to `out`."""
        s = answer.stitcher
        events = s.thread_events()
        if answer.stopped_at is not None:
            return
        out.extend(dataclasses.replace(e, index=answer.index) for e in events)
        if final:
            s.final_text()
        else:
            s.linear_delta()
        text = s.linear.text
        end = len(text)
        for stop in self.stop:
            at = text.find(stop, max(0, answer.sent - len(stop) + 1))
            if at != -1 and at < end:
                end = at
        if end < len(text):
            answer.stopped_at = end
        elif not final:
            end = len(text) - self._held(text)
        if end > answer.sent:
            out.append(LinearDelta(text[answer.sent:end], answer.index))
            answer.sent = end

    def _held(self, text: str) -> int:
        """The length of the longest tail of `text` that begins a stop string."""
        for k in range(min(self._hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _finish(self, event: RequestFinished, out: list[StreamItem]) -> None:
        reason = event.reason.value
        for answer in self.answers:
            s = answer.stitcher
            for node in s.nodes.values():  # threads never started in the engine end with the request
                if not node.finished:
                    s.finish(node.id, reason)
            self._drain(answer, out, final=True)
        usage = event.usage.as_dict()
        for answer in self.answers or [None]:
            if answer is None:  # ended before it was admitted: one empty answer
                self.finals.append(Final("", reason, usage, event.error))
                continue
            text = answer.stitcher.linear.text
            if answer.stopped_at is not None:
                text, why = text[: answer.stopped_at], "stop"
            elif len(self.answers) > 1 and reason not in ("cancelled", "error"):
                why = "length" if answer.length else "stop"
            else:
                why = reason
            self.finals.append(Final(text, why, usage, event.error, answer.index))
        out.extend(self.finals)
