"""Locking the cluster, on loopback with certificates made here (tests/certs.py): TLS on the public APIs,
API keys (gRPC metadata and HTTP headers, the `openai` client too), mutual TLS between router, worker and
KV manager, Redis with a password and TLS, each limit, fuzzed metadata and headers, and logs that never
hold a key, a password or a prompt."""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from apar.engine.errors import UserError
from apar.protogen import stubs
from services.router.guard import Caller, Guard, Limits, Refused
from services.security import ApiKeys, TLSFiles, bearer, key_id, mask_url, open_channel, redis_url_with_password
from tests.certs import CA
from tests.faults import wait_until
from tests.procs import Proc, free_port, require

pb = stubs()
A, K, W = pb.apar_pb2, pb.kvmanager_pb2, pb.worker_pb2
KEYS = ("k1-Alpha-7f3c9e2d1b", "k2-Bravo-0a8e4c6f2d")
WRONG = "wrong-Key-5e1d3c7b9a"
PROMPT = "Zebra-sentinel prompt: name three rivers."  # must never reach a log
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- certificates

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA(d, "ca1"), CA(d, "ca2")
    p = type("PKI", (), {})()
    p.ca, p.other = ca, other
    p.server = ca.issue("server")  # 127.0.0.1 and localhost
    p.rogue_server = other.issue("server")
    # internal: one name for every service (they are dialled by IP), as the Helm chart does it
    p.internal = ca.issue("internal", dns=("apar-internal",), ips=())
    p.rogue_internal = other.issue("internal", dns=("apar-internal",), ips=())
    return p


def internal_flags(pair, prefix="--tls", name=True) -> list[str]:
    flags = [f"{prefix}-cert", pair.cert, f"{prefix}-key", pair.key, f"{prefix}-ca", pair.ca]
    return flags + ([f"{prefix}-server-name", "apar-internal"] if name else [])


