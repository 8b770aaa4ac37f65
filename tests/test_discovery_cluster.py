"""End to end: real worker processes, a real `apar router --discovery kubernetes` process, and the fake
Kubernetes API server (tests/kube_fake.py) listing the workers' Service as EndpointSlices. Requests go
only to the ready worker; when readiness flips, new requests follow it while requests already streaming
from the worker that left run on to their end.

The two workers share one port on two loopback addresses (127.0.0.1 and 127.0.0.2), like two pods of a
Service: one slice, one named port, two endpoints."""
from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from apar.protogen import stubs
from tests.faults import Stream, wait_until, worker_info
from tests.kube_fake import FakeKubeAPI, endpoint, endpoint_slice
from tests.procs import Proc, free_port

pb = stubs()
A = pb.apar_pb2
SVC = "apar-worker"
HOSTS = ("127.0.0.1", "127.0.0.2")


@pytest.fixture(scope="module")
def cluster(long_llama_dir):
    port = free_port()
    workers = [Proc("worker", "--model", str(long_llama_dir), "--host", host, "--port", str(port),
                    "--kv-blocks", "4096", "--worker-id", f"w{i}") for i, host in enumerate(HOSTS)]
    kube = FakeKubeAPI().start()
    router = None
    try:
        for w in workers:
            w.wait_for("listening on")
        rport = free_port()
        router = Proc("router", "--model", str(long_llama_dir), "--discovery", "kubernetes", "--kube-api", kube.url,
                      "--worker-service", SVC, "--worker-namespace", "default", "--port", str(rport))
        router.wait_for("listening on")
        maps = Path(f"/proc/{router.p.pid}/maps").read_text()  # the kubernetes package brings no torch
        assert "libtorch" not in maps and "/torch/" not in maps and "grpc" in maps
        yield kube, router, f"127.0.0.1:{rport}", [f"{h}:{port}" for h in HOSTS], port
    finally:
        for p in (router, *workers):
            if p is not None:
                p.stop()
        kube.stop()


def short(stub) -> int:
    req = A.GenerateRequest(prompt="hi", sampling=pb.common_pb2.SamplingParameters(max_tokens=5, ignore_eos=True))
    [final] = [r.final for r in stub.Generate(req, timeout=60) if r.WhichOneof("event") == "final"]
    return final.usage.completion_tokens


# long enough to be still running when the test acts on it: 16,000 tokens (the router allows 16,384; a pool holds two)
LONG = A.GenerateRequest(prompt="Tell a long story.", stream=A.STREAM_MODE_THREADS,
                         sampling=pb.common_pb2.SamplingParameters(max_tokens=16000, ignore_eos=True))


def load(address: str) -> int:
    info = worker_info(address)
    return info.running + info.waiting


def test_requests_go_only_to_ready_endpoints_and_follow_readiness(cluster):
    kube, router, address, (first, second), port = cluster
    since = len(router.lines)
    kube.apply(endpoint_slice("apar-worker-x7k2p", SVC, [endpoint(HOSTS[0]), endpoint(HOSTS[1], ready=False)],
                              port, extra_ports=(("metrics", 9100),)))
    router.wait_for(rf"1 worker\(s\) {re.escape(first)}\b", 30, since)
    with grpc.insecure_channel(address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        wait_until(lambda: stub.ModelInfo(A.ModelInfoRequest(), timeout=5).workers == 1, 10,
                   "the router to see its worker alive", ignore=(grpc.RpcError,))
        assert [short(stub) for _ in range(6)] == [5] * 6  # every request succeeds
        streams = [Stream(stub, LONG) for _ in range(2)]
        for s in streams:
            s.wait_running()
        assert (load(first), load(second)) == (2, 0), "a request went to the worker that is not ready"

        # the first worker starts terminating (not ready, still serving), the second becomes ready
        since = len(router.lines)
        kube.apply(endpoint_slice("apar-worker-x7k2p", SVC, [
            endpoint(HOSTS[0], ready=False, serving=True, terminating=True), endpoint(HOSTS[1])], port))
        router.wait_for(rf"1 worker\(s\) {re.escape(second)}\b.*removed {re.escape(first)}", 30, since)
        wait_until(lambda: stub.ModelInfo(A.ModelInfoRequest(), timeout=5).workers == 1, 10,
                   "the router to see the second worker alive", ignore=(grpc.RpcError,))
        assert [short(stub) for _ in range(6)] == [5] * 6
        new = Stream(stub, LONG)
        new.wait_running()
        assert (load(first), load(second)) == (2, 1), "a new request went to the terminating worker"
        # the requests already streaming from the worker that left are not cut off: they go on
        marks = [s.events for s in streams]
        wait_until(lambda: all(s.events > m + 20 for s, m in zip(streams, marks)), 30,
                   "the drained worker's requests to go on streaming")
        assert not any(s.ended for s in streams)
        for s in (*streams, new):
            s.cancel()
            assert s.join(10).code == "CANCELLED"
        wait_until(lambda: load(first) == load(second) == 0, 10, "the cancelled requests to be freed")

        # the slice goes away: no worker to route to, UNAVAILABLE
        since = len(router.lines)
        kube.delete("apar-worker-x7k2p")
        router.wait_for(r"0 worker\(s\)", 30, since)
        with pytest.raises(grpc.RpcError) as err:
            short(stub)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
