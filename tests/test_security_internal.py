"""Internal mutual TLS with a certificate per role (services/peer_names.py), and the internal ports' hosts.

Mutual TLS alone lets any certificate of the CA in: a worker's certificate could call another worker's
`Generate` past the router's keys and limits, or a pod holding the KV manager's could pose as a worker.
With `--tls-peer-names` a server answers only the roles that call it, and the router's server-name checks
(`--internal-tls-server-name` for workers, `--internal-tls-kvmanager-name`) make it dial only peers whose
certificate names the role it expects. No cluster token in these tests: the certificates alone decide."""
from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apar.engine.errors import UserError
from services.peer_names import parse_peer_names
from services.security import TLSFiles, open_channel
from tests.certs import CA
from tests.faults import wait_until
from tests.procs import Proc, free_port
from tests.security_helpers import A, K, W, pb
from tests.test_public_hardening import sockets_of

ROLES = ("router", "worker", "kvmanager")
SECRET_PROMPT = "my password is hunter2, keep it safe"


@pytest.fixture(scope="module")
def roles(tmp_path_factory):
    """A CA and one certificate per role (DNS name apar-ROLE), plus an `internal` one with another name."""
    d = tmp_path_factory.mktemp("roles")
    ca = CA(d, "ca")
    pairs = {r: ca.issue(r, dns=(f"apar-{r}",), ips=()) for r in ROLES}
    pairs["other"] = ca.issue("other", dns=("apar-internal",), ips=())
    return pairs


def tls_of(pair, server_name: str | None = None, peers: tuple[str, ...] = ()) -> TLSFiles:
    from dataclasses import replace

    return replace(TLSFiles.load(pair.cert, pair.key, pair.ca, server_name, need_ca=True), peer_names=peers)


def flags(pair, prefix: str = "--tls") -> list[str]:
    return [f"{prefix}-cert", pair.cert, f"{prefix}-key", pair.key, f"{prefix}-ca", pair.ca]