def metric_values(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name = series.split("{")[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def grpc_code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def bearer_md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def generate(stub, key: str | None, prompt: str = PROMPT, max_tokens: int = 4, **kw):
    req = A.GenerateRequest(prompt=prompt, sampling=pb.common_pb2.SamplingParameters(max_tokens=max_tokens), **kw)
    finals = [r.final for r in stub.Generate(req, timeout=30, metadata=bearer_md(key) if key else ())
              if r.WhichOneof("event") == "final"]
    return finals[0]


# ---------------------------------------------------------------- units: keys, URLs, limits

def test_mask_url_hides_passwords():
    assert mask_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert mask_url("rediss://default:p@ss:w@rd@h:6380/2?ssl_ca_certs=/ca.pem") == \
        "rediss://default:***@h:6380/2?ssl_ca_certs=/ca.pem"
    assert mask_url("unix:///run/redis.sock?db=0&password=s3cret") == "unix:///run/redis.sock?db=0&password=***"
    assert mask_url("redis://redis:6379/0") == "redis://redis:6379/0"
    assert mask_url(None) == "None"


def test_redis_password_from_file_or_env_goes_into_the_url(tmp_path):
    import redis

    pw = tmp_path / "pw"
    pw.write_text("p@ss/w:rd?#\n")
    url = redis_url_with_password("rediss://default@redis.example.com:6380/2?ssl_ca_certs=/ca.pem", str(pw), {})
    parsed = redis.connection.parse_url(url)
    assert (parsed["username"], parsed["password"], parsed["host"], parsed["port"], parsed["db"]) == \
        ("default", "p@ss/w:rd?#", "redis.example.com", 6380, 2)
    assert parsed["ssl_ca_certs"] == "/ca.pem" and "p@ss" not in mask_url(url)
    env_url = redis_url_with_password("redis://r:6379/0", None, {"APAR_REDIS_PASSWORD": "from-env"})
    assert redis.connection.parse_url(env_url)["password"] == "from-env"
    unix = redis_url_with_password("unix:///s.sock?db=1", None, {"APAR_REDIS_PASSWORD": "x&y"})
    assert redis.connection.parse_url(unix)["password"] == "x&y"
    assert redis_url_with_password("redis://r:6379/0", None, {}) == "redis://r:6379/0"
    with pytest.raises(UserError, match="given twice"):
        redis_url_with_password("redis://:inline@r:6379/0", str(pw), {})
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        redis_url_with_password("redis://r:6379/0", str(empty), {})


def test_bearer_parsing():
    assert bearer("Bearer abc") == "abc" and bearer("bearer   abc ") == "abc" and bearer(b"Bearer abc") == "abc"
    for bad in (None, "", "Bearer", "Bearer ", "Basic abc", "abc"):
        assert bearer(bad) is None


def test_api_key_file_is_reread_when_it_changes(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text("# keys\nfirst-key\n\n  second-key  \n")
    keys = ApiKeys(["fixed-key"], str(path), check_every_s=0.0)
    assert len(keys) == 3 and all(keys.check(k) for k in ("first-key", "second-key", "fixed-key"))
    assert not keys.check("first-key ") and not keys.check("") and not keys.check(None)
    path.write_text("third-key\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert keys.check("third-key") and not keys.check("first-key") and keys.check("fixed-key")
    path.write_text("")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert not keys.check("third-key") and keys.check("fixed-key")  # an empty file: no file keys
    slow = ApiKeys([], str(path), check_every_s=3600)
    path.write_text("late-key\n")
    assert not slow.check("late-key")  # looked at most once per check_every_s


def test_key_file_cases_a_bad_line_a_missing_file_an_empty_flag(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text("kept-key\nrevoked-key\n")
    keys = ApiKeys([], str(path), check_every_s=0.0)
    assert keys.check("revoked-key")
    with caplog.at_level(logging.WARNING, logger="services.security"):
        # revoking one key while a typo sits on another line: the typo is skipped, the revocation applies
        path.write_text("kept-key\nnew key with spaces\nnewer-key\n")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        assert not keys.check("revoked-key") and keys.check("kept-key") and keys.check("newer-key")
        assert "line 2 skipped" in caplog.text and "new key with" not in caplog.text
        path.unlink()  # a deleted key file: no key of it is valid any more
        assert not keys.check("kept-key") and not keys.check("newer-key") and len(keys) == 0
        assert "no key of it is accepted" in caplog.text
        path.write_text("back-key\n")
        assert keys.check("back-key")  # and when it is back, its keys are
    started = tmp_path / "bad"
    started.write_text("a b\ngood-key\n")
    assert ApiKeys([], str(started)).check("good-key")  # at start too: the bad line is skipped
    with pytest.raises(UserError, match="cannot read"):
        ApiKeys([], str(tmp_path / "absent"))  # at start, a missing file is a mistake to report
    with pytest.raises(UserError, match="--api-key-file is empty"):
        ApiKeys([], "")
    cli = subprocess.run([sys.executable, "-m", "apar.cli", "serve", "--model", "x", "--api-key-file", ""],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert cli.returncode == 2 and "--api-key-file is empty" in cli.stderr


def test_no_secret_on_a_command_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "apar.cli", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=60)

    for args in (("serve", "--model", "x", "--api-key", KEYS[0]), ("router", "--model", "x", "--workers", "h:1",
                                                                    "--api-key", KEYS[0]),
                 ("generate", "--server", "h:1", "--prompt", "p", "--api-key", KEYS[0])):
        out = run(*args)
        assert out.returncode == 2 and "command line is readable" in out.stderr and "--api-key-file" in out.stderr
    out = run("kvmanager", "--redis", "redis://:Pw-sentinel-77@127.0.0.1:1/0")
    assert out.returncode == 2 and "holds a password" in out.stderr and "Pw-sentinel" not in out.stderr
    assert "--redis-password-file" in out.stderr


def test_tls_flags_must_come_together(pki):
    with pytest.raises(UserError, match="--tls-key missing"):
        TLSFiles.load(pki.server.cert, None)
    with pytest.raises(UserError, match="--internal-tls-ca missing"):
        TLSFiles.load(pki.server.cert, pki.server.key, flags="--internal-tls", need_ca=True)
    with pytest.raises(UserError, match="not a PEM"):
        TLSFiles.load(__file__, pki.server.key)
    with pytest.raises(UserError, match="does not match"):
        TLSFiles.load(pki.server.cert, pki.rogue_server.key)
    with pytest.raises(UserError, match="not a CA certificate"):
        TLSFiles.load(pki.server.cert, pki.server.key, pki.server.key, need_ca=True)
    assert TLSFiles.load(None, None) is None
    tls = TLSFiles.load(pki.internal.cert, pki.internal.key, pki.internal.ca, "apar-internal", need_ca=True)
    assert tls.mutual and "BEGIN" not in repr(tls)  # the key never shows in a repr


def test_guard_limits_and_one_log_line_each(caplog):
    guard = Guard(ApiKeys(["the-key"]), Limits(max_streams_per_key=2, rate=2.0, burst=3, max_tokens=10,
                                               max_prompt_tokens=5))
    with caplog.at_level(logging.WARNING, logger="services.router.guard"):
        assert guard.authenticate(None, "grpc", "m") is None
        assert guard.authenticate("Bearer nope", "http", "m") is None
        caller = guard.authenticate("Bearer the-key", "http", "m")
        assert (caller.key, caller.door) == (key_id("the-key"), "http")
        t1, t2 = guard.admit(caller), guard.admit(caller)
        with pytest.raises(Refused) as err:
            guard.admit(caller)
        assert err.value.reason == "too_many_streams" and err.value.status == "exhausted"
        t1.release()
        t1.release()  # idempotent
        t3 = guard.admit(caller)  # the third token of the burst
        with pytest.raises(Refused) as err:
            guard.admit(caller)
        assert err.value.reason == "rate_limited" and err.value.retry_after_s >= 1
        other = Caller("other", "grpc")
        guard.admit(other).release()  # buckets and counts are per key
        for t in (t2, t3):
            t.release()
        assert guard.streams(caller.key) == 0
        with pytest.raises(Refused, match="max_tokens 11"):
            guard.check_max_tokens(caller, 11)
        with pytest.raises(Refused, match="prompt of 6 tokens"):
            guard.check_prompt_tokens(caller, 6, "prompt")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and all(line.startswith("refused request: reason=") for line in lines)
    assert "the-key" not in caplog.text and "nope" not in caplog.text
    assert f"key={key_id('the-key')}" in caplog.text and "key=none" in caplog.text
    dropped = guard.admit(other)
    assert guard.streams("other") == 1
    del dropped  # a ticket dropped unreleased gives its place back
    assert guard.streams("other") == 0


def test_each_of_n_answers_counts_toward_the_stream_limit():
    guard = Guard(ApiKeys(["the-key"]), Limits(max_streams_per_key=4))
    caller = guard.authenticate("Bearer the-key", "grpc", "m")
    three = guard.admit(caller, 3)
    assert guard.streams(caller.key) == 3
    with pytest.raises(Refused, match="3 running, this request asks for 2"):
        guard.admit(caller, 2)
    one = guard.admit(caller, 1)
    three.release()
    assert guard.streams(caller.key) == 1
    with pytest.raises(Refused):
        guard.admit(caller, 5)  # more answers than the limit: never
    one.release()
    assert guard.streams(caller.key) == 0


def test_max_threads_and_max_depth_are_bounded_on_both_apis():
    from services.protocol.convert import params_from_pb
    from services.router.http import ApiError, _params

    for field, value in (("max_threads", 1025), ("max_threads", 2**32 - 1), ("max_depth", 1025),
                         ("max_depth", 2**32 - 1), ("max_threads", 0)):
        with pytest.raises(UserError, match=field):
            params_from_pb(pb.common_pb2.SamplingParameters(), pb.common_pb2.Limits(**{field: value}), False)
        with pytest.raises(ApiError, match=field):
            _params({"apar": {field: value}}, chat=False)
    params = params_from_pb(pb.common_pb2.SamplingParameters(), pb.common_pb2.Limits(max_threads=1024, max_depth=1024),
                            False)
    assert (params.max_threads, params.max_depth) == (1024, 1024)


def test_prefix_cache_salts_differ_per_key_unless_shared():
    from apar.engine.prefix import block_hashes

    isolated, shared = Guard(ApiKeys(["key-a", "key-b"])), Guard(ApiKeys(["key-a", "key-b"]), shared_prefix_cache=True)
    a, b = (isolated.authenticate(f"Bearer {k}", "http", "m") for k in ("key-a", "key-b"))
    assert a.cache_salt and b.cache_salt and a.cache_salt != b.cache_salt
    assert isolated.authenticate("Bearer key-a", "grpc", "m").cache_salt == a.cache_salt  # stable per key
    assert {shared.authenticate(f"Bearer {k}", "http", "m").cache_salt for k in ("key-a", "key-b")} == {0}
    assert Guard().authenticate(None, "http", "m").cache_salt == 0  # no keys: one shared cache
    ids = list(range(64))
    plain, salted_a, salted_b = (block_hashes(ids, 16, salt=s) for s in (0, a.cache_salt, b.cache_salt))
    assert plain == block_hashes(ids, 16) and len({*plain, *salted_a, *salted_b}) == 12  # no name shared


# ---------------------------------------------------------------- the public APIs: TLS, keys, limits

LONG = 16000  # the secure server's max_tokens limit: a request of LONG tokens runs on while a test acts


@pytest.fixture(scope="module")
def secure(long_llama_dir, pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("secure")
    keyfile = d / "keys"
    keyfile.write_text("# API keys\n" + "\n".join(KEYS) + "\n")
    port, http_port, mport = free_port(), free_port(), free_port()
    proc = Proc("serve", "--model", str(long_llama_dir), "--port", str(port), "--http-port", str(http_port),
                "--metrics-port", str(mport), "--kv-blocks", "2100", "--served-model-name", "demo",
                "--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--api-key-file", str(keyfile),
                "--max-request-bytes", "65536", "--max-prompt-tokens", "48", "--max-tokens-limit", str(LONG),
                "--max-streams-per-key", "2")
    proc.wait_for("listening on")
    s = type("Secure", (), {})()
    s.proc, s.keyfile, s.ca = proc, keyfile, pki.ca.path
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

    # concurrent streams per key: two run, the third is refused, another key still gets in
    long = A.GenerateRequest(prompt="hi", sampling=pb.common_pb2.SamplingParameters(max_tokens=LONG, ignore_eos=True))
    calls = [secure.stub.Generate(long, timeout=60, metadata=md) for _ in range(2)]
    try:
        for call in calls:
            next(call)  # streaming
        third = secure.stub.Generate(long, timeout=10, metadata=md)
        with pytest.raises(grpc.RpcError) as err:
            next(third)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent" in err.value.details()
        assert dict(err.value.trailing_metadata())["retry-after"] == "1"
        r = secure.client.post(f"{secure.http}/v1/completions", headers=auth,
                               json={"model": "demo", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert generate(secure.stub, KEYS[1]).usage.completion_tokens == 4
    finally:
        for call in calls:
            call.cancel()
    # their places are given back when they end
    wait_until(lambda: grpc_code(lambda: generate(secure.stub, KEYS[0], max_tokens=1)) == grpc.StatusCode.OK,
               10, "key 1 admitted again")
    for _ in range(3):  # streamed and whole HTTP requests give their places back too
        for stream in (True, False):
            r = secure.client.post(f"{secure.http}/v1/completions", headers=auth,
                                   json={"model": "demo", "prompt": "hi", "max_tokens": 2, "stream": stream})
            assert r.status_code == 200 and ("[DONE]" in r.text) == stream
        with secure.client.stream("POST", f"{secure.http}/v1/completions", headers=auth, json={
                "model": "demo", "prompt": "hi", "max_tokens": 1000, "stream": True,
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
    long = A.GenerateRequest(prompt=PROMPT, sampling=pb.common_pb2.SamplingParameters(max_tokens=LONG, ignore_eos=True))
    calls = [secure.stub.Generate(long, timeout=60, metadata=md) for _ in range(2)]
    try:
        for call in calls:
            next(call)  # both streaming: the key's two places are taken
        assert grpc_code(lambda: generate(secure.stub, KEYS[0])) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for call in calls:
            call.cancel()
    secure.proc.stop()  # every line flushed
    log = "".join(secure.proc.lines)
    for secret in (*KEYS, WRONG, getattr(secure, "added", "k3-Charlie"), "Zebra-sentinel", "word word"):
        assert secret not in log, secret
    refused = [line for line in secure.proc.lines if "refused request:" in line]
    reasons = {line.split("reason=")[1].split()[0] for line in refused}
    assert {"unauthenticated", "too_large", "prompt_too_long", "max_tokens", "too_many_streams"} <= reasons
    assert f"key={key_id(KEYS[0])}" in log and f"key={key_id(WRONG)}" in log


# ---------------------------------------------------------------- rate limit

def test_rate_limit_per_key(llama_dir, tmp_path):
    port, http_port = free_port(), free_port()
    (tmp_path / "keys").write_text(f"{KEYS[0]}\n{KEYS[1]}\n")
    proc = Proc("serve", "--model", str(llama_dir), "--port", str(port), "--http-port", str(http_port),
                "--kv-blocks", "64", "--served-model-name", "demo", "--api-key-file", str(tmp_path / "keys"),
                "--rate-limit", "0.5", "--rate-burst", "2", "--metrics-open")
    try:
        proc.wait_for("listening on")
        assert "2 API keys" in "".join(proc.lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb.apar_pb2_grpc.AparStub(ch)
            for _ in range(2):  # the burst
                generate(stub, KEYS[0], max_tokens=1)
            with pytest.raises(grpc.RpcError) as err:
                generate(stub, KEYS[0], max_tokens=1)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in err.value.details()
            trailers = dict(err.value.trailing_metadata())
            assert int(trailers["retry-after"]) >= 1 and int(trailers["grpc-retry-pushback-ms"]) >= 1000
            assert generate(stub, KEYS[1], max_tokens=1).usage.completion_tokens == 1  # another key's bucket
        url = f"http://127.0.0.1:{http_port}"
        r = httpx.post(f"{url}/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 1},
                       headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200  # --metrics-open
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    finally:
        proc.stop()
    log = "".join(proc.lines)
    assert "reason=rate_limited" in log and KEYS[0] not in log and KEYS[1] not in log


# ---------------------------------------------------------------- mutual TLS between the services

def test_mutual_tls_between_router_worker_and_kv_manager(llama_dir, pki):
    kv_port, w_port = free_port(), free_port()
    procs = []
    try:
        kv = Proc("kvmanager", "--port", str(kv_port), "--no-redis", *internal_flags(pki.internal, name=False))
        procs.append(kv)
        kv.wait_for("listening on")
        worker = Proc("worker", "--model", str(llama_dir), "--port", str(w_port), "--kv-blocks", "64",
                      "--kvmanager", f"127.0.0.1:{kv_port}", "--worker-id", "w-tls", *internal_flags(pki.internal))
        procs.append(worker)
        worker.wait_for("listening on")
        assert "(mutual TLS, no cluster token)" in "".join(worker.lines)

        def router(*flags):
            port = free_port()
            p = Proc("router", "--model", str(llama_dir), "--port", str(port), *flags)
            procs.append(p)
            p.wait_for("listening on")
            return f"127.0.0.1:{port}"

        good = router("--kvmanager", f"127.0.0.1:{kv_port}", *internal_flags(pki.internal, "--internal-tls"))
        rogue = router("--workers", f"127.0.0.1:{w_port}", *internal_flags(pki.rogue_internal, "--internal-tls"))
        plain = router("--workers", f"127.0.0.1:{w_port}")
        with grpc.insecure_channel(good) as ch:
            stub = pb.apar_pb2_grpc.AparStub(ch)
            assert generate(stub, None).usage.completion_tokens == 4
            assert stub.ModelInfo(A.ModelInfoRequest(), timeout=5).workers == 1  # workers from the KV manager
        for address in (rogue, plain):  # the worker answers neither
            with grpc.insecure_channel(address) as ch:
                with pytest.raises(grpc.RpcError) as err:
                    generate(pb.apar_pb2_grpc.AparStub(ch), None)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no worker" in err.value.details()

        # straight at the worker and the KV manager: only a certificate from their CA gets in
        good_tls = TLSFiles.load(pki.internal.cert, pki.internal.key, pki.ca.path, "apar-internal", need_ca=True)
        rogue_tls = TLSFiles.load(pki.rogue_internal.cert, pki.rogue_internal.key, pki.ca.path, "apar-internal",
                                  need_ca=True)
        no_cert = grpc.ssl_channel_credentials(Path(pki.ca.path).read_bytes())
        info = W.WorkerInfoRequest()
        with open_channel(f"127.0.0.1:{w_port}", good_tls) as ch:
            assert pb.worker_pb2_grpc.WorkerStub(ch).Info(info, timeout=5).worker_id == "w-tls"
        for ch in (open_channel(f"127.0.0.1:{w_port}", rogue_tls), grpc.insecure_channel(f"127.0.0.1:{w_port}"),
                   grpc.secure_channel(f"127.0.0.1:{w_port}", no_cert,
                                       options=[("grpc.ssl_target_name_override", "apar-internal")])):
            with ch:
                assert grpc_code(lambda: pb.worker_pb2_grpc.WorkerStub(ch).Info(info, timeout=3)) == \
                    grpc.StatusCode.UNAVAILABLE

        from services.worker.kvclient import KVManagerClient

        rogue_worker = KVManagerClient(f"127.0.0.1:{kv_port}", "w-rogue", "127.0.0.1:1", 8, 16, tls=rogue_tls)
        with pytest.raises(grpc.RpcError):
            rogue_worker.register(timeout=3)
        rogue_worker.close()
        with open_channel(f"127.0.0.1:{kv_port}", good_tls) as ch:
            usage = pb.kvmanager_pb2_grpc.KVManagerStub(ch).Usage(K.UsageRequest(), timeout=5)
            assert [u.worker_id for u in usage.workers] == ["w-tls"]  # the rogue never registered

        # the probe's health check speaks mutual TLS
        check = [sys.executable, "-m", "services.healthcheck", f"127.0.0.1:{kv_port}", "--service",
                 "apar.v1.KVManager", "--timeout", "3"]
        ok = subprocess.run(check + internal_flags(pki.internal), capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert ok.returncode == 0, ok.stderr
        refused = subprocess.run(check, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
    finally:
        for p in reversed(procs):
            p.stop()


# ---------------------------------------------------------------- Redis with a password, over TLS

class _TLSRedis:
    """redis-server on loopback speaking TLS only, with a password."""

    def __init__(self, pair, password: str) -> None:
        import redis

        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="apar-redis-tls-")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", pair.cert, "--tls-key-file", pair.key, "--tls-ca-cert-file", pair.ca,
             "--tls-auth-clients", "no", "--requirepass", password, "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=pair.ca,
                                  password=password, socket_connect_timeout=0.5)
        wait_until(lambda: self.client.ping(), 10, "redis-server with TLS", ignore=(redis.RedisError,))

    def close(self) -> None:
        self.client.close()
        self.proc.kill()
        self.proc.wait(timeout=10)


def kv_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="apar.v1.KVManager"),
                                                     timeout=5).status
    return status == health_pb2.HealthCheckResponse.SERVING


def test_kv_manager_reaches_redis_with_a_password_over_tls(pki, tmp_path):
    require("redis-server")
    password = "Redis-Pw-sentinel-4c2e8a"
    redis_srv = _TLSRedis(pki.server, password)
    pwfile = tmp_path / "redis-password"
    pwfile.write_text(password + "\n")
    base = f"rediss://127.0.0.1:{redis_srv.port}/0?ssl_ca_certs={pki.ca.path}"
    procs = []
    try:
        def kvmanager(url, *flags, env=None):
            port = free_port()
            p = Proc("kvmanager", "--port", str(port), "--redis", url, "--reap-every", "0.2", *flags, env=env)
            procs.append(p)
            p.wait_for("listening on")
            return p, f"127.0.0.1:{port}"

        from_file, address = kvmanager(base, "--redis-password-file", str(pwfile))
        wait_until(lambda: kv_serving(address), 10, "the KV manager serving on Redis")
        with grpc.insecure_channel(address) as ch:
            pb.kvmanager_pb2_grpc.KVManagerStub(ch).Register(K.RegisterRequest(
                worker_id="w-redis", address="127.0.0.1:1", num_blocks=8, block_size=16, ttl_seconds=30), timeout=5)
        assert redis_srv.client.hexists("apar:kv:workers", "w-redis")  # the ledger is in that Redis

        wrong_pw = "Wrong-Pw-sentinel-1f9b"
        wrong, wrong_address = kvmanager(base, env={"APAR_REDIS_PASSWORD": wrong_pw})
        wrong.wait_for("Redis unreachable")
        assert not kv_serving(wrong_address)

        twice = subprocess.run([sys.executable, "-m", "apar.cli", "kvmanager", "--port", str(free_port()),
                                "--redis", base.replace("rediss://", f"rediss://:{password}@"),
                                "--redis-password-file", str(pwfile)], capture_output=True, text=True, cwd=ROOT,
                               timeout=60)
        assert twice.returncode == 2 and "holds a password" in twice.stderr and password not in twice.stderr
        assert "rediss://:***@127.0.0.1" in twice.stderr
    finally:
        for p in procs:
            p.stop()
        redis_srv.close()
    for p in procs:
        log = "".join(p.lines)
        assert password not in log and "Wrong-Pw-sentinel" not in log, log
