"""The OpenAI-compatible HTTP API of `apar serve --http-port`, on loopback, with the official `openai`
package as the client: the same answers as the gRPC API, n answers, stop strings, errors that name the
parameter, 200 concurrent streams, disconnects that free the blocks, fuzzed bodies."""
from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import urllib.request

import grpc
import httpx
import openai
import pytest

from apar.protogen import stubs
from tests.faults import wait_until
from tests.gated import Gate
from tests.procs import Proc, free_port

pb = stubs()
A = pb.apar_pb2
MODEL = "apar-test"
PROMPT = "Give me three tips for sleep."


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    """`apar serve` with both APIs, whose engine loop a test can hold (`gate`, see tests/gated.py)."""
    port = free_port()
    gate = Gate(tmp_path_factory.mktemp("gate") / "gate")
    proc = Proc("serve", "--model", str(llama_dir), "--port", str(port), "--http-port", "0", "--kv-blocks", "48",
                "--block-size", "16", "--served-model-name", MODEL, gate=gate)
    http_port = int(proc.wait_for(r"listening on .*HTTP on 127\.0\.0\.1:(\d+)").group(1))
    yield {"grpc": f"127.0.0.1:{port}", "http": f"http://127.0.0.1:{http_port}", "port": http_port, "gate": gate}
    proc.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server["grpc"]) as channel:
        yield pb.apar_pb2_grpc.AparStub(channel)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["http"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def grpc_text(stub, max_tokens: int, raw: bool = False, prompt: str = PROMPT) -> str:
    req = A.GenerateRequest(prompt=prompt, raw_prompt=raw, stream=A.STREAM_MODE_FINAL,
                            sampling=pb.common_pb2.SamplingParameters(max_tokens=max_tokens, temperature=0))
    return [r.final for r in stub.Generate(req, timeout=60) if r.WhichOneof("event") == "final"][0].text


def autoregressive_only(server) -> bool:
    """ModelInfo's `autoregressive_only` (False for the APAR test model)."""
    with grpc.insecure_channel(server["grpc"]) as ch:
        return pb.apar_pb2_grpc.AparStub(ch).ModelInfo(A.ModelInfoRequest(), timeout=10).autoregressive_only


def blocks_in_use(stub) -> int:
    info = stub.ModelInfo(A.ModelInfoRequest(), timeout=10)
    return info.total_kv_blocks - info.free_kv_blocks


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(server["http"] + "/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_streamed_chat_is_the_grpc_answer(client, stub):
    expected = grpc_text(stub, 40)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=40, temperature=0, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected and content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                           max_completion_tokens=40, temperature=0)
    assert whole.choices[0].message.content == expected and whole.object == "chat.completion"
    usage = whole.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens <= 40 and usage.model_extra["threads"] >= 1 and usage.model_extra["steps"] >= 1
    assert {"forks", "peak_kv_blocks", "attended_tokens"} <= set(usage.model_extra)


def test_async_completions_stream_with_usage(server, stub):
    expected = grpc_text(stub, 24, raw=True)

    async def main():
        client = openai.AsyncOpenAI(base_url=server["http"] + "/v1", api_key="unused", max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        whole = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
        await client.close()
        return chunks, whole

    chunks, whole = asyncio.run(main())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_a_repeated_prompt_reports_its_cached_tokens(client):
    messages = [{"role": "user", "content": "Compare the rivers of Europe: " + "length, basin and flow; " * 12}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    full = (usage.prompt_tokens - 1) // 16 * 16  # every block but the one holding the last prompt token
    assert usage.prompt_tokens_details.cached_tokens == full > first.usage.prompt_tokens_details.cached_tokens
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens == full
    assert "cached_tokens" not in again.usage.model_extra


def test_n_answers(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], n=3,
                                         max_tokens=16, temperature=1.0, seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) > 1  # sampled: different answers
    assert out.usage.model_extra["threads"] >= 3 and out.usage.completion_tokens <= 3 * 16
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], n=3,
                                           max_tokens=16, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == texts  # the same seed, the same answers
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], n=3,
                                              max_tokens=16, temperature=1.0, seed=7, stream=True)
    parts = {0: "", 1: "", 2: ""}
    for c in streamed:
        for ch in c.choices:
            parts[ch.index] += ch.delta.content or ""
    assert [parts[i] for i in range(3)] == texts


def test_stop_cuts_the_text(client, stub):
    full = grpc_text(stub, 60, raw=True)
    words = full.split()
    stop = next(w for w in words[3:] if len(w) >= 2)  # a word well inside the answer
    cut = full[: full.index(stop)]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, stop=[stop, "\x07"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 60  # the worker was told to stop early, and reported its usage
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": "high"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.2}, "repetition_penalty"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": -1}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"stop": [1, 2]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"apar": {"stream": "sideways"}}, "apar.stream"),
    ({"apar": {"max_threads": "many"}}, "apar.max_threads"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_parameters_get_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body=extra)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and param.split(".")[-1].split("[")[0] in err.value.body["message"]


def test_noop_values_and_user_are_accepted(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         logprobs=False, presence_penalty=0, frequency_penalty=0, user="someone")
    assert out.choices[0].finish_reason in ("stop", "length")


