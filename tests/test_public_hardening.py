"""The public door against abuse, on loopback: a flood of half-open connections, slow request heads,
requests past their time limit, cross-site and rebinding requests, and the prefix cache as a channel
between API keys. Each test reproduces a hole first found by review."""
from __future__ import annotations

import json
import os
import select
import socket
import stat
import time
from pathlib import Path

import grpc
import httpx
import pytest

from apar.protogen import stubs
from tests.faults import wait_until
from tests.procs import Proc, free_port
from tests.security_helpers import KEYS, auth, keyfile  # noqa: F401 (keyfile: a fixture)

pb = stubs()
A = pb.apar_pb2
PROMPT = "The secret plan of the first key: " + " ".join(f"step {i} is to wait" for i in range(20))
NOFILE = 256  # the half-open test's server: --http-max-connections defaults to half of it


@pytest.fixture(scope="module")
def served(long_llama_dir, keyfile):
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    proc = Proc("serve", "--model", str(long_llama_dir), "--port", str(port), "--http-port", str(http_port),
                "--metrics-port", str(metrics_port), "--kv-blocks", "512", "--served-model-name", "demo",
                "--api-key-file", str(keyfile), "--http-header-timeout", "1", "--http-request-timeout", "3")
    proc.wait_for("listening on")
    s = type("Served", (), {})()
    s.proc, s.grpc, s.http_port, s.url = proc, f"127.0.0.1:{port}", http_port, f"http://127.0.0.1:{http_port}"
    s.ports = {port, http_port, metrics_port}
    s.client = httpx.Client(timeout=60)
    yield s
    s.client.close()
    proc.stop()


def completion(s, key: str, prompt: str = PROMPT, max_tokens: int = 2, **extra):
    return s.client.post(f"{s.url}/v1/completions", headers=auth(key),
                         json={"model": "demo", "prompt": prompt, "max_tokens": max_tokens, **extra})


