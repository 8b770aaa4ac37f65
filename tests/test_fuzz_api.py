"""Property-based fuzzing of both public APIs' bodies against one `apar serve` (the tiny random model):
the OpenAI-shaped HTTP bodies and the gRPC `GenerateRequest`, with odd Unicode (lone surrogates included),
NULs, huge and negative numbers, wrong types and deep nesting. Every answer is a documented status (HTTP
2xx/4xx, gRPC OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED), never a 500 or INTERNAL/UNKNOWN, and the
server's log holds no traceback. The examples are bounded so the module runs in well under a minute."""
from __future__ import annotations

import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from apar.protogen import stubs
from tests.procs import Proc, free_port

pb = stubs()
A, C = pb.apar_pb2, pb.common_pb2
MODEL = "apar-fuzz"
HTTP_OK = {200, 400, 404, 413, 415, 429}
GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def server(llama_dir):
    port = free_port()
    proc = Proc("serve", "--model", str(llama_dir), "--port", str(port), "--http-port", "0", "--kv-blocks", "96",
                "--block-size", "16", "--served-model-name", MODEL)
    http_port = int(proc.wait_for(r"listening on .*HTTP on 127\.0\.0\.1:(\d+)").group(1))
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield {"proc": proc, "http": http, "channel": channel, "stub": pb.apar_pb2_grpc.AparStub(channel)}
    proc.stop()


def tracebacks(proc: Proc, since: int = 0) -> list[str]:
    return [line for line in proc.lines[since:] if "Traceback" in line or line.startswith("ERROR")
            or " ERROR " in line]


# ---- values -------------------------------------------------------------------------------------------
# every code point, lone surrogates and NUL included
any_char = st.characters(codec=None, categories=None)
odd_text = st.one_of(st.text(any_char, max_size=40), st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "\x00" * 10, "\u202e\u200b\ufeff", "\U0010ffff", "[Fork]", "<|im_start|>",
     "\r\n" * 5, "é" * 100]))
huge_ints = st.sampled_from([-(1 << 80), -(1 << 63) - 1, -1, 0, 1 << 31, 1 << 32, 1 << 63, 1 << 64, 10**30])
numbers = st.one_of(st.integers(-1000, 1000), huge_ints, st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)), max_leaves=12)


def small_tokens(v):
    """Keep a valid max_tokens small: the fuzz is about refusals, not about generating."""
    if isinstance(v, int) and not isinstance(v, bool) and 8 < v <= (1 << 20):
        return 1 + v % 8
    return v


good_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                      "content": odd_text})
messages = st.one_of(st.lists(good_message, min_size=1, max_size=3), json_values,
                     st.lists(st.one_of(good_message, json_values), max_size=3))
fields = {
    "messages": messages, "prompt": st.one_of(odd_text, json_values, st.lists(odd_text, max_size=2)),
    "max_tokens": st.one_of(st.integers(1, 8), numbers, json_values), "temperature": st.one_of(numbers, json_values),
    "top_p": numbers, "n": st.one_of(st.integers(1, 3), numbers), "seed": numbers,
    "stop": st.one_of(odd_text, st.lists(odd_text, max_size=9), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(st.just({"include_usage": True}), json_values), "user": json_values,
    "apar": st.one_of(st.fixed_dictionaries({}, optional={
        "auto_parallel": st.booleans(), "max_threads": numbers, "max_depth": numbers,
        "stream": st.sampled_from(["linear", "threads", "x"]), "ignore_eos": st.booleans()}), json_values),
    "frequency_penalty": numbers, "presence_penalty": numbers, "repetition_penalty": numbers,
    "logprobs": json_values, "tools": json_values, "max_completion_tokens": numbers, odd_text: json_values,
}


@st.composite
def bodies(draw):
    keys = draw(st.lists(st.sampled_from([k for k in fields if isinstance(k, str)]), max_size=6, unique=True))
    body = {k: draw(fields[k]) for k in keys}
    if draw(st.booleans()):
        body[draw(odd_text)] = draw(json_values)
    body["model"] = draw(st.one_of(st.just(MODEL), st.just(MODEL), st.just(MODEL), json_values))
    for k in ("max_tokens", "max_completion_tokens"):
        if k in body:
            body[k] = small_tokens(body[k])
    body.setdefault("max_tokens", 4)
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 3:
        body["n"] = 1 + body["n"] % 3
    return body


def encode(body) -> bytes:
    # lone surrogates pass as JSON escapes (valid JSON); NaN and Infinity as Python's json writes them
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def post(server, path: str, content: bytes) -> httpx.Response:
    r = server["http"].post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code in HTTP_OK, (r.status_code, r.text[:500], content[:300])
    if r.status_code >= 400:
        assert isinstance(r.json()["error"]["message"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
        assert '"internal_error"' not in r.text
    return r


# ---- HTTP ---------------------------------------------------------------------------------------------
def test_a_lone_surrogate_is_a_clear_400(server):
    before = len(server["proc"].lines)
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
                       ("/v1/completions", {"prompt": "hi \udfff there"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                           {"type": "text", "text": "x\ud83d"}]}]}),
                       ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]})):
        r = server["http"].post(path, content=encode({"model": MODEL, "max_tokens": 4, **body}),
                                headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "surrogate" in r.json()["error"]["message"]
    assert not tracebacks(server["proc"], before)


@FUZZ
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=bodies())
@example(path="/v1/chat/completions", body={"model": MODEL, "messages": [{"role": "user", "content": "\x00\x00"}],
                                            "max_tokens": 4})
