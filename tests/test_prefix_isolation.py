"""The prefix cache per API key, on loopback: a key's repeat of its own prompt hits the cache on both doors
(gRPC and HTTP alike, the salt is the key's, not the door's), while another key sending the same prompt,
whole or streamed, with n answers, is served from nothing (`cached_tokens: 0`). `--shared-prefix-cache`
turns the isolation off: then the second key sees the first key's blocks, which shows the zero above
comes from the salt, not from an evicted block."""
from __future__ import annotations

import json

import grpc
import httpx
import pytest

from apar.protogen import stubs
from tests.procs import Proc, free_port
from tests.security_helpers import KEYS, keyfile  # noqa: F401 (keyfile: a fixture)

pb = stubs()
A = pb.apar_pb2
# about 90 tokens: five or more full blocks of 16
PROMPTS = [f"Key one's private note {n}: " + " ".join(f"item {i} costs {i * 7 + n} coins" for i in range(12))
           for n in range(4)]


def start(model_dir, keyfile, *extra: str):
    port, http_port = free_port(), free_port()
    proc = Proc("serve", "--model", str(model_dir), "--port", str(port), "--http-port", str(http_port),
                "--kv-blocks", "256", "--served-model-name", "demo", "--api-key-file", str(keyfile), *extra)
    proc.wait_for("listening on")
    s = type("Served", (), {})()
    s.proc, s.url = proc, f"http://127.0.0.1:{http_port}"
    s.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    s.stub = pb.apar_pb2_grpc.AparStub(s.channel)
    s.http = httpx.Client(timeout=60)
    return s


def stop(s) -> None:
    s.http.close()
    s.channel.close()
    s.proc.stop()


@pytest.fixture(scope="module")
def isolated(llama_dir, keyfile):
    s = start(llama_dir, keyfile)
    yield s
    stop(s)


def http_cached(s, key: str, prompt: str, stream: bool = False, n: int = 1) -> int:
    body = {"model": "demo", "prompt": prompt, "max_tokens": 2, "n": n}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r = s.http.post(f"{s.url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, json=body)
    assert r.status_code == 200, r.text
    if not stream:
        usage = r.json()["usage"]
    else:
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        usage = next(e["usage"] for e in events if e.get("usage"))
    return usage["prompt_tokens_details"]["cached_tokens"]


def grpc_cached(s, key: str, prompt: str) -> int:
    req = A.GenerateRequest(prompt=prompt, raw_prompt=True, sampling=pb.common_pb2.SamplingParameters(max_tokens=2))
    finals = [m.final for m in s.stub.Generate(req, timeout=60, metadata=(("authorization", f"Bearer {key}"),))
              if m.WhichOneof("event") == "final"]
    return finals[0].usage.cached_tokens


def test_another_keys_prompt_is_never_served_from_the_cache(isolated):
    s = isolated
    first, second = KEYS
    # gRPC door: the first key's repeat hits, the second key's copy of the same prompt does not
    assert grpc_cached(s, first, PROMPTS[0]) == 0
    hit = grpc_cached(s, first, PROMPTS[0])
    assert hit >= 64, hit  # four full blocks or more from the cache
    assert grpc_cached(s, second, PROMPTS[0]) == 0
    assert grpc_cached(s, second, PROMPTS[0]) == hit  # then its own copy is cached, for it alone

    # HTTP door, whole, streamed and with n answers: the same
    assert http_cached(s, first, PROMPTS[1]) == 0
    assert http_cached(s, first, PROMPTS[1]) == hit
    assert http_cached(s, second, PROMPTS[1], stream=True, n=2) == 0
    assert http_cached(s, first, PROMPTS[1], stream=True) == hit

    # one key's cache across both doors: the salt is the key's
    assert http_cached(s, first, PROMPTS[2]) == 0
    assert grpc_cached(s, first, PROMPTS[2]) == hit
    assert grpc_cached(s, second, PROMPTS[2]) == 0


def test_shared_prefix_cache_lets_every_key_hit_every_keys_blocks(llama_dir, keyfile):
    s = start(llama_dir, keyfile, "--shared-prefix-cache")
    try:
        first, second = KEYS
        assert http_cached(s, first, PROMPTS[3]) == 0
        hit = http_cached(s, second, PROMPTS[3])
        assert hit >= 64, hit
        assert grpc_cached(s, second, PROMPTS[3]) == hit
    finally:
        stop(s)
