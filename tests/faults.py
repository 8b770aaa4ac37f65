"""Helpers for fault tests: wait for an event with a deadline, watch a request while a fault hits it.

A fault test injects its fault only once it has seen a request running, and afterwards proves that the
fault hit that request; it never synchronises on a fixed sleep. `wait_until(cond)` polls a condition to
a deadline. `Stream` drains one Generate call on its own thread and counts what arrived, so a test can
wait for a request's first event, mark the count when it injects the fault, and check afterwards how the
request ended. `worker_info(address)` reads a worker's Info RPC (its running and waiting requests); the
worker answers it even while its engine step is blocked on an absent KV manager.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from apar.protogen import stubs

pb = stubs()
T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float = 10.0, what: str = "", every: float = 0.02,
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll `cond()` until it returns something truthy and return that; fail the test after `timeout`
    seconds, naming `what` never happened. Exceptions of the types in `ignore` count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            got = cond()
            if got:
                return got
            last = got
        except ignore as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what or getattr(cond, '__name__', 'a condition')}; "
                                 f"last saw {last!r}")
        time.sleep(every)


class Stream:
    """One Generate call drained on its own thread.

    `events` counts the responses received so far (the final one included); when the call ends, `final`
    is its final message (or None) and `code` the status name it ended with ("OK", "UNAVAILABLE", ...).
    """

    def __init__(self, stub, request, timeout: float = 60.0) -> None:
        self.events = 0
        self.final = None
        self.code: str | None = None
        self.ended_at: float | None = None
        self._ended = threading.Event()
        self.call = stub.Generate(request, timeout=timeout)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        try:
            for resp in self.call:
                if resp.WhichOneof("event") == "final":
                    self.final = resp.final
                self.events += 1
            self.code = "OK"
        except grpc.RpcError as exc:
            self.code = exc.code().name
        finally:
            self.ended_at = time.monotonic()
            self._ended.set()

    @property
    def running(self) -> bool:
        """Streamed at least one event and has not ended (no final message, no status) yet."""
        return self.events > 0 and self.final is None and not self._ended.is_set()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def wait_running(self, timeout: float = 30.0) -> int:
        """Wait for the request's first event; fail if it ended instead. Returns the events so far."""
        wait_until(lambda: self.events > 0 or self.ended, timeout, "the request's first event")
        assert self.running, f"the request ended ({self.code}, {self.final}) before it could be seen running"
        return self.events

    def cancel(self) -> None:
        self.call.cancel()

    def join(self, timeout: float = 60.0) -> "Stream":
        assert self._ended.wait(timeout), f"the request did not end within {timeout} s"
        return self


def worker_info(address: str):
    """A worker's WorkerInfo (worker_id, free_blocks, running, waiting, ...) from its Info RPC."""
    with grpc.insecure_channel(address) as ch:
        return pb.worker_pb2_grpc.WorkerStub(ch).Info(pb.worker_pb2.WorkerInfoRequest(), timeout=5)
