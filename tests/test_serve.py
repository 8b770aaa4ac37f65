"""`apar serve` as a real process on loopback: streaming, equality with the in-process engine, errors,
cancellation, health and reflection, fuzzing, and 200 concurrent clients."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.params import SamplingParams
from apar.protogen import stubs
from apar.text.prompt import encode_prompt
from apar.text.stream import RequestStream
from tests.faults import Stream, wait_until
from tests.gated import Gate
from tests import security_helpers
from tests.procs import Proc, free_port

pb = stubs()
A = pb.apar_pb2
KV_BLOCKS = 48
METRICS_URL: dict[str, str] = {}
GATES: dict[str, Gate] = {}


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    """`apar serve` whose engine loop a test can hold (`gate`): the tests that act on a running request
    hold it there."""
    port, mport = free_port(), free_port()
    gate = Gate(tmp_path_factory.mktemp("gate") / "gate")
    proc = Proc("serve", "--model", str(llama_dir), "--port", str(port), "--kv-blocks", str(KV_BLOCKS),
                "--block-size", "16", "--metrics-port", str(mport), gate=gate)
    proc.wait_for(r"listening on")
    METRICS_URL[f"127.0.0.1:{port}"] = f"http://127.0.0.1:{mport}/metrics"
    GATES[f"127.0.0.1:{port}"] = gate
    yield f"127.0.0.1:{port}"
    proc.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server) as channel:
        yield pb.apar_pb2_grpc.AparStub(channel)


@pytest.fixture
def gate(server):
    """The server's gate, open again after the test whatever happened."""
    yield GATES[server]
    GATES[server].open()


def request(prompt="Give me three tips for sleep.", mode=A.STREAM_MODE_LINEAR, **sampling):
    return A.GenerateRequest(prompt=prompt, stream=mode, sampling=pb.common_pb2.SamplingParameters(**sampling))


def collect(stub, req, timeout=60):
    deltas, threads, final = [], [], None
    for resp in stub.Generate(req, timeout=timeout):
        kind = resp.WhichOneof("event")
        if kind == "delta":
            deltas.append(resp.delta)
        elif kind == "thread":
            threads.append(resp.thread)
        else:
            final = resp.final
    return deltas, threads, final


def blocks_in_use(stub) -> int:
    info = stub.ModelInfo(A.ModelInfoRequest(), timeout=10)
    return info.total_kv_blocks - info.free_kv_blocks


def metric_values(server) -> dict[str, float]:
    """The server's metrics, each summed over its series (every series carries model_name)."""
    return security_helpers.metric_values(METRICS_URL[server])


def wait_all_free(stub, timeout=5.0) -> None:
    wait_until(lambda: blocks_in_use(stub) == 0, timeout, "every KV block free", every=0.05)


def test_streams_the_in_process_answer(stub, llama_dir):
    deltas, _, final = collect(stub, request(max_tokens=40, temperature=0.9, seed=5))
    assert "".join(deltas) == final.text and final.usage.completion_tokens == 40
    engine = Engine(llama_dir, EngineConfig(num_blocks=64))
    ids = encode_prompt(engine.tokenizer, "Give me three tips for sleep.")
    engine.add_request(ids, SamplingParams(max_tokens=40, temperature=0.9, seed=5))
    local = RequestStream(engine.tokenizer, engine.fork_id, engine.child_id, engine.eos_ids)
    for ev in engine.run_to_completion():
        local.feed(ev)
    assert local.final.text == final.text
    assert final.usage.prompt_tokens == len(ids)


def test_thread_and_final_modes(stub):
    _, threads, final = collect(stub, request(mode=A.STREAM_MODE_THREADS, max_tokens=12))
    assert threads[0].kind == A.ThreadEvent.STARTED and not threads[0].HasField("parent")
    assert threads[-1].kind == A.ThreadEvent.FINISHED
    assert "".join(t.text for t in threads if t.kind == A.ThreadEvent.DELTA) == final.text
    deltas, threads, final2 = collect(stub, request(mode=A.STREAM_MODE_FINAL, max_tokens=12))
    assert deltas == [] and threads == [] and final2.text == final.text


