"""The API key file on a running router, as the truth as it stands: a deleted file holds no keys (the old
ones stop working on both doors), a new file with a bad line applies all its other lines (a revoked key
stops working), a file with no key refuses everyone, and a Kubernetes-style Secret swap (a `..data`
symlink replaced at once) is picked up. At start, an empty `--api-key-file ""` and a missing file are
errors, before any model or tokenizer loads."""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import httpx
import pytest

from apar.protogen import stubs
from tests.faults import wait_until
from tests.procs import Proc, free_port

pb = stubs()
OLD, KEPT, NEW = "k1-Old-7f3c9e2d1b", "k2-Kept-0a8e4c6f2d", "k3-New-9b7d5f3a1c"


def write_secret(root, name: str, text: str) -> None:
    """Write the key file as the kubelet updates a Secret volume: a new directory, then `..data` swapped to
    it with one rename (`keys` is a symlink through `..data`)."""
    version = root / name
    version.mkdir()
    (version / "keys").write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(name)
    os.replace(tmp, root / "..data")


@pytest.fixture()
def router(llama_dir, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    write_secret(secret, "v1", f"# keys\n{OLD}\n{KEPT}\n")
    (secret / "keys").symlink_to("..data/keys")
    port, http_port = free_port(), free_port()
    proc = Proc("router", "--model", str(llama_dir), "--workers", f"127.0.0.1:{free_port()}", "--port", str(port),
                "--allow-open-internal",  # the public door alone: no worker listens
                "--http-port", str(http_port), "--served-model-name", "demo", "--api-key-file",
                str(secret / "keys"))
    proc.wait_for("listening on")
    r = type("Router", (), {})()
    r.proc, r.secret, r.http = proc, secret, httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
    r.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield r
    r.http.close()
    r.channel.close()
    proc.stop()


def http_ok(r, key: str) -> bool:
    code = r.http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
    assert code in (200, 401), code
    return code == 200


def grpc_ok(r, key: str) -> bool:
    """Whether the gRPC door lets `key` past its check (the call may still fail later: no worker runs)."""
    try:
        pb.apar_pb2_grpc.AparStub(r.channel).ModelInfo(pb.apar_pb2.ModelInfoRequest(), timeout=10,
                                                        metadata=(("authorization", f"Bearer {key}"),))
    except grpc.RpcError as exc:
        return exc.code() != grpc.StatusCode.UNAUTHENTICATED
    return True


def accepted(r, key: str) -> bool:
    """Both doors let `key` in (a wait for a change may see the doors a re-read apart)."""
    return http_ok(r, key) and grpc_ok(r, key)


def refused(r, key: str) -> bool:
    """Both doors refuse `key`."""
    return not http_ok(r, key) and not grpc_ok(r, key)


def test_a_deleted_key_file_holds_no_keys_and_a_bad_line_never_keeps_a_revoked_key(router):
    r = router
    assert accepted(r, OLD) and accepted(r, KEPT) and refused(r, NEW)

    since = len(r.proc.lines)
    write_secret(r.secret, "v2", f"{KEPT}\nbad key with spaces\n{NEW}\n\u00e9t\u00e9-key\n")  # OLD revoked
    wait_until(lambda: refused(r, OLD), 10, "the revoked key refused")
    assert accepted(r, KEPT) and accepted(r, NEW)  # the lines around the bad ones apply
    r.proc.wait_for(r"API key file .*keys: lines 2, 4 skipped", 10, since)
    assert not any("bad key" in line or "t\u00e9-key" in line for line in r.proc.lines)  # never a line's text

    since = len(r.proc.lines)
    os.unlink(r.secret / "keys")  # deleted: every key of it stops working
    wait_until(lambda: refused(r, KEPT), 10, "the keys of a deleted file refused")
    assert refused(r, NEW)
    r.proc.wait_for(r"API key file .*keys unreadable .*no key of it is accepted", 10, since)
    assert r.http.get("/health").status_code in (200, 503)  # health stays open

    (r.secret / "keys").symlink_to("..data/keys")  # back
    wait_until(lambda: accepted(r, NEW), 10, "the keys accepted again once the file is back")

    since = len(r.proc.lines)
    write_secret(r.secret, "v3", "# every key revoked\n\n")
    wait_until(lambda: refused(r, KEPT), 10, "a file with no key refusing everyone")
    r.proc.wait_for(r"API key file .*keys holds no key: every request .* is refused", 10, since)
    assert refused(r, NEW)


def start_error(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apar.cli", *flags], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["router", "serve"])
def test_an_empty_or_missing_key_file_is_an_error_at_start(command, tmp_path):
    base = [command, "--model", str(tmp_path / "no-model-here"), "--port", str(free_port())]
    if command == "router":
        base += ["--workers", "127.0.0.1:1"]
    empty = start_error(*base, "--api-key-file", "")
    assert empty.returncode != 0 and "--api-key-file is empty" in empty.stderr, empty.stderr[-2000:]
    assert "Traceback" not in empty.stderr
    missing = start_error(*base, "--api-key-file", str(tmp_path / "absent"))
    assert missing.returncode != 0 and f"cannot read {tmp_path / 'absent'}" in missing.stderr, missing.stderr[-2000:]
    assert "Traceback" not in missing.stderr
