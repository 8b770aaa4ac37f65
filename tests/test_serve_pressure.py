"""`apar serve` with a KV pool too small for its load: requests are preempted and recomputed behind the
public API; each client still streams exactly the answer it gets alone, and the metrics count it."""
from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from apar.protogen import stubs
from tests.faults import wait_until
from tests.procs import Proc, free_port

pb = stubs()
A = pb.apar_pb2
KV_BLOCKS = 24  # of 16 tokens: room for about 3 of the 8 answers below at once


@pytest.fixture(scope="module")
def server(llama_dir):
    port, mport = free_port(), free_port()
    proc = Proc("serve", "--model", str(llama_dir), "--port", str(port), "--kv-blocks", str(KV_BLOCKS),
                "--block-size", "16", "--max-batch-tokens", "64", "--metrics-port", str(mport))
    proc.wait_for(r"listening on")
    yield f"127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics"
    proc.stop()


def generate(address: str, prompt: str) -> tuple[str, object]:
    with grpc.insecure_channel(address) as channel:
        stub = pb.apar_pb2_grpc.AparStub(channel)
        text, final = [], None
        req = A.GenerateRequest(prompt=prompt, stream=A.STREAM_MODE_LINEAR, sampling=pb.common_pb2.SamplingParameters(
            max_tokens=110, ignore_eos=True))
        for resp in stub.Generate(req, timeout=120):
            if resp.WhichOneof("event") == "delta":
                text.append(resp.delta)
            elif resp.WhichOneof("event") == "final":
                final = resp.final
        return "".join(text), final


def metrics(url: str) -> dict[str, float]:
    """Every sample summed by metric name (the series carry model_name)."""
    values: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name = series.split("{")[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def test_preempted_streams_equal_their_answers_alone(server):
    address, metrics_url = server
    prompts = [f"Request {i}: list the planets, one by one, with a fact each." for i in range(8)]
    alone = [generate(address, p) for p in prompts]
    assert all(final.usage.preemptions == 0 for _, final in alone)
    with ThreadPoolExecutor(len(prompts)) as pool:
        crowded = list(pool.map(lambda p: generate(address, p), prompts))
    assert sum(final.usage.preemptions for _, final in crowded) > 0
    for (text, final), (solo_text, solo) in zip(crowded, alone):
        assert text == solo_text == final.text  # nothing lost or repeated in the stream
        assert final.usage.completion_tokens == solo.usage.completion_tokens == 110
        assert final.usage.recomputed_tokens > 0 or final.usage.preemptions == 0
    m = metrics(metrics_url)
    preempted = sum(final.usage.preemptions for _, final in crowded)
    assert m["apar_num_preemptions_total"] == preempted
    assert m["apar_recomputed_tokens_total"] == sum(f.usage.recomputed_tokens for _, f in crowded) > 0
    assert m["apar_forks_refused_total"] == sum(f.usage.forks_refused for _, f in alone + crowded)

    def idle() -> bool:
        now = metrics(metrics_url)
        return now["apar_num_requests_waiting"] == now["apar_num_requests_running"] == 0

    wait_until(idle, 10, "running and waiting back to 0")
    info = pb.apar_pb2_grpc.AparStub(grpc.insecure_channel(address)).ModelInfo(A.ModelInfoRequest(), timeout=10)
    assert info.free_kv_blocks == info.total_kv_blocks == KV_BLOCKS