def cached(response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


# ---------------------------------------------------------------- the prefix cache is per key

def test_a_second_key_sees_none_of_the_first_keys_cached_prompt(served):
    assert cached(completion(served, KEYS[0])) == 0
    mine = cached(completion(served, KEYS[0]))
    assert mine >= 48  # its own prompt, again: three blocks or more come from the cache
    assert cached(completion(served, KEYS[1])) == 0  # the same prompt from another key: nothing
    assert cached(completion(served, KEYS[1])) == mine  # then its own copy
    wrong_guess = PROMPT.replace("wait", "run")
    assert cached(completion(served, KEYS[1], wrong_guess)) < mine


# ---------------------------------------------------------------- what apar serve listens on

def sockets_of(pid: int) -> tuple[set[tuple[str, int]], set[str]]:
    """(the TCP addresses process `pid` listens on, the paths of its Unix sockets), from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    tcp = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                host, port = cols[1].split(":")
                raw = bytes.fromhex(host)
                ip = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6,
                                      raw[::-1] if len(raw) == 4 else b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                tcp.add((ip.removeprefix("::ffff:"), int(port, 16)))  # an IPv4 address on an IPv6 socket
    unix = {cols[7] for cols in (line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:])
            if len(cols) > 7 and cols[6] in inodes}
    return tcp, unix


def test_apar_serve_listens_on_its_host_only_and_its_worker_on_a_private_socket(served):
    tcp, unix = sockets_of(served.proc.p.pid)
    assert tcp == {("127.0.0.1", port) for port in served.ports}  # no worker port; metrics on --host too
    sock = next(path for path in unix if path.endswith("/worker.sock"))
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700


# ---------------------------------------------------------------- connections: heads, floods, time limits

def eof_within(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes `sock` within `timeout` s (whatever it sent before closing is read)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if ready:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True
    return False


def test_a_request_head_sent_slowly_is_cut_off(served):
    with socket.create_connection(("127.0.0.1", served.http_port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert eof_within(sock, 30)  # --http-header-timeout 1
    with socket.create_connection(("127.0.0.1", served.http_port)) as sock:
        closed = False
        deadline = time.monotonic() + 30
        while not closed and time.monotonic() < deadline:  # a byte every 0.2 s does not keep it open
            try:
                sock.sendall(b"X")
            except OSError:
                break
            closed = eof_within(sock, 0.2)
        assert closed or time.monotonic() < deadline
    assert completion(served, KEYS[0], max_tokens=1).status_code == 200


def test_an_http_request_has_a_time_limit(served):
    t0 = time.monotonic()
    r = completion(served, KEYS[0], "count", max_tokens=16000, apar={"ignore_eos": True})
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
    with served.client.stream("POST", f"{served.url}/v1/completions", headers=auth(KEYS[0]), json={
            "model": "demo", "prompt": "count", "max_tokens": 16000, "stream": True, "apar": {"ignore_eos": True}}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and "request_timeout" in lines[-2]
    assert time.monotonic() - t0 < 120
    with socket.create_connection(("127.0.0.1", served.http_port)) as sock:  # a body that never arrives
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS[0]}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
        reply = b""
        while b"\r\n" not in reply:
            part = sock.recv(4096)
            if not part:
                break
            reply += part
        assert reply.startswith(b"HTTP/1.1 408"), reply
    with grpc.insecure_channel(served.grpc) as ch:  # every request's blocks are free again
        stub = pb.apar_pb2_grpc.AparStub(ch)
        md = (("authorization", f"Bearer {KEYS[0]}"),)
        wait_until(lambda: (lambda i: i.free_kv_blocks == i.total_kv_blocks)(
            stub.ModelInfo(A.ModelInfoRequest(), timeout=10, metadata=md)), 30, "every block free")


def test_host_and_content_type_are_checked(served):
    body = json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 1})
    ok = {**auth(KEYS[0]), "Content-Type": "application/json"}
    assert served.client.post(f"{served.url}/v1/completions", content=body, headers=ok).status_code == 200
    r = served.client.post(f"{served.url}/v1/completions", content=body,
                           headers={**ok, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {k: v for k, v in ok.items() if k != "Content-Type"}
        if ctype:
            headers["Content-Type"] = ctype
        r = served.client.post(f"{served.url}/v1/completions", content=body, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (ctype, r.text)
    for host in ("evil.example", "attacker.example:8000", "127.0.0.1.nip.io"):  # DNS rebinding, cross-site
        r = served.client.get(f"{served.url}/v1/models", headers={**ok, "Host": host})
        assert r.status_code == 421 and r.json()["error"]["code"] == "misdirected_request", host
    for host in (f"localhost:{served.http_port}", f"127.0.0.1:{served.http_port}", "localhost", "[::1]"):
        assert served.client.get(f"{served.url}/v1/models", headers={**ok, "Host": host}).status_code == 200


def test_500_half_open_connections_do_not_stop_an_authenticated_request(llama_dir, keyfile):
    port, http_port = free_port(), free_port()
    proc = Proc("serve", "--model", str(llama_dir), "--port", str(port), "--http-port", str(http_port),
                "--kv-blocks", "64", "--served-model-name", "demo", "--api-key-file", str(keyfile), nofile=NOFILE)
    socks = []
    try:
        proc.wait_for("listening on")
        for _ in range(500):
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=10)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            socks.append(sock)
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", headers=auth(KEYS[0]), timeout=30,
                       json={"model": "demo", "prompt": "hi", "max_tokens": 2, "apar": {"ignore_eos": True}})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            req = A.GenerateRequest(prompt="hi", sampling=pb.common_pb2.SamplingParameters(max_tokens=2))
            finals = [m.final for m in pb.apar_pb2_grpc.AparStub(ch).Generate(
                req, timeout=30, metadata=(("authorization", f"Bearer {KEYS[1]}"),)) if m.WhichOneof("event") == "final"]
            assert finals[0].usage.completion_tokens == 2
        closed = sum(eof_within(sock, 10 if i == 0 else 0.01) for i, sock in enumerate(socks))
        assert closed >= len(socks) - NOFILE // 2  # the oldest half-open ones were shed
    finally:
        for sock in socks:
            sock.close()
        proc.stop()
    log = "".join(proc.lines)
    assert "Traceback" not in log and len(proc.lines) < 50, log[-3000:]


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _Conn:
    def __init__(self, host: str, busy: bool = False) -> None:
        self.client_host, self.busy, self.transport = host, busy, _Transport()


def test_pending_connections_are_capped_per_client_address_and_in_all():
    from services.router.http_limits import HttpServerLimits
    from services.router.http_server import PENDING_GRACE_S, Connections

    now = [0.0]
    c = Connections(HttpServerLimits(max_connections=8, max_pending_per_client=2), clock=lambda: now[0])
    burst = [_Conn("10.0.0.1") for _ in range(4)]
    assert all(c.opened(x) for x in burst)
    assert not any(x.transport.closed for x in burst)  # a burst within the grace is not cut
    now[0] += PENDING_GRACE_S
    newest = _Conn("10.0.0.1")
    assert c.opened(newest)
    assert [x.transport.closed for x in burst] == [True, True, True, False] and not newest.transport.closed
    passed = _Conn("10.0.0.2")
    assert c.opened(passed)
    c.passed(passed)  # its request passed the key check: no longer pending
    others = [_Conn("10.0.0.2") for _ in range(2)]
    assert all(c.opened(x) for x in others) and not passed.transport.closed
    assert len(c.pending["10.0.0.2"]) == 2 and len(c.open) == 5
    busy = [_Conn(f"10.1.0.{i}", busy=True) for i in range(3)]
    assert all(c.opened(x) for x in busy) and len(c.open) == 8
    late = _Conn("10.2.0.1")
    assert c.opened(late) and burst[3].transport.closed  # over the total: the oldest idle one goes
    full = Connections(HttpServerLimits(max_connections=1), clock=lambda: now[0])
    assert full.opened(_Conn("10.0.0.9", busy=True)) and not full.opened(_Conn("10.0.0.9"))  # none idle: refused


def test_failed_accepts_are_one_warning_per_burst_not_a_traceback_each(caplog):
    import asyncio
    import errno
    import logging

    from services.router.http_server import quiet_accept_errors

    loop = asyncio.new_event_loop()
    try:
        quiet_accept_errors(loop)
        quiet_accept_errors(loop)  # once is enough: a second call changes nothing
        with caplog.at_level(logging.WARNING):
            for _ in range(2000):  # asyncio reports every accept of a backlog that fails, in one tick
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(errno.EMFILE, "Too many open files")})
            loop.call_exception_handler({"message": "something else"})  # other reports pass through
        accept = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
        assert len(accept) == 1 and "Too many open files" in accept[0].getMessage() and not accept[0].exc_info
        assert any(r.getMessage() == "something else" for r in caplog.records)
    finally:
        loop.close()
