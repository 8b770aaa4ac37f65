"""Locking the public APIs on loopback with certificates made here (tests/certs.py): TLS, API keys
(gRPC metadata and HTTP headers, the `openai` client too), each limit, fuzzed metadata and headers, and
logs that never hold a key or a prompt."""
from __future__ import annotations

import json
import os
import random
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.security import key_id
from tests.faults import wait_until
from tests.gated import Gate
from tests.procs import Proc, free_port
from tests.security_helpers import (A, KEYS, PROMPT, ROOT, WRONG, bearer_md, generate, grpc_code,
                                    metric_values, pb, pki)  # noqa: F401 (fixtures)


# ---------------------------------------------------------------- the public APIs: TLS, keys, limits

LONG = 400  # the secure server's max_tokens limit


@pytest.fixture(scope="module")
def secure(llama_dir, pki, tmp_path_factory):
    """`apar serve` behind TLS and API keys with every limit set, whose engine loop a test can hold
    (`gate`, see tests/gated.py): a request held there stays running while the test acts."""
    d = tmp_path_factory.mktemp("secure")
    keyfile = d / "keys"
    keyfile.write_text("# API keys\n" + "\n".join(KEYS) + "\n")
    port, http_port, mport = free_port(), free_port(), free_port()
    gate = Gate(d / "gate")
    proc = Proc("serve", "--model", str(llama_dir), "--port", str(port), "--http-port", str(http_port),
                "--metrics-port", str(mport), "--kv-blocks", "128", "--served-model-name", "demo",
                "--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--api-key-file", str(keyfile),
                "--max-request-bytes", "65536", "--max-prompt-tokens", "48", "--max-tokens-limit", str(LONG),
                "--max-streams-per-key", "2", gate=gate)
    proc.wait_for("listening on")
    s = type("Secure", (), {})()
    s.proc, s.keyfile, s.ca, s.gate = proc, keyfile, pki.ca.path, gate
    s.address, s.http, s.metrics = f"127.0.0.1:{port}", f"https://127.0.0.1:{http_port}", \
        f"http://127.0.0.1:{mport}/metrics"
    s.channel = grpc.secure_channel(s.address, grpc.ssl_channel_credentials(Path(pki.ca.path).read_bytes()))
    s.stub = pb.apar_pb2_grpc.AparStub(s.channel)
    s.client = httpx.Client(verify=ssl.create_default_context(cafile=pki.ca.path), timeout=30)
    yield s
    s.client.close()
    s.channel.close()
    proc.stop()


def test_tls_works_and_plaintext_is_refused(secure, pki):
    final = generate(secure.stub, KEYS[0])
    assert final.usage.completion_tokens == 4
    with grpc.insecure_channel(secure.address) as plain:  # plaintext gRPC to the TLS port
        code = grpc_code(lambda: health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3))
        assert code == grpc.StatusCode.UNAVAILABLE
    rogue = grpc.ssl_channel_credentials(Path(pki.other.path).read_bytes())  # trusts another CA only
    with grpc.secure_channel(secure.address, rogue) as ch:
        code = grpc_code(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3))
        assert code == grpc.StatusCode.UNAVAILABLE
    assert secure.client.get(f"{secure.http}/health").status_code == 200
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port
        httpx.get(secure.http.replace("https", "http") + "/health", timeout=5)


