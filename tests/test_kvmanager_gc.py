"""The KV manager's cyclic collector: its automatic runs are rare (large thresholds, for its many long-lived
ledger objects), so a timer collects the young generations, where gRPC's per-call cycles are garbage."""
from __future__ import annotations

import gc
import threading
import weakref

import pytest

from apar.engine.errors import UserError
from services.kvmanager import cli


class _Node:
    pass


def _cycle() -> _Node:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return a


@pytest.fixture
def manager_thresholds():
    """The thresholds `apar kvmanager` sets, made larger still: no automatic collection runs in the test."""
    saved = gc.get_threshold()
    gc.collect()
    gc.set_threshold(10**9, 50, 100)
    yield
    gc.set_threshold(*saved)


def test_without_the_timer_a_cycle_stays_uncollected(manager_thresholds):
    freed = threading.Event()
    weakref.finalize(_cycle(), freed.set)
    assert not freed.wait(0.3)  # a negative check: nothing else collects it
    gc.collect(1)
    assert freed.is_set()


def test_the_timer_collects_a_young_cycle(manager_thresholds):
    stop = threading.Event()
    freed = threading.Event()
    weakref.finalize(_cycle(), freed.set)
    thread = cli.collect_young_every(0.05, stop)
    try:
        assert freed.wait(10), "the timer did not collect the cycle"
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_zero_turns_the_timer_off_and_bad_values_are_refused():
    assert cli.collect_young_every(0, threading.Event()) is None
    import argparse

    p = argparse.ArgumentParser()
    cli.add_args(p)
    assert p.parse_args([]).gc_every == cli.GC_EVERY_S
    for bad in ("-1", "0.001", "4000"):
        with pytest.raises(UserError, match="--gc-every"):
            cli._check(p.parse_args(["--no-redis", "--gc-every", bad]))
    cli._check(p.parse_args(["--no-redis", "--gc-every", "0"]))
