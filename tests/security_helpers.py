"""What the security tests share: certificates made here (tests/certs.py), keys, and small gRPC and
metrics helpers."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest

from apar.protogen import stubs
from tests.certs import CA


pb = stubs()
A, K, W = pb.apar_pb2, pb.kvmanager_pb2, pb.worker_pb2
KEYS = ("k1-Alpha-7f3c9e2d1b", "k2-Bravo-0a8e4c6f2d")
WRONG = "wrong-Key-5e1d3c7b9a"
PROMPT = "Zebra-sentinel prompt: name three rivers."  # must never reach a log
ROOT = Path(__file__).resolve().parent.parent


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory):
    """A key file holding KEYS, one per line (`--api-key-file`)."""
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text("\n".join(KEYS) + "\n")
    return path


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
