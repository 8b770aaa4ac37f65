"""The engine loop through failures of its own: a step that raises ends that step's requests (not the
waiting ones) with "internal engine error", logged once with its cause, and the loop serves on; a
request whose end itself fails is still told it ended. Faults are injected into the real engine (its
model call raises once; its request end raises once), never mocked around it."""
from __future__ import annotations

import logging

from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.events import FinishReason
from apar.engine.params import SamplingParams
from services.worker.loop import INTERNAL_ERROR, EngineLoop
from tests.test_kv_outage import Requests

PARAMS = SamplingParams(max_tokens=12, auto_parallel=False, ignore_eos=True)


def crowded(llama_dir):
    """A loop over an engine whose pool admits 2 of 5 requests at once (the rest wait their turn)."""
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=16, max_batch_tokens=64, admit_watermark=0.0))
    return eng, EngineLoop(eng)


def test_a_failed_step_ends_its_requests_and_the_loop_serves_on(llama_dir, caplog):
    eng, loop = crowded(llama_dir)
    forward, calls = eng.runner.forward, [0]

    def failing_once(*args):
        calls[0] += 1
        if calls[0] == 3:  # a step of the first requests, after their prefill
            raise RuntimeError("injected fault in the model call")
        return forward(*args)

    eng.runner.forward = failing_once
    try:
        reqs = Requests(loop)
        with caplog.at_level(logging.ERROR, logger="services.worker.loop"):
            rids = [reqs.submit(f"r{i}", list(range(30 + 20 * i, 50 + 20 * i)), PARAMS) for i in range(5)]
            ends = dict(zip(rids, reqs.wait_done(rids)))
        failed = [r for r, e in ends.items() if e.reason is FinishReason.ERROR]
        assert failed and all(ends[r].error == INTERNAL_ERROR for r in failed)
        assert all(reqs.tokens(r) > 0 for r in failed)  # they were running when the step failed
        served = [r for r, e in ends.items() if r not in failed]
        assert served and all((ends[r].reason, ends[r].usage.completion_tokens) == (FinishReason.LENGTH, 12)
                              for r in served)  # the waiting ones, served after
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "injected fault in the model call" in errors[0].getMessage()
        assert loop._thread.is_alive() and eng.ledger.num_used == 0
        eng.ledger.check()
    finally:
        loop.stop()


def test_a_request_whose_end_fails_is_still_told_it_ended(llama_dir, caplog):
    eng, loop = crowded(llama_dir)
    forward, end = eng.runner.forward, eng._end_request
    state = {"calls": 0, "ends": 0}

    def failing_once(*args):
        state["calls"] += 1
        if state["calls"] == 3:
            raise RuntimeError("injected fault in the model call")
        return forward(*args)

    def end_failing_once(req, reason):
        if reason is FinishReason.ERROR and not state["ends"]:
            state["ends"] += 1
            raise RuntimeError("injected fault in a request's end")
        return end(req, reason)

    eng.runner.forward, eng._end_request = failing_once, end_failing_once
    try:
        reqs = Requests(loop)
        rids = [reqs.submit(f"r{i}", list(range(30 + 20 * i, 50 + 20 * i)), PARAMS) for i in range(5)]
        ends = reqs.wait_done(rids)
        assert state["ends"] == 1 and sum(e.error == INTERNAL_ERROR for e in ends) >= 1
        assert "discarding it" in caplog.text and loop._thread.is_alive()
        later = reqs.submit("later", list(range(200, 220)), PARAMS)
        (e,) = reqs.wait_done([later])
        assert (e.reason, e.usage.completion_tokens) == (FinishReason.LENGTH, 12)
        assert eng.ledger.num_used == 0
        eng.ledger.check()
    finally:
        loop.stop()