def test_no_or_wrong_key_is_refused_and_costs_no_model_work(secure):
    before = metric_values(secure.metrics)
    bad = [(), bearer_md(WRONG), (("authorization", WRONG),), (("authorization", "Basic " + KEYS[0]),),
           (("authorization", "Bearer"),), (("authorization", f"Bearer {KEYS[0]}x"),)]
    req = A.GenerateRequest(prompt=PROMPT, sampling=pb.common_pb2.SamplingParameters(max_tokens=4))
    for md in bad:
        with pytest.raises(grpc.RpcError) as err:
            list(secure.stub.Generate(req, timeout=10, metadata=md))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in err.value.details()
        assert grpc_code(lambda: secure.stub.ModelInfo(A.ModelInfoRequest(), timeout=5, metadata=md)) == \
            grpc.StatusCode.UNAUTHENTICATED
    # reflection needs a key too
    refl = reflection_pb2_grpc.ServerReflectionStub(secure.channel)
    ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
    assert grpc_code(lambda: list(refl.ServerReflectionInfo(iter(ask), timeout=5))) == grpc.StatusCode.UNAUTHENTICATED
    assert list(refl.ServerReflectionInfo(iter(ask), timeout=5, metadata=bearer_md(KEYS[1])))
    body = {"model": "demo", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, {"Authorization": KEYS[0]},
                    {"authorization": f"Token {KEYS[0]}"}):
        for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                             ("GET", "/metrics"), ("GET", "/nowhere")):
            r = secure.client.request(method, secure.http + path, json=body if method == "POST" else None,
                                      headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error"]["code"] == "invalid_api_key"
    after = metric_values(secure.metrics)
    # the router took no request from them and the worker computed nothing for them
    for name in ("apar_requests_received_total", "apar_computed_tokens_total", "apar_prompt_tokens_total"):
        assert after[name] == before[name], name
    assert after["apar_num_requests_running"] == 0


def test_openai_client_with_and_without_a_key(secure, pki):
    import openai

    def client(key):
        return openai.OpenAI(base_url=f"{secure.http}/v1", api_key=key, max_retries=0,
                             http_client=httpx.Client(verify=ssl.create_default_context(cafile=pki.ca.path)))

    with pytest.raises(openai.AuthenticationError) as err:
        client(WRONG).chat.completions.create(model="demo", max_tokens=4,
                                              messages=[{"role": "user", "content": PROMPT}])
    assert err.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(WRONG).models.list()
    ok = client(KEYS[1])
    out = ok.chat.completions.create(model="demo", max_tokens=4, temperature=0,
                                     messages=[{"role": "user", "content": PROMPT}])
    assert out.usage.completion_tokens == 4
    assert [m.id for m in ok.models.list()] == ["demo"]


def test_health_is_open_metrics_keyed_on_the_api_port(secure):
    health = health_pb2_grpc.HealthStub(secure.channel)
    for name in ("", "apar.v1.Apar"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    r = secure.client.get(f"{secure.http}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert secure.client.get(f"{secure.http}/metrics").status_code == 401
    keyed = secure.client.get(f"{secure.http}/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert keyed.status_code == 200 and "apar_requests_received_total" in keyed.text
    assert "apar_requests_received_total" in urllib.request.urlopen(secure.metrics, timeout=5).read().decode()


def two_running(secure, md, req) -> list:
    """Two calls of `req` (a thread-events stream: its first step sends an event) with metadata `md`, both
    admitted while the engine is held, then one step each: both stream, and neither can end until the test
    opens the gate (`end_held` cancels and opens)."""
    mark = secure.gate.hold()
    calls = [secure.stub.Generate(req, timeout=60, metadata=md) for _ in range(2)]
    try:
        secure.gate.wait_held(2, mark)
        secure.gate.wait_held(2, secure.gate.hold(1))
        for call in calls:
            next(call)  # streaming
    except BaseException:
        end_held(secure, calls)
        raise
    return calls


def end_held(secure, calls: list) -> None:
    """Cancel the held calls, wait until the server has ended them, open the gate."""
    mark = len(secure.proc.lines)
    for call in calls:
        call.cancel()
    try:
        secure.gate.wait_held(0, mark)
    finally:
        secure.gate.open()


def test_each_limit_refuses_with_its_status_and_message(secure):
    md = bearer_md(KEYS[0])
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    big = A.GenerateRequest(prompt="x" * 70000)
    with pytest.raises(grpc.RpcError) as err:
        list(secure.stub.Generate(big, timeout=10, metadata=md))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "65536 bytes" in err.value.details()
    r = secure.client.post(f"{secure.http}/v1/completions", headers=auth,
                           json={"model": "demo", "prompt": "x" * 70000})
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]

    with pytest.raises(grpc.RpcError) as err:
        generate(secure.stub, KEYS[0], prompt="word " * 100)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "48 tokens" in err.value.details()
    r = secure.client.post(f"{secure.http}/v1/completions", headers=auth,
                           json={"model": "demo", "prompt": "word " * 100})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"

    with pytest.raises(grpc.RpcError) as err:
        generate(secure.stub, KEYS[0], max_tokens=LONG + 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"({LONG})" in err.value.details()
    r = secure.client.post(f"{secure.http}/v1/chat/completions", headers=auth, json={
        "model": "demo", "max_tokens": LONG + 1, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"

    # concurrent streams per key: two run (held, so neither can end), the third is refused, another key
    # still gets in
    long = A.GenerateRequest(prompt="hi", stream=A.STREAM_MODE_THREADS,
                             sampling=pb.common_pb2.SamplingParameters(max_tokens=LONG, ignore_eos=True))
    calls = two_running(secure, md, long)
    try:
        third = secure.stub.Generate(long, timeout=10, metadata=md)
        with pytest.raises(grpc.RpcError) as err:
            next(third)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent" in err.value.details()
        assert dict(err.value.trailing_metadata())["retry-after"] == "1"
        r = secure.client.post(f"{secure.http}/v1/completions", headers=auth,
                               json={"model": "demo", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        mark = secure.gate.hold(20)  # steps for key 2's four tokens; the two long ones stay far from their end
        assert generate(secure.stub, KEYS[1]).usage.completion_tokens == 4
        secure.gate.wait_held(2, mark)
        assert [call.code() for call in calls if not call.running()] == []  # both still running
    finally:
        end_held(secure, calls)
    # their places are given back when they end
    wait_until(lambda: grpc_code(lambda: generate(secure.stub, KEYS[0], max_tokens=1)) == grpc.StatusCode.OK,
               10, "key 1 admitted again")
    for _ in range(3):  # streamed and whole HTTP requests give their places back too
        for stream in (True, False):
            r = secure.client.post(f"{secure.http}/v1/completions", headers=auth,
                                   json={"model": "demo", "prompt": "hi", "max_tokens": 2, "stream": stream})
            assert r.status_code == 200 and ("[DONE]" in r.text) == stream
        with secure.client.stream("POST", f"{secure.http}/v1/completions", headers=auth, json={
                "model": "demo", "prompt": "hi", "max_tokens": LONG, "stream": True,
                "apar": {"ignore_eos": True}}) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # then the client goes away mid-stream
    calls = [secure.stub.Generate(long, timeout=60, metadata=md) for _ in range(2)]
    try:
        for call in calls:
            next(call)  # both places free again
    finally:
        for call in calls:
            call.cancel()


def test_apar_generate_client_tls_and_api_key(secure, pki):
    base = [sys.executable, "-m", "apar.cli", "generate", "--server", secure.address, "--prompt", PROMPT,
            "--max-tokens", "3", "--json", "--connect-timeout", "10"]
    env = {k: v for k, v in os.environ.items() if k != "APAR_API_KEY"}
    ok = subprocess.run(base + ["--ca", pki.ca.path], env={**env, "APAR_API_KEY": KEYS[0]}, capture_output=True,
                        text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["usage"]["completion_tokens"] == 3
    keyfile = Path(tempfile.mkdtemp()) / "key"
    keyfile.write_text(f"# my key\n{KEYS[1]}\n")
    flag = subprocess.run(base + ["--ca", pki.ca.path, "--api-key-file", str(keyfile)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert flag.returncode == 0, flag.stderr
    none = subprocess.run(base + ["--ca", pki.ca.path], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert none.returncode == 2 and "unauthenticated" in none.stderr
    plain = subprocess.run(base[:-1] + ["2"], env={**env, "APAR_API_KEY": KEYS[0]}, capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert plain.returncode == 2 and "server unavailable" in plain.stderr


def test_fuzzed_metadata_and_headers_crash_nothing(secure, pki):
    rng = random.Random(11)
    printable = "".join(chr(c) for c in range(0x20, 0x7f))
    key_chars = "abcdefghijklmnopqrstuvwxyz0123456789-_."
    raw = secure.channel.unary_stream("/apar.v1.Apar/Generate", request_serializer=None, response_deserializer=None)
    codes = set()
    for i in range(300):
        md = []
        for _ in range(rng.randrange(4)):
            name = "".join(rng.choice(key_chars) for _ in range(rng.randrange(1, 20)))
            if name.startswith("grpc-") or name.startswith(":"):
                continue
            if name.endswith("-bin") or rng.random() < 0.2:
                md.append((name.rstrip("-") + "-bin", bytes(rng.randrange(256) for _ in range(rng.randrange(64)))))
            else:
                md.append((name, "".join(rng.choice(printable) for _ in range(rng.randrange(64))).strip()))
        choice = rng.random()
        if choice < 0.4:
            md.append(("authorization", rng.choice(["Bearer ", "bearer ", "Basic ", ""]) +
                       "".join(rng.choice(printable) for _ in range(rng.choice([0, 1, 30, 4000]))).strip()))
        elif choice < 0.5:
            md += [("authorization", f"Bearer {WRONG}"), ("authorization", f"Bearer {KEYS[0]}")]
        elif choice < 0.6:
            md.append(("authorization-bin", bytes(rng.randrange(256) for _ in range(40))))
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(40))) if i % 2 else \
            A.GenerateRequest(prompt="hi", sampling=pb.common_pb2.SamplingParameters(max_tokens=1)).SerializeToString()
        try:
            call = raw(payload, timeout=10, metadata=md)
            for _ in call:
                pass
            codes.add("OK")
        except grpc.RpcError as exc:
            codes.add(exc.code().name)
        except ValueError:  # metadata the client library itself refuses to send
            codes.add("client-refused")
    assert codes <= {"OK", "UNAUTHENTICATED", "INVALID_ARGUMENT", "client-refused"}, codes
    assert "UNAUTHENTICATED" in codes

    ctx = ssl.create_default_context(cafile=pki.ca.path)
    statuses = set()
    host, port = secure.http.removeprefix("https://").split(":")
    for i in range(150):
        headers = [f"Host: {host}"]
        for _ in range(rng.randrange(5)):
            name = "".join(rng.choice("ABCxyz-_019") for _ in range(rng.randrange(1, 12)))
            value = bytes(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0x80, 0x100), 0x09])
                          for _ in range(rng.randrange(40))).decode("latin-1")
            headers.append(f"{name}: {value}")
        if rng.random() < 0.6:
            token = "".join(chr(rng.randrange(0x21, 0x100)) for _ in range(rng.choice([0, 8, 200, 6000])))
            headers.append(f"{rng.choice(['Authorization', 'authorization', 'AUTHORIZATION'])}: "
                           f"{rng.choice(['Bearer ', 'bearer', 'Bearer  ', 'Digest '])}{token}")
        if rng.random() < 0.2:
            headers += [f"Authorization: Bearer {WRONG}", f"Authorization: Bearer {KEYS[1]}"]
        body = json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 1}).encode()
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/metrics", "/health", "/v1/models", "/%00"])
        head = f"{rng.choice(['POST', 'GET', 'PUT'])} {path} HTTP/1.1\r\n" + "\r\n".join(headers) + \
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as sock, \
                ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(head.encode("latin-1") + body)
            reply = b""
            while b"\r\n" not in reply:
                part = tls.recv(4096)
                if not part:
                    break
                reply += part
        if reply:
            statuses.add(int(reply.split(b" ", 2)[1]))
    assert statuses and not {s for s in statuses if s >= 500}, statuses
    assert 401 in statuses
    assert generate(secure.stub, KEYS[0]).usage.completion_tokens == 4  # still serving


def test_a_message_over_grpcs_own_cap_is_refused_with_a_log_line(secure):
    since = len(secure.proc.lines)
    huge = A.GenerateRequest(prompt="x" * (17 << 20), sampling=pb.common_pb2.SamplingParameters(max_tokens=1))
    with pytest.raises(grpc.RpcError) as err:
        list(secure.stub.Generate(huge, timeout=60, metadata=bearer_md(KEYS[0])))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    secure.proc.wait_for(r"refused request: reason=too_large door=grpc key=%s: request of more than 16777216 bytes"
                         % key_id(KEYS[0]), 30, since)
    assert generate(secure.stub, KEYS[0]).usage.completion_tokens == 4  # still serving


def test_the_key_file_is_reread(secure):
    added = "k3-Charlie-9b7d5f3a1c"
    assert grpc_code(lambda: generate(secure.stub, added)) == grpc.StatusCode.UNAUTHENTICATED
    try:
        secure.keyfile.write_text(f"{KEYS[0]}\n{added}\n")  # k2 removed, k3 added
        wait_until(lambda: grpc_code(lambda: generate(secure.stub, added, max_tokens=1)) == grpc.StatusCode.OK,
                   10, "the new key accepted")
        assert grpc_code(lambda: generate(secure.stub, KEYS[1])) == grpc.StatusCode.UNAUTHENTICATED
        r = secure.client.get(f"{secure.http}/v1/models", headers={"Authorization": f"Bearer {added}"})
        assert r.status_code == 200
    finally:
        secure.keyfile.write_text("\n".join(KEYS) + "\n")
    wait_until(lambda: grpc_code(lambda: generate(secure.stub, KEYS[1], max_tokens=1)) == grpc.StatusCode.OK,
               10, "key 2 accepted again")
    secure.added = added


def test_the_log_never_holds_a_key_or_a_prompt(secure):
    """Every kind of refusal is logged with the key's id, never the key, the prompt or a password: the
    test makes one of each itself (so it holds alone, under -k, or after the others), then reads the log
    of the stopped server."""
    md = bearer_md(KEYS[0])
    assert grpc_code(lambda: generate(secure.stub, WRONG)) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_code(lambda: generate(secure.stub, KEYS[0], prompt=PROMPT + "x" * 70000)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED  # too_large
    assert grpc_code(lambda: generate(secure.stub, KEYS[0], prompt=PROMPT + " word" * 100)) == \
        grpc.StatusCode.INVALID_ARGUMENT  # prompt_too_long
    assert grpc_code(lambda: generate(secure.stub, KEYS[0], max_tokens=LONG + 1)) == grpc.StatusCode.INVALID_ARGUMENT
    long = A.GenerateRequest(prompt=PROMPT, stream=A.STREAM_MODE_THREADS,
                             sampling=pb.common_pb2.SamplingParameters(max_tokens=LONG, ignore_eos=True))
    calls = two_running(secure, md, long)  # the key's two places are taken
    try:
        assert grpc_code(lambda: generate(secure.stub, KEYS[0])) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        end_held(secure, calls)
    secure.proc.stop()  # every line flushed
    log = "".join(secure.proc.lines)
    for secret in (*KEYS, WRONG, getattr(secure, "added", "k3-Charlie"), "Zebra-sentinel", "word word"):
        assert secret not in log, secret
    refused = [line for line in secure.proc.lines if "refused request:" in line]
    reasons = {line.split("reason=")[1].split()[0] for line in refused}
    assert {"unauthenticated", "too_large", "prompt_too_long", "max_tokens", "too_many_streams"} <= reasons
    assert f"key={key_id(KEYS[0])}" in log and f"key={key_id(WRONG)}" in log
