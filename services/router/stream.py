"""One request's output: engine events in, user-facing stream items out (linear deltas, thread events,
the final message). Used alike by the in-process CLI and the router service."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.router.stitch import Stitcher, ThreadDelta
from services.worker.events import Event, RequestFinished, ThreadFinished, ThreadStarted, TokenEvent

STREAM_MODES = ("linear", "threads", "final")


@dataclass(frozen=True, slots=True)
class LinearDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Final:
    text: str
    finish_reason: str
    usage: dict[str, int]
    error: str | None = None


StreamItem = LinearDelta | ThreadDelta | Final


class RequestStream:
    def __init__(self, tokenizer, fork_id: int, child_id: int, hidden_ids: Iterable[int] = ()) -> None:
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False,  # noqa: E731
                                              clean_up_tokenization_spaces=False)
        self.stitcher = Stitcher(decode, fork_id, child_id, hidden_ids)
        self.final: Final | None = None

    def feed(self, event: Event) -> list[StreamItem]:
        s = self.stitcher
        if isinstance(event, ThreadStarted):
            s.start(event.thread, event.parent, event.anchor)
        elif isinstance(event, TokenEvent):
            s.token(event.thread, event.token)
        elif isinstance(event, ThreadFinished):
            s.finish(event.thread, event.reason.value)
        out: list[StreamItem] = list(s.thread_events())
        if isinstance(event, RequestFinished):
            for tid, node in s.nodes.items():  # threads never started in the engine end with the request
                if not node.finished:
                    s.finish(tid, event.reason.value)
            out.extend(s.thread_events())
            before = len(s.linear.text)
            text = s.final_text()
            if len(text) > before:
                out.append(LinearDelta(text[before:]))
            self.final = Final(text, event.reason.value, event.usage.as_dict(), event.error)
            out.append(self.final)
        else:
            delta = s.linear_delta()
            if delta:
                out.append(LinearDelta(delta))
        return out
