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