def status(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# ---------------------------------------------------------------- the flag

def test_peer_names_parse_and_need_tls():
    assert parse_peer_names("apar-worker, apar-router") == ("apar-worker", "apar-router")
    assert parse_peer_names(None) == ()
    for bad in ("", " , ", "apar worker", "apar-router,-x", "a/b"):
        with pytest.raises(UserError):
            parse_peer_names(bad)
    import argparse

    from services.kvmanager.cli import add_args
    from services.security import internal_tls

    parser = argparse.ArgumentParser()
    add_args(parser)
    args = parser.parse_args(["--no-redis", "--tls-peer-names", "apar-worker"])
    with pytest.raises(UserError, match="--tls-peer-names needs --tls-cert"):
        internal_tls(args)


# ---------------------------------------------------------------- the KV manager, in this process

def test_kv_manager_answers_only_the_workers_and_routers_certificates(roles):
    from services.kvmanager.service import serve

    server = serve("127.0.0.1:0", None, tls=tls_of(roles["kvmanager"], peers=("apar-worker", "apar-router")))
    address = f"127.0.0.1:{server.port}"
    register = K.RegisterRequest(worker_id="w1", address="127.0.0.1:1", num_blocks=8, block_size=16, ttl_seconds=60,
                                session=7)
    try:
        def call(role, method, request):
            with open_channel(address, tls_of(roles[role], "apar-kvmanager")) as ch:
                return status(lambda: getattr(pb.kvmanager_pb2_grpc.KVManagerStub(ch), method)(request, timeout=10))

        # a certificate of the CA but of another role: refused before the method runs
        for role in ("kvmanager", "other"):
            code, details = call(role, "Register", register)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (role, code)
            assert "names none of apar-worker, apar-router" in details
            assert call(role, "Usage", K.UsageRequest())[0] == grpc.StatusCode.PERMISSION_DENIED
        with open_channel(address, tls_of(roles["other"], "apar-kvmanager")) as ch:  # probes stay open
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert call("worker", "Register", register)[0] == grpc.StatusCode.OK
        with open_channel(address, tls_of(roles["router"], "apar-kvmanager")) as ch:
            usage = pb.kvmanager_pb2_grpc.KVManagerStub(ch).Usage(K.UsageRequest(), timeout=10)
        assert [u.worker_id for u in usage.workers] == ["w1"]  # only the worker's registration
    finally:
        server.stop()


# ---------------------------------------------------------------- a cluster with a certificate per role

class Impostor(pb.worker_pb2_grpc.WorkerServicer):
    """A worker impostor holding a certificate of the cluster's CA, but the KV manager's: the real worker's
    facts with a huge pool (it would take every request), and it records every call it gets."""

    def __init__(self, info) -> None:
        self.info = W.WorkerInfo()
        self.info.CopyFrom(info)
        self.info.worker_id, self.info.num_blocks, self.info.free_blocks = "impostor", 1 << 20, 1 << 20
        self.calls: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def _saw(self, method, request):
        with self.lock:
            self.calls.append((method, request))

    def Info(self, request, context):
        self._saw("Info", request)
        return self.info

    def Generate(self, request, context):
        self._saw("Generate", request)
        yield W.WorkerEvents(events=[W.WorkerEvent(done=W.RequestDone(reason="stop"))])


def start_impostor(info, pair) -> tuple[grpc.Server, Impostor, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    impostor = Impostor(info)
    pb.worker_pb2_grpc.add_WorkerServicer_to_server(impostor, server)
    creds = grpc.ssl_server_credentials([(Path(pair.key).read_bytes(), Path(pair.cert).read_bytes())],
                                        root_certificates=Path(pair.ca).read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, impostor, f"127.0.0.1:{port}"


def generate(address: str, max_tokens: int = 4):
    with grpc.insecure_channel(address) as ch:
        req = A.GenerateRequest(prompt=SECRET_PROMPT, sampling=pb.common_pb2.SamplingParameters(
            max_tokens=max_tokens, ignore_eos=True))
        return [r.final for r in pb.apar_pb2_grpc.AparStub(ch).Generate(req, timeout=60)
                if r.WhichOneof("event") == "final"][0]


def test_each_role_answers_only_its_callers_and_the_router_dials_only_workers(llama_dir, roles):
    kv_port, w_port, kv_metrics, w_metrics = free_port(), free_port(), free_port(), free_port()
    procs = []
    try:
        kv = Proc("kvmanager", "--port", str(kv_port), "--no-redis", *flags(roles["kvmanager"]),
                  "--tls-peer-names", "apar-worker,apar-router", "--metrics-port", str(kv_metrics))
        procs.append(kv)
        kv.wait_for("listening on")
        worker = Proc("worker", "--model", str(llama_dir), "--port", str(w_port), "--kv-blocks", "64",
                      "--kvmanager", f"127.0.0.1:{kv_port}", "--worker-id", "w-role", *flags(roles["worker"]),
                      "--tls-server-name", "apar-kvmanager", "--tls-peer-names", "apar-router",
                      "--metrics-port", str(w_metrics))
        procs.append(worker)
        worker.wait_for(r"listening on .*\(mutual TLS, callers apar-router, no cluster token\)")
        # every port of both on their --host (127.0.0.1, the default), the metrics ports included
        assert sockets_of(kv.p.pid)[0] == {("127.0.0.1", kv_port), ("127.0.0.1", kv_metrics)}
        assert sockets_of(worker.p.pid)[0] == {("127.0.0.1", w_port), ("127.0.0.1", w_metrics)}
        address = f"127.0.0.1:{w_port}"
        with open_channel(address, tls_of(roles["router"], "apar-worker")) as ch:
            info = pb.worker_pb2_grpc.WorkerStub(ch).Info(W.WorkerInfoRequest(), timeout=10)
        assert info.worker_id == "w-role"

        # the worker's own API: a certificate of the CA but not the router's gets nothing
        request = W.WorkerRequest(request_id="r1", prompt_ids=[5, 6, 7, 8],
                                  sampling=pb.common_pb2.SamplingParameters(max_tokens=4, ignore_eos=True))

        def run(role):
            with open_channel(address, tls_of(roles[role], "apar-worker")) as ch:
                return list(pb.worker_pb2_grpc.WorkerStub(ch).Generate(request, timeout=30))

        for role in ("worker", "kvmanager", "other"):
            code, details = status(lambda: run(role))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (role, code)
            assert "names none of apar-router" in details
        messages = run("router")
        assert sum(len(e.tokens.tokens) for m in messages for e in m.events
                   if e.WhichOneof("event") == "tokens") == 4
        worker.wait_for("worker refused 1 internal call.*Generate from a certificate naming apar-worker")

        # routers: one finding workers at the KV manager; one given an impostor's address first. The
        # impostor holds the KV manager's certificate, so the handshake fails the worker name and no call
        # (nor prompt) reaches it
        server, impostor, impostor_address = start_impostor(info, roles["kvmanager"])
        router_flags = [*flags(roles["router"], "--internal-tls"), "--internal-tls-server-name", "apar-worker"]
        ports = free_port(), free_port()
        routers = [Proc("router", "--model", str(llama_dir), "--port", str(ports[0]), "--kvmanager",
                        f"127.0.0.1:{kv_port}", *router_flags, "--internal-tls-kvmanager-name", "apar-kvmanager"),
                   Proc("router", "--model", str(llama_dir), "--port", str(ports[1]), "--workers",
                        f"{impostor_address},{address}", *router_flags)]
        procs += routers
        for r in routers:
            r.wait_for("listening on")
        for port in ports:
            for _ in range(3):
                final = generate(f"127.0.0.1:{port}")
                assert final.usage.completion_tokens == 4 and final.finish_reason == "length"
        assert impostor.calls == []
        server.stop(0)

        # a router that checks the KV manager against the workers' name finds no KV manager: no worker
        bad = free_port()
        wrong = Proc("router", "--model", str(llama_dir), "--port", str(bad), "--kvmanager", f"127.0.0.1:{kv_port}",
                     *router_flags)
        procs.append(wrong)
        wrong.wait_for("listening on")
        code, details = status(lambda: generate(f"127.0.0.1:{bad}"))
        assert code == grpc.StatusCode.UNAVAILABLE and "no worker" in details
    finally:
        for p in reversed(procs):
            p.stop()
    assert SECRET_PROMPT not in "".join(line for p in procs for line in p.lines)


def exits_saying(proc: Proc, needle: str) -> None:
    """`proc` exits with an error, never listening, and says `needle`."""
    with pytest.raises(RuntimeError, match=r"exited [1-9]"):
        proc.wait_for("listening on", timeout=120)
    wait_until(lambda: needle in "".join(proc.lines), 10, f"{proc.args[0]} never said {needle!r}")


def test_router_kvmanager_name_needs_tls_and_a_kvmanager(llama_dir, roles):
    for argv, needle in ((["--kvmanager", "127.0.0.1:1", "--internal-tls-kvmanager-name", "apar-kvmanager"],
                          "needs --internal-tls-cert"),
                         ([*flags(roles["router"], "--internal-tls"), "--workers", "127.0.0.1:1",
                           "--internal-tls-kvmanager-name", "apar-kvmanager"], "not used without --kvmanager")):
        p = Proc("router", "--model", str(llama_dir), "--port", str(free_port()), *argv)
        try:
            exits_saying(p, needle)
        finally:
            p.stop()


# ---------------------------------------------------------------- API keys need closed internals

def test_a_router_with_keys_refuses_open_internal_services(llama_dir, tmp_path):
    """API keys on a router whose workers anyone can call (no cluster token, no internal TLS) protect
    nothing: the router refuses to start so, unless told the network is private."""
    (tmp_path / "keys").write_text("k-0123456789abcdef\n")
    base = ("router", "--model", str(llama_dir), "--kvmanager", "127.0.0.1:1", "--api-key-file", str(tmp_path / "keys"))
    refused = Proc(*base, "--port", str(free_port()))
    try:
        exits_saying(refused, "the workers and the KV manager are open")
    finally:
        refused.stop()
    allowed = Proc(*base, "--port", str(free_port()), "--allow-open-internal")
    try:
        allowed.wait_for("listening on", timeout=120)
        assert "without a cluster token" in "".join(allowed.lines)  # and it says so
    finally:
        allowed.stop()


def test_a_worker_or_kv_manager_beyond_loopback_needs_the_token_or_tls(tmp_path):
    """An internal service reachable from other machines with neither the cluster token nor mutual TLS is
    what let any pod register or generate: it is refused unless --allow-open-internal says the network is
    private. On loopback (the default --host) it still starts open, with its warning."""
    import argparse

    from services.cluster_auth import ClusterToken, is_loopback, refuse_open_listener

    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.1.2.3", "worker-0.apar")))
    token = ClusterToken(b"t" * 32, "test")
    for host, tok, allow, refused in (("0.0.0.0", None, False, True), ("10.1.2.3", None, False, True),
                                      ("0.0.0.0", token, False, False), ("0.0.0.0", None, True, False),
                                      ("127.0.0.1", None, False, False)):
        args = argparse.Namespace(host=host, allow_open_internal=allow)
        if refused:
            with pytest.raises(UserError, match="--allow-open-internal"):
                refuse_open_listener(args, tok, None, "apar worker")
        else:
            refuse_open_listener(args, tok, None, "apar worker")

    for argv in (("kvmanager", "--no-redis"), ("worker", "--model", str(tmp_path / "no-model"))):
        p = Proc(*argv, "--host", "0.0.0.0", "--port", str(free_port()))
        try:
            exits_saying(p, "neither --cluster-token-file")
        finally:
            p.stop()
    kv = Proc("kvmanager", "--no-redis", "--host", "0.0.0.0", "--port", str(free_port()), "--allow-open-internal")
    try:
        kv.wait_for("listening on 0.0.0.0")
        assert "without a cluster token" in "".join(kv.lines)
    finally:
        kv.stop()
