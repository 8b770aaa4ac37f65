"""The cluster token on loopback: a rogue worker can neither register nor take a request, and a worker's
own API refuses callers that do not prove the token, over plaintext and under internal mutual TLS.

The rogue is a real gRPC server speaking the worker API, with the real worker's model facts and far
more free blocks than it: it would be chosen for every request if the router ever took it for a
worker. It records every call it gets."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apar.engine.errors import UserError
from apar.protogen import stubs
from services.cluster_auth import AUTH_KEY, PROOF_KEY, ClusterToken
from services.security import TLSFiles, open_channel
from tests.certs import CA
from tests.faults import wait_until
from tests.procs import Proc, free_port

pb = stubs()
A, K, W = pb.apar_pb2, pb.kvmanager_pb2, pb.worker_pb2
TOKEN = "cluster-token-4f0c9a7e2b1d8c6a5e3f7b9d0a2c4e6f"
OTHER = "another-token-9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
API_KEY = "client-key-3c1e5a7b9d"
SECRET_PROMPT = "my password is hunter2, keep it safe"


# ---------------------------------------------------------------- the token itself

def test_a_call_signed_with_the_token_passes_once_and_nothing_else_does():
    token, other = ClusterToken(TOKEN.encode(), "test"), ClusterToken(OTHER.encode(), "test")
    value, nonce = token.sign("/apar.v1.Worker/Generate")
    assert TOKEN not in value  # the token never travels
    assert token.check(value, "/apar.v1.Worker/Generate") == (None, nonce)
    assert token.check(value, "/apar.v1.Worker/Generate")[0] == "a replayed call"
    fresh, _ = token.sign("/apar.v1.Worker/Generate")
    assert token.check(fresh, "/apar.v1.Worker/Info")[0] == "a wrong cluster token"  # bound to the method
    assert token.check(other.sign("/m")[0], "/m")[0] == "a wrong cluster token"
    assert token.check(None, "/m")[0] == "no cluster token"
    for bad in ("", "v1", "v1.x.y.z", "v2.1.00000000000000000000000000000000.ab", "Bearer " + TOKEN):
        assert token.check(bad, "/m")[0] == "a malformed cluster token header"
    old, _ = token.sign("/m", now=time.time() - 600)
    assert "away from this clock" in token.check(old, "/m")[0]
    assert token.proves(token.proof("/m", nonce), "/m", nonce)
    assert not token.proves(other.proof("/m", nonce), "/m", nonce) and not token.proves(None, "/m", nonce)
    assert not token.proves(token.proof("/m", nonce), "/m", "0" * 32)  # bound to the caller's nonce
    assert TOKEN not in repr(token)


def test_the_token_comes_from_a_file_or_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert ClusterToken.load(str(path), {}).secret == TOKEN.encode()
    assert ClusterToken.load(None, {"APAR_CLUSTER_TOKEN": OTHER}).secret == OTHER.encode()
    assert ClusterToken.load(None, {}) is None
    with pytest.raises(UserError, match="is empty"):
        ClusterToken.load("", {})
    with pytest.raises(UserError, match="cannot read"):
        ClusterToken.load(str(tmp_path / "absent"), {})
    (tmp_path / "short").write_text("short\n")
    with pytest.raises(UserError, match="shorter than 32"):
        ClusterToken.load(str(tmp_path / "short"), {})


# ---------------------------------------------------------------- a rogue worker on a plaintext cluster

class RogueWorker(pb.worker_pb2_grpc.WorkerServicer):
    """A worker impostor: the real worker's facts, a huge pool, and a canned answer; it records its calls."""

    def __init__(self, info) -> None:
        self.info = W.WorkerInfo()
        self.info.CopyFrom(info)
        self.info.worker_id, self.info.num_blocks, self.info.free_blocks = "rogue", 1 << 20, 1 << 20
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

    def Finish(self, request, context):
        self._saw("Finish", request)
        return W.FinishResponse()

    def methods(self) -> set[str]:
        with self.lock:
            return {m for m, _ in self.calls}