@example(path="/v1/completions", body={"model": MODEL, "prompt": "hi", "max_tokens": 1 << 64, "n": -1})
@example(path="/v1/completions", body={"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True, "n": 3,
                                       "stop": ["\x00", "e"]})
def test_fuzzed_http_bodies_get_documented_statuses(server, path, body):
    post(server, path, encode(body))


@FUZZ
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), raw=st.one_of(
    st.binary(max_size=200), st.text(any_char, max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass"))))
@example(path="/v1/chat/completions", raw=b"[" * 100_000 + b"]" * 100_000)
@example(path="/v1/completions", raw=b'{"model": "apar-fuzz", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
@example(path="/v1/completions", raw=b'{"model": "apar-fuzz", "prompt": "a\x00b", "max_tokens": NaN}')
@example(path="/v1/completions", raw=b'{"model": "apar-fuzz", "prompt": "hi", "max_tokens": 1e400}')
@example(path="/v1/completions", raw=b'{"model": "apar-fuzz", "prompt": "\\ud800", "prompt": "hi", "max_tokens": 2}')
def test_fuzzed_raw_bytes_get_documented_statuses(server, path, raw):
    post(server, path, raw)


def test_no_traceback_after_the_http_fuzz(server):
    assert not tracebacks(server["proc"]), tracebacks(server["proc"])[:5]


# ---- gRPC ---------------------------------------------------------------------------------------------
u32 = st.one_of(st.integers(0, 8), st.sampled_from([0, 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1]))
f32 = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, 2.0]))
proto_text = st.text(st.characters(codec="utf-8"), max_size=40)  # protobuf strings hold no lone surrogates


@st.composite
def generate_requests(draw):
    sampling = C.SamplingParameters(temperature=draw(f32), top_k=draw(u32), ignore_eos=draw(st.booleans()),
                                    frequency_penalty=draw(f32), presence_penalty=draw(f32))
    max_tokens = draw(st.one_of(st.none(), u32))
    if max_tokens is not None:
        sampling.max_tokens = max_tokens if max_tokens <= 8 or max_tokens > (1 << 20) else 1 + max_tokens % 8
    for name, strat in (("top_p", f32), ("seed", st.integers(0, (1 << 64) - 1)), ("n", u32),
                        ("repetition_penalty", f32)):
        v = draw(st.one_of(st.none(), strat))
        if v is not None:
            setattr(sampling, name, min(v, 3) if name == "n" and v > 3 and v < (1 << 20) else v)
    sampling.stop_token_ids.extend(draw(st.lists(st.integers(0, (1 << 32) - 1), max_size=3)))
    limits = A.Limits() if hasattr(A, "Limits") else C.Limits()
    for name in ("max_threads", "max_depth"):
        v = draw(st.one_of(st.none(), u32))
        if v is not None:
            setattr(limits, name, v)
    req = A.GenerateRequest(prompt=draw(proto_text), sampling=sampling, limits=limits,
                            stream=draw(st.integers(-5, 8)), auto_regressive=draw(st.booleans()),
                            raw_prompt=draw(st.booleans()), stop=draw(st.lists(proto_text, max_size=10)))
    for _ in range(draw(st.integers(0, 3))):
        req.messages.add(role=draw(st.one_of(st.sampled_from(["user", "system", "assistant"]), proto_text)),
                         content=draw(proto_text))
    return req


def call(server, request_bytes: bytes) -> grpc.StatusCode:
    method = server["channel"].unary_stream("/apar.v1.Apar/Generate", request_serializer=None,
                                            response_deserializer=A.GenerateResponse.FromString)
    try:
        for _ in method(request_bytes, timeout=60):
            pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@FUZZ
@given(req=generate_requests())
def test_fuzzed_grpc_requests_get_documented_statuses(server, req):
    code = call(server, req.SerializeToString())
    assert code in GRPC_OK, (code, req)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2) holding `payload`."""
    n, out = len(payload), bytearray([number << 3 | 2])
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out) + payload


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.binary(max_size=40).map(lambda b: _field(1, b + b"\xed\xa0\x80")),
                     st.binary(max_size=40).map(lambda b: _field(2, _field(2, b"\xff" + b)))))
@example(raw=_field(1, "\ud800".encode("utf-8", "surrogatepass")))  # a lone surrogate as (invalid) UTF-8
@example(raw=_field(2, _field(1, b"user") + _field(2, b"\xc3\x28")))
@example(raw=b"\x0a" + b"\xff" * 12)
def test_malformed_grpc_bytes_are_invalid_argument(server, raw):
    code = call(server, raw)
    assert code in GRPC_OK, code


def test_no_traceback_after_the_grpc_fuzz(server):
    assert not tracebacks(server["proc"]), tracebacks(server["proc"])[:5]
    # and the server still answers
    req = A.GenerateRequest(prompt="hi", stream=A.STREAM_MODE_FINAL, sampling=C.SamplingParameters(max_tokens=3))
    assert call(server, req.SerializeToString()) == grpc.StatusCode.OK