@pytest.mark.parametrize("req, words", [
    (A.GenerateRequest(prompt=""), "prompt is empty"),
    (A.GenerateRequest(prompt="   "), "prompt is empty"),
    (request(top_p=1.5), "top_p"),
    (request(temperature=-1), "temperature"),
    (request(max_tokens=0), "max_tokens"),
    (A.GenerateRequest(prompt="hi", stream=9), "unknown stream mode"),
    (A.GenerateRequest(prompt="word " * 1500), "longer than the model allows"),
    (A.GenerateRequest(prompt="hi", messages=[A.ChatMessage(role="user", content="x")]), "either a prompt"),
    (A.GenerateRequest(messages=[A.ChatMessage(role="robot", content="x")]), "role"),
])
def test_bad_requests_are_invalid_argument(stub, req, words):
    with pytest.raises(grpc.RpcError) as err:
        collect(stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


def test_a_request_the_pool_cannot_hold_is_resource_exhausted(stub):
    with pytest.raises(grpc.RpcError) as err:  # ~1,000 prompt tokens > 48 blocks of 16
        collect(stub, A.GenerateRequest(prompt="a b c d " * 250, raw_prompt=True))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV blocks" in err.value.details()


def running_request(stub, gate: Gate, steps: int, timeout: float = 60.0) -> Stream:
    """A request the held engine admits, then lets run `steps` steps, then holds: it is running (it has
    streamed, and cannot end by itself) until the test opens the gate."""
    mark = gate.hold()
    s = Stream(stub, request(mode=A.STREAM_MODE_THREADS, max_tokens=500, ignore_eos=True), timeout=timeout)
    gate.wait_held(1, mark)  # admitted, no step yet
    gate.wait_held(1, gate.hold(steps))  # `steps` steps, held again
    wait_until(lambda: s.events >= steps or s.ended, 30, f"the events of {steps} steps")
    assert s.running and s.events >= steps
    return s


def test_cancel_mid_stream_frees_the_blocks(server, stub, gate):
    """A request cancelled while it runs (held after five steps) ends CANCELLED, and the server ends it
    and frees its blocks with no further step; it was never counted as answered."""
    answered = metric_values(server)["apar_request_success_total"]
    s = running_request(stub, gate, 5)
    assert blocks_in_use(stub) > 0  # the held loop still answers ModelInfo
    mark = len(gate.proc.lines)
    s.cancel()
    assert s.join(10).code == "CANCELLED"
    gate.wait_held(0, mark)  # the server aborted it while no step could run
    assert blocks_in_use(stub) == 0 and s.final is None
    assert metric_values(server)["apar_request_success_total"] == answered


def test_deadline_frees_the_blocks(server, stub, gate):
    """A deadline that expires while the request streams (held after three steps, so it cannot end by
    itself) ends it with DEADLINE_EXCEEDED, and the server frees its blocks. The deadline is a client's
    choice made before the first event: it doubles from 0.5 s until the first event came before it (on a
    loaded machine the first may take longer); every try ends past its deadline and gives its blocks back."""
    answered = metric_values(server)["apar_request_success_total"]
    tries = []
    for deadline in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        gate.hold(3)
        s = Stream(stub, request(mode=A.STREAM_MODE_THREADS, max_tokens=500, ignore_eos=True), timeout=deadline)
        s.join(deadline + 30)
        tries.append((deadline, s.code, s.events))
        assert s.code == "DEADLINE_EXCEEDED" and s.final is None, tries
        wait_all_free(stub, 10)
        if s.events > 0:  # the deadline hit it while it streamed
            break
    assert tries[-1][2] > 0, tries
    assert metric_values(server)["apar_request_success_total"] == answered


def test_health_and_reflection(server):
    with grpc.insecure_channel(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "apar.v1.Apar"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        answers = list(refl.ServerReflectionInfo(iter(ask), timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "apar.v1.Apar" in names and "grpc.health.v1.Health" in names


def test_fuzzed_requests_never_crash_the_server(server, stub):
    rng = random.Random(1)
    raw = grpc.insecure_channel(server).unary_stream("/apar.v1.Apar/Generate", request_serializer=None,
                                                     response_deserializer=None)
    codes = set()
    for i in range(1500):
        if i % 2:
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
            call = raw(payload, timeout=10)
        else:
            s = pb.common_pb2.SamplingParameters(
                max_tokens=rng.choice([0, 1, 2, 3, 2**32 - 1]), temperature=rng.choice([0, 0.5, -3, 1e30]),
                top_p=rng.choice([0.0, 0.5, 1.0, 7.0]), top_k=rng.choice([0, 1, 2**31]),
                stop_token_ids=rng.sample(range(2**20), rng.randrange(3)))
            req = A.GenerateRequest(prompt=rng.choice(["", "hi", "\x00\ud7ff", "x" * 50]), sampling=s,
                                    stream=rng.randrange(-2, 6), auto_regressive=rng.random() < 0.5,
                                    limits=pb.common_pb2.Limits(max_threads=rng.randrange(0, 4)))
            call = stub.Generate(req, timeout=10)
        try:
            for _ in call:
                pass
            codes.add("OK")
        except grpc.RpcError as exc:
            codes.add(exc.code().name)
    assert codes <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    assert "INVALID_ARGUMENT" in codes
    _, _, final = collect(stub, request(max_tokens=4))
    assert final.usage.completion_tokens == 4
    wait_all_free(stub)


def test_200_concurrent_streaming_clients(server):
    async def one(stub, i):
        text, final = [], None
        async for resp in stub.Generate(request(prompt=f"Question {i}: list three things.", max_tokens=8,
                                                temperature=0.7, seed=i), timeout=120):
            if resp.WhichOneof("event") == "delta":
                text.append(resp.delta)
            elif resp.WhichOneof("event") == "final":
                final = resp.final
        return "".join(text), final

    async def main():
        async with grpc.aio.insecure_channel(server) as channel:
            stub = pb.apar_pb2_grpc.AparStub(channel)
            results = await asyncio.gather(*(one(stub, i) for i in range(200)))
            info = await stub.ModelInfo(A.ModelInfoRequest(), timeout=10)
            return results, info

    results, info = asyncio.run(main())
    assert len(results) == 200
    for text, final in results:
        assert final is not None and final.text == text and final.usage.completion_tokens == 8
    assert info.free_kv_blocks == info.total_kv_blocks


def test_prometheus_metrics(server, stub):
    """One request on the idle server moves each counter by exactly its own share (the server's earlier
    requests are in the baseline)."""
    def values() -> dict[str, float]:
        return metric_values(server)

    wait_all_free(stub)
    before = values()
    assert before["apar_num_requests_running"] == 0
    _, _, final = collect(stub, request(max_tokens=6, ignore_eos=True))
    assert final.usage.completion_tokens == 6
    counted = ("apar_requests_received_total", "apar_request_success_total", "apar_generation_tokens_total",
               "apar_prompt_tokens_total", "apar_worker_step_seconds_count", "apar_e2e_request_latency_seconds_count")
    expected = [1, 1, 6, final.usage.prompt_tokens, final.usage.steps, 1]

    def grown():
        now = values()
        return [now[n] - before[n] for n in counted]

    try:
        wait_until(lambda: grown() == expected, 10, "the counters to settle")
    except AssertionError:
        raise AssertionError(f"{counted} grew by {grown()}, not {expected}") from None
    after = values()
    assert after["apar_kv_blocks_used"] + after["apar_kv_blocks_free"] == KV_BLOCKS
    for name in ("apar_time_to_first_token_seconds_count", "apar_inter_token_latency_seconds_count",
                 "apar_e2e_request_latency_seconds_count", "apar_threads_running", "apar_forks_total",
                 "apar_kv_blocks_released_early_total", "apar_num_requests_waiting", "apar_num_requests_running",
                 "apar_kv_cache_usage_perc", "apar_steps_per_request_count", "apar_attended_tokens_total",
                 "apar_attended_tokens_ar_equivalent_total", "apar_request_success_total"):
        assert name in after, name
