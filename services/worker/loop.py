"""The engine loop: one thread owns the engine; servers talk to it through commands and event sinks.

Data flow: a server thread (or asyncio task) calls `submit` / `abort`; the loop thread runs those
commands between steps, then steps while there is work, and hands each request its events of the step
in one batch (`sink(events)`, called on the loop thread). The engine itself stays single-threaded.

`on_step(engine, seconds, result)` (the metrics) runs on the loop thread after every step, and with
`seconds` and `result` None while the loop is idle (at most every 0.5 s, and after each command), so
gauges read from the engine return to 0 after the last request ends, aborted ones included.

Failures: a step that raises ends that step's requests (the running ones; the waiting ones stay
queued) with finish reason `error`: "the KV manager is unavailable" when the manager stayed away past
the lag bound (a warning, once per outage), else "internal engine error" (logged once, with its
cause). Until the manager catches up no step runs: new requests queue, and one that waited for it
longer than the KV backend's `wait_s` ends the same way; once it is back they are served. A request
whose end fails is discarded and still told it ended; nothing ends the loop thread but `stop`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from apar.engine.engine import Engine, EngineOutput
from apar.engine.events import Event, FinishReason, RequestFinished
from apar.engine.params import SamplingParams
from services.worker.kv import MANAGER_UNAVAILABLE, KVManagerUnavailable

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal engine error"  # the error of the requests a failed step ends
Sink = Callable[[list[Event]], None]
OnStep = Callable[[Engine, "float | None", "EngineOutput | None"], None]


class EngineLoop:
    def __init__(self, engine: Engine, on_step: OnStep | None = None) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._on_step = on_step
        self._stop = threading.Event()
        self._outage: str | None = None  # the KV manager is away past the lag bound (logged once)
        self._held_since: float | None = None  # since when no step runs for it
        self._arrived: dict[str, float] = {}  # each open request's submit time (a held one waits so long)
        self._thread = threading.Thread(target=self._run, name="apar-engine", daemon=True)
        self._thread.start()

    # ---- called from any thread --------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, request_id: str, sink: Sink,
               cache_salt: int = 0) -> Future:
        """Queue a request; the future resolves to its id, or raises the engine's UserError."""
        fut: Future = Future()
        self._commands.put(("add", (prompt, params, request_id, sink, cache_salt), fut))
        return fut

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """End a request between steps (STOP: the router saw a stop string); unknown ids are ignored."""
        self._commands.put(("abort", (request_id, reason), None))

    def call(self, fn: Callable[[Engine], object]) -> Future:
        """Run fn(engine) on the loop thread between steps (consistent reads for info and checks)."""
        fut: Future = Future()
        self._commands.put(("call", fn, fut))
        return fut

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(("noop", None, None))
        self._thread.join(timeout=10)

    # ---- the loop thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception:  # a bug outside a step (a command, a sink): logged, and the loop goes on
                log.exception("engine loop")
                self._stop.wait(0.05)  # (a bug that repeats does not spin)
        for rid in list(self._sinks):  # shutting down: every open request ends cleanly
            self._end([rid], FinishReason.CANCELLED, None)

    def _turn(self) -> None:
        held = self.engine.kv.unavailable  # the KV manager is away past the lag bound: nothing is admitted
        self._drain(block=held or not self.engine.has_work())
        if self._stop.is_set():
            return
        if held and self.engine.kv.unavailable:
            self._hold()
        elif self.engine.has_work():
            self._held_since = None
            self._step()
        else:
            self._held_since = None
            self._flush()
            self._report(None, None)

    def _hold(self) -> None:
        """While the KV manager is unavailable no step runs: what runs ends (it cannot go on), and a
        waiting request waits for the manager at most the KV backend's `wait_s`, then ends too."""
        now = time.monotonic()
        if self._held_since is None:
            self._held_since = now
        late = [req.id for req in self.engine.scheduler.running]
        late += [req.id for req in self.engine.scheduler.waiting
                 if now - max(self._arrived.get(req.id, now), self._held_since) > self.engine.kv.wait_s]
        if late:
            self._end(late, FinishReason.ERROR, MANAGER_UNAVAILABLE)
        self._flush()
        self._report(None, None)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                self._command(*cmd)
            except Exception:  # never let one command end the loop thread
                log.exception("engine loop command %s failed", cmd[0])
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _command(self, kind: str, arg, fut: Future | None) -> None:
        if fut is not None and not fut.set_running_or_notify_cancel():
            return  # the caller gave up (its client went away) before the loop got to it
        if kind == "add":
            prompt, params, rid, sink, cache_salt = arg
            try:
                self.engine.add_request(prompt, params, request_id=rid, cache_salt=cache_salt)
            except Exception as exc:  # a UserError for bad input; anything else still reaches the caller
                fut.set_exception(exc)
                return
            self._sinks[rid] = sink
            self._arrived[rid] = time.monotonic()
            fut.set_result(rid)
        elif kind == "abort":
            self._dispatch(self.engine.abort(*arg))
        elif kind == "call":
            try:
                fut.set_result(arg(self.engine))
            except Exception as exc:
                fut.set_exception(exc)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            result = self.engine.step()
        except KVManagerUnavailable as exc:  # nothing of the step was applied; the engine goes on
            running = [req.id for req in self.engine.scheduler.running]
            if self._outage is None:
                log.warning("%s: ending the requests of its steps until it catches up", exc)
            self._outage = str(exc)
            self._end(running, FinishReason.ERROR, MANAGER_UNAVAILABLE)
            return
        except Exception as exc:  # a bug: the step's requests fail cleanly, the engine goes on
            running = [req.id for req in self.engine.scheduler.running]
            log.exception("engine step failed (%s: %s); ending its %d requests", type(exc).__name__, exc,
                          len(running))
            self._end(running, FinishReason.ERROR, INTERNAL_ERROR)
            return
        self._outage = None
        self._dispatch(result.events)
        self._report(time.perf_counter() - t0, result)

    def _end(self, rids: list[str], reason: FinishReason, error: str | None) -> None:
        """End these requests with `reason` (and `error`), each on its own: one that cannot be ended
        cleanly (a bug in the engine's bookkeeping) is discarded, and still told that it ended."""
        events: list[Event] = []
        for rid in rids:
            req = self.engine.requests.get(rid)
            if req is None:
                continue
            if error is not None:
                req.error = error
            try:
                events.extend(self.engine.abort(rid, reason))
            except Exception:
                log.exception("ending request %s failed; discarding it", rid)
                try:
                    events.extend(self.engine.discard(rid, reason))
                except Exception:  # its client is still told that it ended
                    log.exception("discarding request %s failed too", rid)
                    events.append(RequestFinished(rid, reason, req.usage, req.error))
        self._dispatch(events)

    def _report(self, seconds: float | None, result: EngineOutput | None) -> None:
        if self._on_step is None:
            return
        try:
            self._on_step(self.engine, seconds, result)
        except Exception:  # metrics never stop the engine
            log.exception("on_step callback failed")

    def _flush(self) -> None:
        """Idle: send thread ends still waiting for a step message (cluster mode)."""
        try:
            self.engine.kv.flush()
        except Exception as exc:
            log.warning("KV flush failed, will retry: %s", exc)

    def _dispatch(self, events: list[Event]) -> None:
        by_request: dict[str, list[Event]] = {}
        for ev in events:
            by_request.setdefault(ev.request, []).append(ev)
        for rid, evs in by_request.items():
            sink = self._sinks.get(rid)
            if sink is None:
                continue
            if isinstance(evs[-1], RequestFinished):
                del self._sinks[rid]
                self._arrived.pop(rid, None)
            try:
                sink(evs)
            except Exception:
                log.exception("event sink of %s failed; cancelling it", rid)
                self._sinks.pop(rid, None)
                self._arrived.pop(rid, None)
                self.engine.abort(rid)
