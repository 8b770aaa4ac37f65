"""Separate processes: two workers and a router. A killed worker's clients get UNAVAILABLE promptly and
new requests go to the live one."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from apar.protogen import stubs
from tests.procs import Proc, free_port

pb = stubs()
A = pb.apar_pb2


@pytest.fixture(scope="module")
def cluster(llama_dir):
    ports = [free_port(), free_port()]
    workers = [Proc("worker", "--model", str(llama_dir), "--port", str(p), "--kv-blocks", "64",
                    "--worker-id", f"w{i}") for i, p in enumerate(ports)]
    for w in workers:
        w.wait_for("listening on")
    rport = free_port()
    router = Proc("router", "--model", str(llama_dir), "--workers", ",".join(f"127.0.0.1:{p}" for p in ports),
                  "--port", str(rport))
    router.wait_for("listening on")
    yield f"127.0.0.1:{rport}", workers
    for p in (router, *workers):
        p.stop()


def test_split_services_answer_like_serve(cluster):
    address, _ = cluster
    with grpc.insecure_channel(address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        req = A.GenerateRequest(prompt="Name three rivers.", sampling=pb.common_pb2.SamplingParameters(
            max_tokens=20, temperature=0.8, seed=3))
        finals = [next(r.final for r in stub.Generate(req, timeout=30) if r.WhichOneof("event") == "final")
                  for _ in range(3)]
        assert len({f.text for f in finals}) == 1 and finals[0].usage.completion_tokens == 20
        info = stub.ModelInfo(A.ModelInfoRequest())
        assert info.workers == 2 and info.total_kv_blocks == 128


def test_killed_worker_gives_unavailable_and_traffic_moves(cluster):
    address, workers = cluster
    with grpc.insecure_channel(address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        long = A.GenerateRequest(prompt="Tell a long story.", sampling=pb.common_pb2.SamplingParameters(
            max_tokens=5000, ignore_eos=True))
        calls = [stub.Generate(long, timeout=60) for _ in range(4)]  # spread over both workers
        for c in calls:
            next(iter(c))
        outcome: dict[int, tuple[str, float]] = {}

        def drain(i, c):
            try:
                for _ in c:
                    pass
                outcome[i] = ("OK", time.monotonic())
            except grpc.RpcError as exc:
                outcome[i] = (exc.code().name, time.monotonic())

        threads = [threading.Thread(target=drain, args=(i, c)) for i, c in enumerate(calls)]
        for t in threads:
            t.start()
        killed_at = time.monotonic()
        workers[0].kill()
        time.sleep(2.0)
        for c in calls:
            c.cancel()
        for t in threads:
            t.join(10)
        failed = [v for v in outcome.values() if v[0] == "UNAVAILABLE"]
        assert failed, outcome
        assert all(at - killed_at < 2.0 for _, at in failed)  # promptly
        short = A.GenerateRequest(prompt="hi", sampling=pb.common_pb2.SamplingParameters(max_tokens=5))
        for _ in range(4):
            final = [r.final for r in stub.Generate(short, timeout=30) if r.WhichOneof("event") == "final"][0]
            assert final.usage.completion_tokens == 5
        assert stub.ModelInfo(A.ModelInfoRequest()).workers == 1


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
