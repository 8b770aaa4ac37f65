"""Locking the cluster on loopback: the rate limit per key, mutual TLS between router, worker and KV
manager, and Redis with a password over TLS."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.security import TLSFiles, open_channel
from tests.faults import wait_until
from tests.procs import Proc, free_port, require
from tests.security_helpers import (A, K, KEYS, ROOT, W, generate, grpc_code, internal_flags, pb,
                                    pki)  # noqa: F401 (fixtures)


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
                worker_id="w-redis", address="127.0.0.1:1", num_blocks=8, block_size=16, ttl_seconds=30,
                session=1), timeout=5)
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
