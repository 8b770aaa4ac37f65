"""Separate processes: two workers and a router. Answers equal the in-process engine's; a killed worker's
clients get UNAVAILABLE while the other worker's request runs on, and new requests go to the live one."""
from __future__ import annotations

import grpc
import pytest

from apar.protogen import stubs
from tests.faults import Stream, wait_until, worker_info
from tests.gated import Gate
from tests.procs import Proc, free_port

pb = stubs()
A = pb.apar_pb2
BLOCKS = 128  # a worker's KV pool: room for one long request and the short ones
# a request that a held worker (see tests/gated.py) keeps running: it cannot reach its 500 tokens there
LONG = A.GenerateRequest(prompt="Tell a long story.", stream=A.STREAM_MODE_THREADS,
                         sampling=pb.common_pb2.SamplingParameters(max_tokens=500, ignore_eos=True))


@pytest.fixture(scope="module")
def cluster(llama_dir, tmp_path_factory):
    """A router and two workers, each worker's engine loop held by the test at will (its `Gate`)."""
    ports = [free_port(), free_port()]
    d = tmp_path_factory.mktemp("gates")
    gates = [Gate(d / f"w{i}") for i in range(2)]
    workers = [Proc("worker", "--model", str(llama_dir), "--port", str(p), "--kv-blocks", str(BLOCKS),
                    "--worker-id", f"w{i}", gate=gates[i]) for i, p in enumerate(ports)]
    for w in workers:
        w.wait_for("listening on")
    rport = free_port()
    router = Proc("router", "--model", str(llama_dir), "--workers", ",".join(f"127.0.0.1:{p}" for p in ports),
                  "--port", str(rport))
    router.wait_for("listening on")
    yield f"127.0.0.1:{rport}", workers, [f"127.0.0.1:{p}" for p in ports], router, gates
    for p in (router, *workers):
        p.stop()


def test_split_services_answer_like_serve(cluster, llama_dir):
    """Through the router (three times, spread over the two workers), a sampled request gets the answer
    the engine gives in-process, as `apar serve` would."""
    from apar.engine.config import EngineConfig
    from apar.engine.engine import Engine
    from apar.engine.params import SamplingParams
    from apar.text.prompt import encode_prompt
    from apar.text.stream import RequestStream

    address = cluster[0]
    with grpc.insecure_channel(address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        req = A.GenerateRequest(prompt="Name three rivers.", sampling=pb.common_pb2.SamplingParameters(
            max_tokens=20, temperature=0.8, seed=3))
        finals = [next(r.final for r in stub.Generate(req, timeout=30) if r.WhichOneof("event") == "final")
                  for _ in range(3)]
        info = stub.ModelInfo(A.ModelInfoRequest(), timeout=10)
    engine = Engine(llama_dir, EngineConfig(num_blocks=64))
    engine.add_request(encode_prompt(engine.tokenizer, "Name three rivers."),
                       SamplingParams(max_tokens=20, temperature=0.8, seed=3))
    local = RequestStream(engine.tokenizer, engine.fork_id, engine.child_id, engine.eos_ids)
    for ev in engine.run_to_completion():
        local.feed(ev)
    assert local.final.text and [f.text for f in finals] == [local.final.text] * 3
    assert [f.usage.completion_tokens for f in finals] == [local.final.usage["completion_tokens"]] * 3
    assert info.workers == 2 and info.total_kv_blocks == 2 * BLOCKS


def test_killed_worker_gives_unavailable_and_traffic_moves(cluster):
    """Two requests, one on each worker, each held running after three steps: the killed worker's request
    ends UNAVAILABLE while the other runs on (it cannot end by itself), and new requests go to the live
    worker."""
    address, workers, worker_addresses, router, gates = cluster
    marks = [g.hold(3) for g in gates]  # each worker makes three steps of its request, then holds
    try:
        with grpc.insecure_channel(address) as ch:
            stub = pb.apar_pb2_grpc.AparStub(ch)
            streams = []
            for _ in range(2):  # one on each worker: a request goes where the most blocks are free
                streams.append(Stream(stub, LONG))
                streams[-1].wait_running()
                stub.ModelInfo(A.ModelInfoRequest(), timeout=10)  # the router reads every worker's load again
            infos = [worker_info(a) for a in worker_addresses]
            assert [i.running for i in infos] == [1, 1], (
                "the requests were not spread: (running, waiting, free blocks) per worker "
                f"{[(i.running, i.waiting, i.free_blocks) for i in infos]}; router log:\n{''.join(router.lines[-20:])}")
            for g, mark in zip(gates, marks):
                g.wait_held(1, mark)  # both held mid-request
            workers[0].kill()
            # the request on the killed worker ends with UNAVAILABLE (not at its 60 s deadline); the other runs on
            wait_until(lambda: any(s.ended for s in streams), 30, "the killed worker's request to end")
            [failed] = [s for s in streams if s.ended]
            assert failed.code == "UNAVAILABLE", failed.code
            [other] = [s for s in streams if not s.ended]
            assert other.running
            mark = len(workers[1].lines)
            other.cancel()
            assert other.join(10).code == "CANCELLED"
            gates[1].wait_held(0, mark)  # the live worker ended it
            gates[1].open()
            short = A.GenerateRequest(prompt="hi", sampling=pb.common_pb2.SamplingParameters(max_tokens=5,
                                                                                           ignore_eos=True))
            for _ in range(4):
                final = [r.final for r in stub.Generate(short, timeout=30) if r.WhichOneof("event") == "final"][0]
                assert final.usage.completion_tokens == 5
            assert stub.ModelInfo(A.ModelInfoRequest(), timeout=10).workers == 1
    finally:
        for g in gates:
            g.open()


def test_fuzzed_worker_requests_never_crash_it(llama_dir):
    import random

    port = free_port()
    worker = Proc("worker", "--model", str(llama_dir), "--port", str(port), "--kv-blocks", "32")
    worker.wait_for("listening on")
    rng = random.Random(2)
    W = pb.worker_pb2
    codes = set()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb.worker_pb2_grpc.WorkerStub(ch)
            raw = ch.unary_stream("/apar.v1.Worker/Generate", request_serializer=None, response_deserializer=None)
            for i in range(1000):
                if i % 2:
                    call = raw(bytes(rng.randrange(256) for _ in range(rng.randrange(64))), timeout=10)
                else:
                    req = W.WorkerRequest(
                        request_id=rng.choice(["", "r", "x" * 300, f"id{i}"]),
                        prompt_ids=[rng.choice([0, 5, 2**31, 2**32 - 1]) for _ in range(rng.randrange(4))],
                        sampling=pb.common_pb2.SamplingParameters(max_tokens=rng.choice([0, 1, 3, 2**32 - 1]),
                                                                  temperature=rng.choice([0, 1, -1, 1e39]),
                                                                  top_k=rng.choice([0, 5, 2**32 - 1])),
                        limits=pb.common_pb2.Limits(max_depth=rng.randrange(3)), auto_regressive=rng.random() < .5)
                    call = stub.Generate(req, timeout=10)
                try:
                    for _ in call:
                        pass
                    codes.add("OK")
                except grpc.RpcError as exc:
                    codes.add(exc.code().name)
            assert codes <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes
            info = stub.Info(W.WorkerInfoRequest(), timeout=5)
            assert info.free_blocks == info.num_blocks == 32
    finally:
        worker.stop()
