"""Routing by cached prefix: the rule on its own (`prefix_choice`, the shards' answers), then a cluster of
two workers and a KV manager as processes, where requests that share a long system prompt go to the
worker that holds it until it is loaded `LOAD_SLACK` requests beyond the other, and then to the other."""
from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import grpc
import pytest

from apar.engine.kv.ledger import KVLedger, ThreadRef
from apar.engine.kv.ops import Append, Name, Start
from apar.engine.prefix import block_hashes
from apar.modelgen import ModelShape, make_model
from apar.protogen import stubs
from apar.text.prompt import encode_prompt
from services.kvmanager.inprocess import InProcessClient
from services.kvmanager.replication import ReplicationLog
from services.kvmanager.service import serve
from services.router.tokenizer import load_tokenizer
from services.router.workers import (LOAD_SLACK, PREFIX_PENDING_MAX, KVManagerDirectory, WorkerDirectory,
                                     WorkerHandle, most_free, prefix_choice)
from tests.faults import Stream, wait_until, worker_info
from tests.procs import Proc, free_port

pb = stubs()
A, K = pb.apar_pb2, pb.kvmanager_pb2
BS = 16  # the workers' block size (their default)
SYSTEM = ("You are the assistant of a river museum. Answer visitors briefly and kindly, in plain words, "
          "and name the river, its source, its mouth and the countries it crosses whenever you can. "
          "When you do not know, say so, and suggest the museum's library on the second floor. ") * 4


def handle(address: str, free: int, running: int = 0, waiting: int = 0, inflight: int = 0) -> WorkerHandle:
    info = SimpleNamespace(free_blocks=free, running=running, waiting=waiting, block_size=BS)
    return WorkerHandle(address, None, None, info, alive=True, inflight=inflight)


# ---- the rule -------------------------------------------------------------------------------------------
def test_the_longest_cached_prefix_wins_over_free_blocks():
    a, b = handle("a", free=20, running=1), handle("b", free=100)
    assert prefix_choice([a, b], {"a": 160}, 200) is a
    assert prefix_choice([a, b], {"a": 160, "b": 176}, 200) is b
    assert prefix_choice([a, b], {}, 200) is b  # no prefix anywhere: the most free blocks


def test_a_loaded_or_full_worker_is_passed_over():
    a, b = handle("a", free=100, running=LOAD_SLACK, waiting=1), handle("b", free=50)
    assert prefix_choice([a, b], {"a": 160}, 200) is b  # a is LOAD_SLACK + 1 above b
    a.info.waiting = 0
    assert prefix_choice([a, b], {"a": 160}, 200) is a  # exactly LOAD_SLACK above: still a
    a.inflight = LOAD_SLACK + 1  # this router's requests count even before a's Info shows them
    assert prefix_choice([a, b], {"a": 160}, 200) is b
    full = handle("full", free=12)  # a 200-token prompt needs 13 blocks
    assert prefix_choice([full, b], {"full": 192}, 200) is b


def test_none_eligible_falls_back_to_the_most_free_blocks():
    a, b = handle("a", free=5, waiting=3), handle("b", free=8, waiting=9)
    assert prefix_choice([a, b], {"a": 64}, 1000) is b


def test_a_burst_between_two_polls_spreads_over_the_workers():
    """Requests sent since a worker's Info was asked for count against its free blocks: without that,
    every request of a burst goes wherever the last poll saw the most room."""
    a, b = handle("a", free=64), handle("b", free=64)
    picks = [WorkerDirectory._take(most_free([a, b]), 20).address for _ in range(6)]  # 20 tokens: 2 blocks
    assert picks == ["a", "b"] * 3
    assert (a.free_blocks, b.free_blocks, a.inflight) == (58, 58, 3)
    # an Info asked after a's first two requests shows them; the third still counts
    a.saw(SimpleNamespace(free_blocks=50, running=2, waiting=0, block_size=BS), asked=2)
    assert a.free_blocks == 48 and a.unseen == [(3, 2)]
    # a reply asked for earlier that comes back later is dropped
    a.saw(SimpleNamespace(free_blocks=64, running=0, waiting=0, block_size=BS), asked=1)
    assert a.info.free_blocks == 50 and a.free_blocks == 48
    assert most_free([a, b]) is b
    # the cached-prefix rule sees the same count: a 500-token prompt (32 blocks) fits in b until two
    # more requests went there
    assert b.free_blocks == 58 and prefix_choice([a, b], {"b": 160}, 500) is b
    for _ in range(2):
        WorkerDirectory._take(b, 200)  # 13 blocks each
    assert b.free_blocks == 32 and prefix_choice([a, b], {"b": 160}, 500) is b
    WorkerDirectory._take(b, 1)
    assert b.free_blocks == 31 and prefix_choice([a, b], {"b": 160}, 500) is a