def test_penalties_travel_on_both_doors(client, stub):
    """The same penalties on gRPC and HTTP give the same greedy answer, and change it (the repetition
    penalty below 1 and a negative frequency penalty favour tokens already seen)."""
    sampling = pb.common_pb2.SamplingParameters(max_tokens=30, temperature=0, repetition_penalty=0.5,
                                                frequency_penalty=-1.5, presence_penalty=0.25)
    req = A.GenerateRequest(prompt=PROMPT, stream=A.STREAM_MODE_FINAL, sampling=sampling)
    penalized = [r.final for r in stub.Generate(req, timeout=60) if r.WhichOneof("event") == "final"][0].text
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=30,
                                         temperature=0, frequency_penalty=-1.5, presence_penalty=0.25,
                                         extra_body={"repetition_penalty": 0.5})
    assert out.choices[0].message.content == penalized != grpc_text(stub, 30)
    bad = A.GenerateRequest(prompt=PROMPT, sampling=pb.common_pb2.SamplingParameters(frequency_penalty=7))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(bad, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "frequency_penalty" in err.value.details()


def test_other_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as err:  # ~1,000 prompt tokens > 48 blocks of 16
        client.completions.create(model=MODEL, prompt="a b c d " * 250, max_tokens=4)
    assert err.value.response.headers["Retry-After"] == "1" and "KV blocks" in err.value.body["message"]
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["apar"] == {"auto_parallel": True, "fork_token": "[Fork]",
                                                  "child_token": "[Child]", "max_positions": 1024}
    assert not autoregressive_only(server)
    health = httpx.get(server["http"] + "/health")
    assert health.status_code == 200 and health.json()["workers"] == 1
    assert metric(server, "apar_requests_received_total") > 0 and "apar_worker_step_seconds_count" in \
        httpx.get(server["http"] + "/metrics").text  # serve: one registry for router and worker


def test_200_concurrent_streaming_clients(server, stub):
    """200 streams at once, over 10 distinct (question, seed) requests: each streamed text is the answer its
    request gets alone over gRPC, with exactly its 8 tokens counted."""
    def question(i: int) -> str:
        return f"Question {i % 10}: list three things."

    def alone(i: int) -> str:
        req = A.GenerateRequest(messages=[A.ChatMessage(role="user", content=question(i))], stream=A.STREAM_MODE_FINAL,
                                sampling=pb.common_pb2.SamplingParameters(max_tokens=8, temperature=0.7, seed=i % 10,
                                                                          ignore_eos=True))
        return [r.final for r in stub.Generate(req, timeout=60) if r.WhichOneof("event") == "final"][0].text

    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question(i)}], max_tokens=8, temperature=0.7,
            seed=i % 10, stream=True, stream_options={"include_usage": True}, extra_body={"apar": {"ignore_eos": True}})
        text, usage = "", None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
            usage = c.usage or usage
        return text, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=server["http"] + "/v1", api_key="unused", max_retries=0, timeout=300)
        results = await asyncio.gather(*(one(client, i) for i in range(200)))
        await client.close()
        return results

    expected = [alone(i) for i in range(10)]
    assert len(set(expected)) == 10  # the ten requests tell their streams apart
    results = asyncio.run(main())
    assert [text for text, _ in results] == [expected[i % 10] for i in range(200)]
    assert all(u is not None and u.completion_tokens == 8 for _, u in results)
    wait_until(lambda: blocks_in_use(stub) == 0, 10, "every KV block free", every=0.05)


def _request(stream: bool) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 500, "temperature": 0,
            "stream": stream, "apar": {"ignore_eos": True}}
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data)) + data


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_blocks(server, stub, stream):
    """A client that goes away while its request runs (the engine held after three steps, so the request
    cannot end by itself): the server ends it with no further step, frees its blocks, and never counts
    it as answered."""
    gate = server["gate"]
    finished = metric(server, "apar_request_success_total")
    try:
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as sock:
            mark = gate.hold(3)
            sock.sendall(_request(stream))
            gate.wait_held(1, mark)  # three steps made, held
            if stream:
                got = b""
                while got.count(b"data: ") < 3:  # the role chunk and two with text: the request is decoding
                    part = sock.recv(65536)  # the socket's timeout: a server that goes silent fails the test
                    assert part, f"the server closed the connection: {got!r}"
                    got += part
            assert blocks_in_use(stub) > 0  # the held loop still answers ModelInfo
            mark = len(gate.proc.lines)
        gate.wait_held(0, mark)  # the server aborted it while no step could run
        assert blocks_in_use(stub) == 0
    finally:
        gate.open()
    # freed by the disconnect, not by finishing: the router never counted it as answered
    assert metric(server, "apar_request_success_total") == finished


def test_fuzzed_bodies_never_crash_the_server(server, client):
    rng = random.Random(3)
    values = [None, True, -1, 0, 1, 2.5, 1e308, "", "x", [], [1], {}, {"a": 1}, "\ud7ff\x00", [{"role": "user"}],
              [{"role": "user", "content": "hi"}], {"include_usage": "yes"}, 10**30]
    keys = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream",
            "stream_options", "seed", "apar", "logprobs", "user", "max_completion_tokens", "tools"]
    statuses = set()
    with httpx.Client(base_url=server["http"], timeout=60) as http:
        for i in range(400):
            path = rng.choice(["/v1/chat/completions", "/v1/completions"])
            if i % 4 == 0:
                content = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
            else:
                body = {k: rng.choice(values) for k in rng.sample(keys, rng.randrange(0, 6))}
                if rng.random() < 0.7:
                    body["model"] = MODEL
                if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
                    body["max_tokens"] = min(body["max_tokens"], 4)
                body.setdefault("max_tokens", 4)
                content = json.dumps(body).encode()
            r = http.post(path, content=content, headers={"content-type": "application/json"})
            statuses.add(r.status_code)
            assert r.status_code != 500, r.text
            if r.status_code >= 400:
                assert "message" in r.json()["error"]
    assert 400 in statuses and statuses <= {200, 400, 404, 413, 429}
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         temperature=0)
    assert out.usage.completion_tokens <= 4
