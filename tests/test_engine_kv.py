"""KV accounting through the real engine: blocks per step, early release, cancellation, a full pool."""
import pytest

from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.events import FinishReason, RequestFinished
from apar.engine.params import SamplingParams
from apar.engine.replay import ReplayNode


@pytest.fixture
def engine(llama_dir):
    return Engine(llama_dir, EngineConfig(block_size=4, num_blocks=32, max_batch_tokens=16))


def test_blocks_per_step_match_hand_count(engine):
    F, eos = engine.fork_id, next(iter(engine.eos_ids))
    a, b, c, d, e, f, g, x = range(20, 28)
    tree = ReplayNode([a, b, F, c, d, e, f, g, eos], [ReplayNode([x, eos])])
    rid = engine.add_request(list(range(30, 36)), SamplingParams(max_tokens=100), replay=tree)
    used, freed_child_step = [], None
    while engine.has_work():
        res = engine.step()
        used.append(engine.ledger.num_used)
        engine.ledger.check()
        if any(getattr(ev, "thread", None) == 1 and type(ev).__name__ == "ThreadFinished" for ev in res.events):
            freed_child_step = len(used)
    # 1: prompt of 6 -> blocks 0 (full), 1 (2 used)     2-3: a, b fill block 1
    # 4: [Fork] opens block 2 (sealed: the child reads it), [Child] opens block 3
    # 5: c opens block 4; the child samples EOS -> block 3 freed in this step
    # 6-8: d, e, f fill block 4       9: g opens block 5, the root samples EOS -> all free
    assert used == [2, 2, 2, 4, 4, 4, 4, 4, 0]
    assert freed_child_step == 5
    assert engine.ledger.num_free == 32


def test_cancel_mid_generation_frees_at_once(llama_dir):
    engine = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=64, max_batch_tokens=16))
    keep = engine.add_request(list(range(40, 50)), SamplingParams(max_tokens=30, auto_parallel=False))
    F = engine.fork_id
    tree = ReplayNode([21, F, 22, F, 23, 24, 25, 26, 27, 28], [ReplayNode(list(range(60, 80))), ReplayNode([7] * 20)])
    gone = engine.add_request(list(range(50, 70)), SamplingParams(max_tokens=60, max_threads=3), replay=tree)
    for _ in range(6):
        engine.step()
    assert engine.ledger.blocks_of(gone) > 0
    events = engine.abort(gone)
    assert engine.ledger.blocks_of(gone) == 0
    assert isinstance(events[-1], RequestFinished) and events[-1].reason is FinishReason.CANCELLED
    engine.ledger.check()
    done = engine.run_to_completion()
    assert [e.request for e in done if isinstance(e, RequestFinished)] == [keep]
    assert engine.ledger.num_used == 0 and engine.ledger.num_free == 64
    assert engine.abort("no-such-request") == []


def test_full_pool_ends_the_request_cleanly_and_the_engine_goes_on(llama_dir):
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=6, max_batch_tokens=16))
    big = eng.add_request(list(range(30, 40)), SamplingParams(max_tokens=100, auto_parallel=False))
    small = eng.add_request([5, 6, 7], SamplingParams(max_tokens=5, auto_parallel=False))
    finished = {e.request: e for e in eng.run_to_completion() if isinstance(e, RequestFinished)}
    assert finished[big].reason is FinishReason.LENGTH and finished[big].error == "the KV cache is full"
    # every slot of the pool was used, plus the last sampled token, which never needed one
    assert finished[big].usage.completion_tokens == 6 * 4 - 10 + 1
    assert finished[small].usage.completion_tokens == 5 and finished[small].error is None
    assert eng.ledger.num_used == 0
    eng.ledger.check()