def test_a_failing_shard_counts_as_holding_nothing(caplog):
    """Two shards: a real in-memory KV manager where worker a holds the prompt's first 3 blocks (named by a
    real step stream) and b none, and an address nobody listens on. The live shard's answer counts, the
    dead one's workers hold nothing, and its failure is logged once."""
    live = serve("127.0.0.1:0", None)
    dead = f"127.0.0.1:{free_port()}"
    ids = list(range(100, 150))  # 50 tokens: 3 full blocks that leave a token to compute
    names = block_hashes(ids, BS)
    for worker, held_names in (("a", names[:3]), ("b", [])):
        client = InProcessClient(live.manager, worker, worker, 64, BS)
        assert not client.register()
        log = ReplicationLog(KVLedger(64, BS), client.session)
        ref = ThreadRef("r", 0)
        log.apply([Start(ref), Append(ref, len(ids))])
        if held_names:
            log.apply([Name(ref, 0, tuple(held_names))])
        log.acked(client.send(log.batch()))
    assert live.manager.prefix(names) == [("a", "a", 3), ("b", "b", 0)]

    async def main():
        d = KVManagerDirectory(f"127.0.0.1:{live.port},{dead}")
        try:
            held = await d.cached_tokens(ids, [handle("a", 10), handle("b", 10), handle("c", 10)])
            assert held == {"a": 48, "b": 0}
            assert await d.cached_tokens(ids, [handle("a", 10)]) == {"a": 48, "b": 0}  # asked again
            assert await d.cached_tokens(ids[:16], [handle("a", 10)]) == {}  # no block leaves a token to compute
        finally:
            await d.close()

    try:
        with caplog.at_level(logging.WARNING, logger="services.router.workers"):
            asyncio.run(main())
    finally:
        live.stop(grace=None)
    failed = [r.getMessage() for r in caplog.records if "prefix lookup failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].startswith("KV manager shard 1 "), failed


class _HeldShard:
    """A KV manager shard whose Prefix calls answer (worker a holds 3 blocks) only once `answer` is set;
    it counts its calls and how each ended."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.calls = self.answered = self.cancelled = 0
        self.second_call = asyncio.Event()

    def Prefix(self, req, timeout=None):
        self.calls += 1
        if self.calls >= 2:
            self.second_call.set()
        return self._answer()

    async def _answer(self):
        try:
            await self.answer.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.answered += 1
        return K.PrefixResponse(workers=[K.WorkerPrefix(worker_id="a", address="a", blocks=3)])


def test_a_slow_shard_counts_as_holding_nothing_and_its_call_runs_to_its_answer(caplog):
    """The router stops waiting for a slow shard, and a request's end stops its lookup, without cancelling
    the Prefix call (a call the caller ends costs the manager's gRPC server memory it never gives back):
    each runs to its answer. A shard with `PREFIX_PENDING_MAX` calls unanswered is not asked."""
    ids = list(range(100, 150))  # 3 full blocks that leave a token to compute

    async def main():
        d = KVManagerDirectory(f"127.0.0.1:{free_port()}", prefix_wait_s=0.01)
        shard = d._kv[0] = _HeldShard()
        try:
            assert await d.cached_tokens(ids, [handle("a", 10)]) == {}  # no answer within the wait
            lookup = asyncio.ensure_future(d.cached_tokens(ids, [handle("a", 10)]))
            await asyncio.wait_for(shard.second_call.wait(), 10)  # the lookup's call is in flight
            lookup.cancel()  # the request ends while its lookup waits
            with pytest.raises(asyncio.CancelledError):
                await lookup
            assert len(d._asking[0]) == 2 and shard.cancelled == 0
            shard.answer.set()
            await asyncio.gather(*d._asking[0])
            assert (shard.answered, shard.cancelled, len(d._asking[0])) == (2, 0, 0)
            d.prefix_wait_s = 5.0
            assert await d.cached_tokens(ids, [handle("a", 10)]) == {"a": 48}

            shard.answer.clear()
            d.prefix_wait_s = 0.0
            for _ in range(PREFIX_PENDING_MAX):
                assert await d.cached_tokens(ids, [handle("a", 10)]) == {}
            asked = shard.calls
            assert await d.cached_tokens(ids, [handle("a", 10)]) == {} and shard.calls == asked  # not asked
            shard.answer.set()
            await asyncio.gather(*d._asking[0])
            assert (shard.answered, shard.cancelled) == (asked, 0)  # every call asked, answered
        finally:
            await d.close()

    with caplog.at_level(logging.INFO, logger="services.router.workers"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and "no answer in time" in lines[0] and "answers prefix lookups again" in lines[1], lines
    assert f"{PREFIX_PENDING_MAX} calls unanswered" in lines[3], lines


# ---- a cluster --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tokenizer):
    model = make_model(tmp_path_factory.mktemp("long"), "llama", ModelShape(max_positions=4096), tokenizer=tokenizer)
    kv_port, r_port = free_port(), free_port()
    w_ports = [free_port(), free_port()]
    procs = [Proc("kvmanager", "--port", str(kv_port), "--no-redis")]
    procs[0].wait_for("listening on")
    for i, port in enumerate(w_ports):
        # 2,048 blocks hold the five long requests whole (no preemption changes the loads the test plans)
        procs.append(Proc("worker", "--model", str(model), "--port", str(port), "--kv-blocks", "2048",
                          "--kvmanager", f"127.0.0.1:{kv_port}", "--worker-id", f"w{i}"))
    procs.append(Proc("router", "--model", str(model), "--kvmanager", f"127.0.0.1:{kv_port}", "--port",
                      str(r_port)))
    for p in procs:
        p.wait_for("listening on")
    c = SimpleNamespace(address=f"127.0.0.1:{r_port}", kv_address=f"127.0.0.1:{kv_port}",
                        workers=[f"127.0.0.1:{p}" for p in w_ports], tokenizer=load_tokenizer(model))
    yield c
    for p in reversed(procs):
        p.stop()


def chat(question: str, max_tokens: int = 2, stream: int = A.STREAM_MODE_FINAL) -> A.GenerateRequest:
    return A.GenerateRequest(messages=[A.ChatMessage(role="system", content=SYSTEM),
                                       A.ChatMessage(role="user", content=question)], stream=stream,
                             sampling=pb.common_pb2.SamplingParameters(max_tokens=max_tokens, ignore_eos=True))


def prompt_ids(c, question: str) -> list[int]:
    return encode_prompt(c.tokenizer, messages=[{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": question}])


def held(c, ids: list[int]) -> dict[str, int]:
    """Worker address -> leading blocks of `ids` it holds, as the KV manager says."""
    with grpc.insecure_channel(c.kv_address) as ch:
        answer = pb.kvmanager_pb2_grpc.KVManagerStub(ch).Prefix(K.PrefixRequest(names=block_hashes(ids, BS)),
                                                                 timeout=5)
    return {w.address: w.blocks for w in answer.workers}


def final(stub, request):
    return [r.final for r in stub.Generate(request, timeout=60) if r.WhichOneof("event") == "final"][0]


def running(address: str) -> int:
    return worker_info(address).running


QUESTIONS = ("Which river is the longest?", "Where does the Rhine rise?", "Tell a long story.", "Is the Danube blue?",
             "How wide is the Amazon?")


def test_a_shared_system_prompt_goes_where_it_is_cached_until_that_worker_is_loaded(cluster):
    c = cluster
    ids = [prompt_ids(c, q) for q in QUESTIONS]
    # the questions part at the same block: each reuses exactly the system prompt's shared blocks
    shared = {next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) // BS * BS for a in ids for b in ids if a != b}
    [want] = shared  # the shared length rounded down to a block
    assert want >= 128
    with grpc.insecure_channel(c.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        assert final(stub, chat(QUESTIONS[0])).usage.cached_tokens == 0
        holder = wait_until(lambda: next((a for a, n in held(c, ids[1]).items() if n * BS == want), None), 10,
                            "the KV manager to know who holds the system prompt")
        [other] = [a for a in c.workers if a != holder]

        # a long request with the system prompt takes some of the holder's blocks: the most-free-blocks
        # rule would now send the next one to the other worker; its prefix keeps it on the holder
        longs = [Stream(stub, chat(QUESTIONS[2], 3000, A.STREAM_MODE_THREADS))]
        longs[0].wait_running()
        assert (running(holder), running(other)) == (1, 0)
        stub.ModelInfo(A.ModelInfoRequest(), timeout=10)  # the router reads every worker's free blocks again
        assert final(stub, chat(QUESTIONS[1])).usage.cached_tokens == want

        # loaded: the holder takes requests while it has at most LOAD_SLACK more than the other
        while len(longs) <= LOAD_SLACK:
            longs.append(Stream(stub, chat(QUESTIONS[2], 3000, A.STREAM_MODE_THREADS)))
            longs[-1].wait_running()
            wait_until(lambda: running(holder) == len(longs), 10, f"{len(longs)} long requests on the holder")
        assert running(other) == 0
        assert final(stub, chat(QUESTIONS[3])).usage.cached_tokens == 0  # sent to the other worker
        wait_until(lambda: held(c, ids[4]).get(other, 0) * BS == want, 10, "the other worker to hold the prompt")
        # both hold it now and the holder is still loaded: the other serves it from its cache
        assert final(stub, chat(QUESTIONS[4])).usage.cached_tokens == want
        assert all(s.running for s in longs), "a long request ended early: the loads were not as planned"
        for s in longs:
            s.cancel()
        assert all(s.join(10).code == "CANCELLED" for s in longs)
