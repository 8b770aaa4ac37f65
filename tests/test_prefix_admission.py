"""Admission and the step's block count with the prefix cache: a root's cached prefix that another
request reads, or that another root of the same step reuses, is shared, and takes nothing new.

The scheduler's counts are estimates; the expected values are what the ledger really takes when the
engine's ops for those starts are applied to a copy of it (`taken`), and the numbers by hand.
"""
from __future__ import annotations

import copy

from apar.engine.kv.ledger import KVLedger, ThreadRef
from apar.engine.kv.ops import Append, Reuse, Start
from apar.engine.kv.step import apply
from apar.engine.params import SamplingParams
from apar.engine.prefix import block_hashes
from apar.engine.scheduler import Scheduler, Work
from apar.engine.sequence import Request, Thread

BS = 4
PROMPT = list(range(40, 73))  # 33 tokens: 8 full blocks, named once prefilled, and 1 token more


def request(rid: str, generated: int = 0, preempted: bool = False) -> Request:
    """A request of PROMPT not in the ledger: new, or preempted after `generated` tokens."""
    req = Request(id=rid, prompt=list(PROMPT), params=SamplingParams(max_tokens=16, auto_parallel=False),
                  admitted=preempted, recomputing=preempted, prompt_names=block_hashes(PROMPT, BS))
    req.add_thread(Thread(id=0, parent=None, anchor=-1, start_pos=0, depth=0,
                          kv_tokens=PROMPT + list(range(200, 200 + generated)), n_prompt=len(PROMPT)))
    return req


def prefilled(ledger: KVLedger, rid: str) -> None:
    """`rid` starts, writes PROMPT and names its full blocks, as the engine does."""
    ref = ThreadRef(rid, 0)
    ledger.start(ref)
    ledger.append(ref, len(PROMPT))
    assert ledger.name(ref, 0, block_hashes(PROMPT, BS)) == 8


def taken(ledger: KVLedger, work: list[Work]) -> int:
    """Blocks the ledger really gives the step's work (new roots started first, as `Engine._allocate`
    does, each on the prefix `recompute.reused` names), on a copy of it."""
    led = copy.deepcopy(ledger)
    before = led.num_free
    starts = []
    for w in work:
        ref = ThreadRef(w.request.id, w.thread.id)
        starts.append(Start(ref))
        if w.thread.recompute.reused:
            starts.append(Reuse(ref, tuple(w.request.prompt_names[: w.thread.recompute.reused])))
    answer = apply(led, starts + [Append(ThreadRef(w.request.id, w.thread.id), w.n) for w in work])
    assert answer.error is None and None not in answer.appends
    led.check()
    return before - led.num_free


def test_a_preempted_root_counts_the_prompt_blocks_a_running_request_reads_as_shared():
    """`second` was preempted after 3 tokens; `first` still runs and reads the 8 named blocks of their
    prompt. Readmitted, `second` starts on them and writes its 4 tokens after them: 1 new block, which
    is what admission must count (not the 9 of its whole context), so with 4 blocks free and a watermark
    of 2 it is admitted at once instead of waiting for `first` to end."""
    ledger = KVLedger(16, BS)
    prefilled(ledger, "first")
    ledger.append(ThreadRef("first", 0), 3)  # first decodes on: its last block is not full
    sched = Scheduler(ledger, max_batch_tokens=64, admit_watermark=2)
    first = request("first", 3)
    first.root.in_ledger, first.root.computed = True, 36  # decoding
    sched.running.append(first)
    second = request("second", 3, preempted=True)
    for t in range(ledger.num_free - 4):  # 4 blocks free
        ledger.start(ThreadRef(f"other{t}", 0))
        ledger.append(ThreadRef(f"other{t}", 0), BS)
    assert ledger.num_free == 4
    estimate = sched.blocks_to_start(second)
    sched.waiting.append(second)
    assert sched.admit() == [second]
    work: list[Work] = []
    sched.plan_catch_up(work)
    assert second.root.recompute.reused == 8 and [(w.request.id, w.n) for w in work] == [("second", 35 - 32)]
    assert estimate == taken(ledger, work) == 1


def test_roots_on_one_cached_prompt_take_its_blocks_once():
    """`old` left PROMPT's 8 named blocks cached (count 0: they count as free). `b` and `c` bring the same
    prompt: the first of them to start takes the 8 cached blocks back into use, the second shares them;
    each writes 1 block of its own. Admission counts 8 + 1 + 1 = 10 for both, and so does the step's block
    count; counting the cached blocks for each root (18) would keep `c` waiting, or preempt for it."""
    ledger = KVLedger(16, BS)
    prefilled(ledger, "old")
    ledger.release("old")
    assert ledger.num_cached == 8 and ledger.num_free == 16
    sched = Scheduler(ledger, max_batch_tokens=64, admit_watermark=4)
    b, c = request("b"), request("c")
    sched.waiting.extend([b, c])
    assert sched.admit() == [b, c]  # 16 free - 10 = 6 >= the watermark
    work: list[Work] = []
    sched.plan_catch_up(work)
    assert [(w.request.id, w.thread.recompute.reused, w.n) for w in work] == [("b", 8, 1), ("c", 8, 1)]
    need = sched.blocks_needed(work)
    assert need == {"b": 9, "c": 1}
    assert sum(need.values()) == taken(ledger, work) == 10


def test_a_preempted_request_resumes_beside_the_request_that_reads_its_prompt(llama_dir):
    """The engine: `first` and `second` bring PROMPT together (both prefill it; only `first`'s blocks get
    the names) and 24 tokens each, in 22 blocks of 4: they cannot both finish (15 blocks each), so
    `second` is preempted. Readmitted, it starts on `first`'s 8 named blocks and recomputes only its own
    tokens after them, a few blocks, which the pool has: it resumes while `first` still runs, instead of
    waiting for `first` to end because its whole context counted as new. Each streams what it streams
    alone without the cache."""
    from apar.engine.config import EngineConfig
    from apar.engine.engine import Engine
    from apar.engine.events import RequestFinished, TokenEvent
    from tests.test_engine_pressure import run
    from tests.test_prefix_cache import alone_without_cache

    params = SamplingParams(max_tokens=24, auto_parallel=False, ignore_eos=True)
    eng = Engine(llama_dir, EngineConfig(block_size=BS, num_blocks=22, max_batch_tokens=64, admit_watermark=0.0))
    for rid in ("first", "second"):
        eng.add_request(PROMPT, params, request_id=rid)
    after_preemption: list[str] = []  # what streamed or ended after `second` was preempted, in order

    def watch(res, _):
        if eng.preemptions:
            after_preemption.extend(f"{type(e).__name__} {e.request}" for e in res.events
                                    if isinstance(e, (TokenEvent, RequestFinished)))

    tr = run(eng, on_step=watch)
    assert eng.preemptions == 1 and tr.finished["second"].usage.preemptions == 1
    assert "TokenEvent second" in after_preemption[: after_preemption.index("RequestFinished first")]
    alone = alone_without_cache(llama_dir, {"first": PROMPT}, params)["first"]
    assert tr.tokens[("first", 0)] == tr.tokens[("second", 0)] == alone
