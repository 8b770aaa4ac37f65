"""The HTTP port against clients that hold connections or fill the log without an API key, on loopback:
500 half-open connections under a lowered descriptor limit, then every one of them closed by the header
timeout; malformed heads, upgrade requests and wrong keys by the hundred leaving a bounded number of log
lines; a path that would forge a log line."""
from __future__ import annotations

import re
import select
import socket
import time

import httpx
import pytest

from tests.faults import wait_until
from tests.procs import Proc, free_port
from tests.security_helpers import KEYS, auth, keyfile  # noqa: F401 (keyfile: a fixture)

NOFILE = 256  # the server's descriptor limit: --http-max-connections is half of it
HEADER_TIMEOUT_S = 2


def closed_within(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes `sock` (EOF or reset) before `deadline` (time.monotonic)."""
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if ready:
            try:
                if not sock.recv(65536):
                    return True
            except (ConnectionResetError, TimeoutError):
                return True
    return False


def test_500_half_open_connections_are_all_closed_and_an_authenticated_request_still_runs(llama_dir, keyfile):
    port, http_port = free_port(), free_port()
    proc = Proc("serve", "--model", str(llama_dir), "--port", str(port), "--http-port", str(http_port),
                "--kv-blocks", "64", "--served-model-name", "demo", "--api-key-file", str(keyfile),
                "--http-header-timeout", str(HEADER_TIMEOUT_S), nofile=NOFILE)
    socks = []
    try:
        proc.wait_for("listening on")
        for _ in range(500):  # each sends part of a head and never the rest
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=10)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            socks.append(sock)
        opened = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", headers=auth(KEYS[0]), timeout=30,
                       json={"model": "demo", "prompt": "hi", "max_tokens": 2, "apar": {"ignore_eos": True}})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
        # every half-open one is closed: shed for room, or by the header timeout once accepted (those the
        # kernel held while descriptors ran short are accepted as others close, then get their 2 s)
        deadline = opened + 60
        still_open = [i for i, sock in enumerate(socks) if not closed_within(sock, deadline)]
        assert not still_open, f"{len(still_open)} of 500 half-open connections still open after 60 s"
        r = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", headers=auth(KEYS[1]), timeout=30)
        assert r.status_code == 200
    finally:
        for sock in socks:
            sock.close()
        proc.stop()
    log = "".join(proc.lines)
    assert "Traceback" not in log and len(proc.lines) < 50, log[-3000:]


@pytest.fixture(scope="module")
def router(llama_dir, keyfile):
    """A router (no torch: it starts fast) in front of a worker address nobody listens on: the HTTP
    port's own checks answer before any worker would be asked."""
    port, http_port = free_port(), free_port()
    proc = Proc("router", "--model", str(llama_dir), "--workers", f"127.0.0.1:{free_port()}", "--port", str(port),
                "--allow-open-internal",  # the public door alone: no worker listens
                "--http-port", str(http_port), "--served-model-name", "demo", "--api-key-file", str(keyfile),
                "--max-streams-per-key", "2")
    proc.wait_for("listening on")
    yield proc, http_port, port
    proc.stop()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while part := sock.recv(65536):
            out += part
        return out


def test_clients_without_a_key_cannot_flood_the_log(router):
    from services.router.guard import REFUSAL_LINES
    from services.router.http_server import NOISE_EVERY_S

    proc, http_port, _ = router
    since, t0 = len(proc.lines), time.monotonic()
    for _ in range(100):
        assert raw_exchange(http_port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
        reply = raw_exchange(http_port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, close\r\n"
                                        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]  # never switched past the key check
    # 500 wrong keys pipelined on one connection: the server answers them as fast as it can
    wrong = b"".join(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong-%d\r\n\r\n" % i
                     for i in range(500))
    with socket.create_connection(("127.0.0.1", http_port), timeout=30) as sock:
        sock.sendall(wrong + b"GET /v1/x%0aINFO%20forged%20line%1b[2J HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Connection: close\r\n\r\n")  # a newline and a terminal escape, once unquoted
        replies = b""
        while part := sock.recv(65536):
            replies += part
    assert replies.count(b"HTTP/1.1 401") == 501
    elapsed = time.monotonic() - t0
    flood = proc.lines[since:]
    refusals = [line for line in flood if "reason=unauthenticated" in line]
    assert len(refusals) <= REFUSAL_LINES * (elapsed + 1), (len(refusals), elapsed)
    for warning in ("Invalid HTTP request received.", "Unsupported upgrade request."):
        assert 1 <= sum(warning in line for line in flood) <= elapsed / NOISE_EVERY_S + 1, "".join(flood[-40:])
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as client:
        # the dropped refusals are counted on the next line logged, in a later second
        wait_until(lambda: client.get("/v1/models", headers=auth("wrong-again")).status_code == 401 and any(
            "more such refusals not logged" in line for line in proc.lines[since:]), 10, "the count of dropped lines")
        assert client.get("/v1/models", headers=auth(KEYS[0])).status_code == 200  # still serving
    assert not any(line.startswith("INFO forged") for line in proc.lines)
    text = "".join(proc.lines[since:])
    assert "Traceback" not in text and "WebSocket library" not in text


def test_pipelined_and_kept_alive_requests_are_still_served(router):
    _, http_port, _ = router
    head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n" % KEYS[0].encode()
    post = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
        sock.sendall(head + b"\r\n" + post + head + b"Connection: close\r\n\r\n")  # three at once
        replies = b""
        while part := sock.recv(65536):
            replies += part
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", replies) == [b"200", b"401", b"200"], replies[:600]
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as client:  # one kept-alive connection
        for key in (KEYS[0], "wrong", KEYS[1], KEYS[0]):
            assert client.get("/v1/models", headers=auth(key)).status_code == (401 if key == "wrong" else 200)


def test_n_answers_count_toward_the_stream_limit_and_thread_caps_hold_on_both_doors(router):
    import grpc

    from apar.protogen import stubs

    pb = stubs()
    _, http_port, grpc_port = router
    url = f"http://127.0.0.1:{http_port}/v1/completions"

    def http(**extra) -> httpx.Response:
        return httpx.post(url, headers=auth(KEYS[0]), timeout=10,
                          json={"model": "demo", "prompt": "hi", "max_tokens": 2, **extra})

    def rpc(sampling=None, limits=None) -> grpc.RpcError:
        request = pb.apar_pb2.GenerateRequest(prompt="hi", sampling=sampling or pb.common_pb2.SamplingParameters(),
                                              limits=limits)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                list(pb.apar_pb2_grpc.AparStub(channel).Generate(request, timeout=10, metadata=(
                    ("authorization", f"Bearer {KEYS[0]}"),)))
        return err.value

    for name in ("max_threads", "max_depth"):  # 1,024 at most, one bound for both doors
        r = http(apar={name: 1025})
        assert r.status_code == 400 and name in r.json()["error"]["message"], r.text
        err = rpc(limits=pb.common_pb2.Limits(**{name: 1025}))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and name in err.details(), err.details()
    r = http(n=3)  # three answers against --max-streams-per-key 2: refused before any worker is asked
    assert r.status_code == 429 and "asks for 3" in r.json()["error"]["message"], r.text
    err = rpc(sampling=pb.common_pb2.SamplingParameters(n=3))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "asks for 3" in err.details()
    assert http(n=2).status_code == 503  # within the limit: on to the worker, which is not there


def test_uvicorns_client_warnings_are_one_per_interval_with_a_count():
    import logging

    from services.router.http_server import ClientNoise

    now = [0.0]
    noise = ClientNoise(every_s=10.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, (), None)

    assert noise.filter(record("Invalid HTTP request received."))
    assert not any(noise.filter(record("Invalid HTTP request received.")) for _ in range(99))
    assert noise.filter(record("Unsupported upgrade request."))  # each message has its own interval
    assert noise.filter(record("Exception in ASGI application"))  # anything else passes untouched
    assert not noise.filter(record("No supported WebSocket library detected. Please use ..."))
    now[0] = 10.0
    later = record("Invalid HTTP request received.")
    assert noise.filter(later) and later.getMessage() == \
        "Invalid HTTP request received. (99 more like it not logged in the last 10 s)"


def test_refusals_are_logged_a_bounded_number_a_second_per_key_and_for_all_unauthenticated(caplog):
    import logging

    from services.router.guard import REFUSAL_LINES, UNAUTHENTICATED, Guard, Limits, LineBudget, Refused
    from services.security import ApiKeys

    now = [0.0]
    guard = Guard(ApiKeys(["key-a", "key-b"]), Limits(rate=1.0, burst=1))
    for name in (UNAUTHENTICATED, key_id_of("key-a"), key_id_of("key-b")):
        guard._log_budgets[name] = LineBudget(REFUSAL_LINES, clock=lambda: now[0])
    a, b = (guard.authenticate(f"Bearer {k}", "http", "m") for k in ("key-a", "key-b"))
    with caplog.at_level(logging.WARNING, logger="services.router.guard"):
        for i in range(1000):  # a client without a key, a new wrong key each time
            assert guard.authenticate(f"Bearer wrong-{i}", "http", "GET /v1/models") is None
        assert len(caplog.records) == REFUSAL_LINES
        assert guard.authenticate("Bearer key-a", "http", "GET /v1/models") is not None  # keys still work
        guard.admit(a)
        for _ in range(1000):  # a key past its rate limit
            with pytest.raises(Refused):
                guard.admit(a)
        assert len(caplog.records) == 2 * REFUSAL_LINES  # its own budget, not the unauthenticated one's
        guard.admit(b)
        with pytest.raises(Refused):
            guard.admit(b)  # another key's refusal is still logged
        assert len(caplog.records) == 2 * REFUSAL_LINES + 1
        now[0] = 1.0
        guard.authenticate(None, "http", "GET /v1/x\nforged")
    last = caplog.records[-1].getMessage()
    assert len(caplog.records) == 2 * REFUSAL_LINES + 2
    assert f"({1000 - REFUSAL_LINES} more such refusals not logged)" in last
    assert "\n" not in last and "GET /v1/x\\nforged" in last


def key_id_of(key: str) -> str:
    from services.security import key_id

    return key_id(key)


def test_an_http_client_that_never_reads_its_stream_is_cut_off_and_its_blocks_freed(long_llama_dir, keyfile):
    """End to end: the HTTP client stops reading, the router stops reading the worker, the worker's
    buffer for the request fills, and the request is cut off long before its time limit (120 s here)."""
    import grpc

    from apar.protogen import stubs

    pb = stubs()
    port, http_port = free_port(), free_port()
    proc = Proc("serve", "--model", str(long_llama_dir), "--port", str(port), "--http-port", str(http_port),
                "--kv-blocks", "2048", "--served-model-name", "demo", "--api-key-file", str(keyfile),
                "--stream-buffer", "64", "--http-request-timeout", "120")
    try:
        proc.wait_for("listening on")
        body = ('{"model": "demo", "prompt": "count", "max_tokens": 16000, "n": 16, "stream": true, '
                '"apar": {"ignore_eos": true}}').encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, filled soon
        sock.connect(("127.0.0.1", http_port))
        t0 = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (KEYS[0].encode(), len(body), body))
        proc.wait_for(r"request \w+ cut off: its client fell more than 64 events behind", 100)
        assert time.monotonic() - t0 < 100  # not the request time limit
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb.apar_pb2_grpc.AparStub(channel)
            md = (("authorization", f"Bearer {KEYS[1]}"),)
            wait_until(lambda: (lambda i: i.free_kv_blocks == i.total_kv_blocks)(
                stub.ModelInfo(pb.apar_pb2.ModelInfoRequest(), timeout=10, metadata=md)), 30, "every block free")
        sock.settimeout(30)  # the client reads at last: what was sent, then why it ended
        received = b""
        while b"data: [DONE]" not in received and (part := sock.recv(65536)):
            received += part
        sock.close()
        assert b"fell behind" in received and received.count(b"data: ") < 16 * 16000
    finally:
        proc.stop()
    assert "Traceback" not in "".join(proc.lines)


def test_a_refused_request_cannot_hold_its_connection_by_trickling_its_body():
    """A 401 is sent before the body is read. A client that then trickles the body it announced keeps
    the connection only for the header timeout, as a slow head would (before: for the request time
    limit, 600 s, and as a busy connection the total cap could not shed)."""
    import asyncio

    from services.router.http_limits import HttpServerLimits
    from services.router.http_server import start_http_server

    async def refuse(scope, receive, send):  # answers at once without reading the body, as HttpGuard does
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def trickle(port: int) -> tuple[float, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            t0, reply = time.monotonic(), b""
            while time.monotonic() - t0 < 20:
                ready, _, _ = select.select([sock], [], [], 0.2)
                if not ready:
                    sock.sendall(b" ")  # a byte of body every 0.2 s
                    continue
                try:
                    part = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not part:
                    break
                reply += part
            return time.monotonic() - t0, reply

    async def main():
        limits = HttpServerLimits(header_timeout_s=1, idle_timeout_s=1, request_timeout_s=60)
        server, task, port = await start_http_server(refuse, "127.0.0.1", 0, limits=limits)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, trickle, port)
        finally:
            server.should_exit = True
            await task

    held, reply = asyncio.run(main())
    assert reply.startswith(b"HTTP/1.1 401")
    assert held < 10, f"the connection was held {held:.1f} s"


def test_health_open_to_anyone_asks_the_workers_at_most_once_a_second():
    """GET /health needs no key. Each call refreshed the worker view, which in cluster mode is a Usage
    call to every KV manager shard: a flood of /health was a flood on the KV manager."""
    import asyncio
    import types

    from services.router.guard import Guard
    from services.router.http import HEALTH_REFRESH_S, build_app
    from services.security import ApiKeys

    class Workers:
        workers: list = []
        calls = 0

        async def refresh(self, force: bool = False) -> None:
            Workers.calls += 1

    gateway = types.SimpleNamespace(guard=Guard(ApiKeys(["the-key"])), workers=Workers(), model_name="demo")
    app = build_app(gateway)

    async def flood() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            replies = await asyncio.gather(*(client.get("/health") for _ in range(200)))
        return [r.status_code for r in replies]

    t0 = time.monotonic()
    codes = asyncio.run(flood())
    elapsed = time.monotonic() - t0
    assert codes == [503] * 200  # no worker: unavailable, answered without a key
    assert 1 <= Workers.calls <= 1 + elapsed / HEALTH_REFRESH_S, (Workers.calls, elapsed)


def test_a_throttled_call_is_shared_by_its_callers():
    import asyncio

    from services.router.http import Throttled

    async def main():
        now = [0.0]
        runs: list[asyncio.Event] = []  # each run waits for its event, set by the test
        started: asyncio.Queue = asyncio.Queue()

        async def fn():
            runs.append(asyncio.Event())
            started.put_nowait(len(runs))
            await runs[-1].wait()
            if len(runs) == 2:
                raise RuntimeError("the second run failed")
            return len(runs)

        call = Throttled(fn, 1.0, clock=lambda: now[0])
        first = [asyncio.ensure_future(call()) for _ in range(5)]
        assert await started.get() == 1
        first[0].cancel()  # one caller goes away: the run goes on for the others
        runs[0].set()
        assert await asyncio.gather(*first[1:]) == [1] * 4 and len(runs) == 1
        assert await call() == 1  # within the interval: the last outcome
        now[0] = 1.0
        second = asyncio.ensure_future(call())
        assert await started.get() == 2
        runs[1].set()
        with pytest.raises(RuntimeError, match="second run"):
            await second
        with pytest.raises(RuntimeError, match="second run"):  # its failure is shared too, until the next run
            await call()
        now[0] = 2.0
        third = asyncio.ensure_future(call())
        assert await started.get() == 3
        runs[2].set()
        assert await third == 3

    asyncio.run(main())


def test_a_json_number_too_long_to_convert_is_a_400_not_a_500(router):
    """Python refuses to turn a number of more than 4,300 digits into an int (a ValueError, which
    json.loads lets through): before, that was a 500 and a traceback in the log per request."""
    proc, http_port, _ = router
    since = len(proc.lines)
    for body in ('{"model": "demo", "prompt": "hi", "max_tokens": %s}' % ("1" * 5000),
                 '{"model": "demo", "prompt": "hi", "seed": -%s}' % ("9" * 100000)):
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", content=body, timeout=10,
                       headers={**auth(KEYS[0]), "Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text
    assert "Traceback" not in "".join(proc.lines[since:])


def test_a_chat_role_that_is_no_string_is_a_400_not_a_500(router):
    proc, http_port, _ = router
    since = len(proc.lines)
    for role in (["user"], {"user": 1}):
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/chat/completions", headers=auth(KEYS[0]), timeout=10,
                       json={"model": "demo", "messages": [{"role": role, "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role", r.text
    assert "Traceback" not in "".join(proc.lines[since:])


def test_500_half_open_connections_on_the_grpc_port_starve_neither_door(llama_dir, keyfile):
    """The gRPC port has its own share of the descriptors and a handshake time limit (10 s). Before, 500
    half-open connections there under a 256-descriptor limit took every descriptor: HTTP requests hung,
    new gRPC calls failed, and asyncio's accept retries logged thousands of tracebacks."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.router.http_limits import GRPC_HANDSHAKE_TIMEOUT_MS

    port, http_port = free_port(), free_port()
    proc = Proc("router", "--model", str(llama_dir), "--workers", f"127.0.0.1:{free_port()}", "--port", str(port),
                "--allow-open-internal",  # the public door alone: no worker listens
                "--http-port", str(http_port), "--served-model-name", "demo", "--api-key-file", str(keyfile),
                nofile=NOFILE)
    socks = []
    try:
        proc.wait_for("listening on")
        for _ in range(500):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"PRI * HTTP/2.0\r\n")  # half an HTTP/2 preface, never the rest
            socks.append(sock)
        opened = time.monotonic()
        r = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", headers=auth(KEYS[0]), timeout=10)
        assert r.status_code == 200
        deadline = opened + GRPC_HANDSHAKE_TIMEOUT_MS / 1000 + 30
        still_open = sum(not closed_within(sock, deadline) for sock in socks)
        assert not still_open, f"{still_open} of 500 half-open gRPC connections still open"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for sock in socks:
            sock.close()
        proc.stop()
    log = "".join(proc.lines)
    assert "Traceback" not in log and len(proc.lines) < 20, log[-3000:]



SERVER_OUT_OF_DESCRIPTORS = """
import asyncio, sys
from services.router.http_limits import HttpServerLimits
from services.router.http_server import start_http_server

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

async def main():
    # more connections allowed than there are descriptors: accepting runs out of them
    server, task, port = await start_http_server(app, "127.0.0.1", 0, limits=HttpServerLimits(max_connections=4096))
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # the flood is on
    errors = loop.get_exception_handler()
    while errors.last < 0:  # until the first failed accept is reported
        await asyncio.sleep(0.02)
    while errors.count == 0:  # until asyncio's retries run, fail and are scheduled again
        await asyncio.sleep(0.02)
    server.should_exit = True
    await task
    while errors.retries_failed == 0:  # until a retry still pending runs, on the closed socket
        await asyncio.sleep(0.02)

asyncio.run(main())
"""


def test_running_out_of_descriptors_logs_lines_not_a_traceback_each():
    """A server allowed more connections than it has descriptors: asyncio reports each failed accept and
    schedules a retry for each, and the retries still pending when the server closes fail on its closed
    socket. Before, each of those failures was a traceback (thousands); now they are a few lines."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", SERVER_OUT_OF_DESCRIPTORS], cwd=root, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)},
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    socks = []
    try:
        port = int(proc.stdout.readline())
        for _ in range(150):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        _, err = proc.communicate("go\n", timeout=60)
    finally:
        for sock in socks:
            sock.close()
        proc.kill()
    assert "cannot accept connections" in err  # it did run out of descriptors
    assert "retries of accepting connections on a closed server failed" in err  # and retried after closing
    assert "Traceback" not in err and len(err.splitlines()) < 20, err[-3000:]