def start_rogue(info) -> tuple[grpc.Server, RogueWorker, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rogue = RogueWorker(info)
    pb.worker_pb2_grpc.add_WorkerServicer_to_server(rogue, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, rogue, f"127.0.0.1:{port}"


def generate(address: str, prompt: str = SECRET_PROMPT, max_tokens: int = 6):
    with grpc.insecure_channel(address) as ch:
        req = A.GenerateRequest(prompt=prompt, sampling=pb.common_pb2.SamplingParameters(
            max_tokens=max_tokens, ignore_eos=True))
        finals = [r.final for r in pb.apar_pb2_grpc.AparStub(ch).Generate(
            req, timeout=60, metadata=(("authorization", f"Bearer {API_KEY}"),)) if r.WhichOneof("event") == "final"]
    return finals[0]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    (d / "token").write_text(TOKEN + "\n")
    (d / "keys").write_text(API_KEY + "\n")
    return d


def test_a_rogue_worker_can_neither_register_nor_take_a_prompt(llama_dir, token_file):
    token = ClusterToken.load(str(token_file / "token"))
    kv_port, w_port, r_port, s_port = free_port(), free_port(), free_port(), free_port()
    flags = ("--cluster-token-file", str(token_file / "token"))
    procs = []
    try:
        kv = Proc("kvmanager", "--port", str(kv_port), "--no-redis", *flags)
        procs.append(kv)
        kv.wait_for("listening on")
        worker = Proc("worker", "--model", str(llama_dir), "--port", str(w_port), "--kv-blocks", "64",
                      "--kvmanager", f"127.0.0.1:{kv_port}", "--worker-id", "w-real", *flags)
        procs.append(worker)
        worker.wait_for("listening on")
        with open_channel(f"127.0.0.1:{w_port}", token=token) as ch:
            info = pb.worker_pb2_grpc.WorkerStub(ch).Info(W.WorkerInfoRequest(), timeout=10)
        server, rogue, rogue_address = start_rogue(info)

        # the rogue registers without the token, then with a wrong one: both refused
        register = K.RegisterRequest(worker_id="w-rogue", address=rogue_address, num_blocks=1 << 20,
                                     block_size=info.block_size, ttl_seconds=3600)
        for channel in (grpc.insecure_channel(f"127.0.0.1:{kv_port}"),
                        open_channel(f"127.0.0.1:{kv_port}", token=ClusterToken(OTHER.encode(), "rogue"))):
            with channel:
                with pytest.raises(grpc.RpcError) as err:
                    pb.kvmanager_pb2_grpc.KVManagerStub(channel).Register(register, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(f"127.0.0.1:{kv_port}") as ch:
            code = grpc_code(lambda: pb.kvmanager_pb2_grpc.KVManagerStub(ch).Usage(K.UsageRequest(), timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED  # nor may it read who is registered
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes stay open
        with open_channel(f"127.0.0.1:{kv_port}", token=token) as ch:
            usage = pb.kvmanager_pb2_grpc.KVManagerStub(ch).Usage(K.UsageRequest(), timeout=10)
        assert [u.worker_id for u in usage.workers] == ["w-real"]
        kv.wait_for("refused 1 internal call.*Register, no cluster token")

        # a router finding workers at the KV manager, and one given the rogue's address by hand: an
        # authenticated client's prompt reaches the real worker only
        routers = [Proc("router", "--model", str(llama_dir), "--port", str(r_port), "--kvmanager",
                        f"127.0.0.1:{kv_port}", "--api-key-file", str(token_file / "keys"), *flags),
                   Proc("router", "--model", str(llama_dir), "--port", str(s_port), "--workers",
                        f"{rogue_address},127.0.0.1:{w_port}", "--api-key-file", str(token_file / "keys"), *flags)]
        procs += routers
        for r in routers:
            r.wait_for("listening on")
        for port in (r_port, s_port):
            for _ in range(3):
                final = generate(f"127.0.0.1:{port}")
                assert final.usage.completion_tokens == 6 and final.finish_reason == "length"
        routers[1].wait_for(f"worker {rogue_address} is down: UNAUTHENTICATED .*did not prove")
        assert "Generate" not in rogue.methods()
        assert not any(SECRET_PROMPT in str(request) for _, request in rogue.calls)
        server.stop(0)
    finally:
        for p in reversed(procs):
            p.stop()


def grpc_code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ---------------------------------------------------------------- a worker's own API under mutual TLS

def test_worker_generate_without_the_token_is_refused_under_internal_tls(llama_dir, token_file, tmp_path):
    ca = CA(tmp_path, "ca")
    internal = ca.issue("internal", dns=("apar-internal",), ips=())
    tls = TLSFiles.load(internal.cert, internal.key, internal.ca, "apar-internal", need_ca=True)
    port = free_port()
    worker = Proc("worker", "--model", str(llama_dir), "--port", str(port), "--kv-blocks", "64", "--worker-id",
                  "w-tls", "--tls-cert", internal.cert, "--tls-key", internal.key, "--tls-ca", internal.ca,
                  "--tls-server-name", "apar-internal", "--cluster-token-file", str(token_file / "token"))
    try:
        worker.wait_for(r"listening on .*\(mutual TLS, cluster token\)")
        request = W.WorkerRequest(request_id="r1", prompt_ids=[5, 6, 7, 8], sampling=pb.common_pb2.SamplingParameters(
            max_tokens=4, ignore_eos=True))
        address = f"127.0.0.1:{port}"

        def run(channel, **kw):
            with channel:
                stub = pb.worker_pb2_grpc.WorkerStub(channel)
                return [m for m in stub.Generate(request, timeout=30, **kw)]

        # a certificate from the cluster's CA gets through the handshake, not past the token
        for channel, metadata in ((open_channel(address, tls), ()),
                                  (open_channel(address, tls, token=ClusterToken(OTHER.encode(), "rogue")), ()),
                                  (open_channel(address, tls), ((AUTH_KEY, "v1.1.2.3"),))):
            with pytest.raises(grpc.RpcError) as err:
                run(channel, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
            assert "cluster token" in err.value.details()
        with open_channel(address, tls) as ch:
            assert grpc_code(lambda: pb.worker_pb2_grpc.WorkerStub(ch).Info(W.WorkerInfoRequest(), timeout=10)) == \
                grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        token = ClusterToken.load(str(token_file / "token"))
        messages = run(open_channel(address, tls, token=token))
        tokens = sum(len(e.tokens.tokens) for m in messages for e in m.events if e.WhichOneof("event") == "tokens")
        assert tokens == 4
        with open_channel(address, tls, token=token) as ch:
            call = pb.worker_pb2_grpc.WorkerStub(ch).Info.with_call(W.WorkerInfoRequest(), timeout=10)
            assert call[0].worker_id == "w-tls" and dict(call[1].trailing_metadata())[PROOF_KEY]
            assert call[0].running == 0 and call[0].free_blocks == 64  # the refused calls did no work
        worker.wait_for("worker refused .* internal call")
    finally:
        worker.stop()
    assert TOKEN not in "".join(worker.lines)
