"""gRPC stubs built from `proto/` on first use (never edited, never committed).

`stubs()` generates `apar/v1/*_pb2.py` and `*_pb2_grpc.py` with grpc_tools when the .proto files changed
since the last build (a hash in `apar/v1/.proto-hash`), then returns the generated package. When the
stubs are current nothing is written, so an image that generated them at build time runs read-only. Only the
servicer and client modules import it; domain code never sees protobuf types.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent / "v1"
NAMES = ("common", "apar", "worker", "kvmanager")


def _proto_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def generate() -> None:
    from grpc_tools import protoc

    files = sorted((PROTO_DIR / "apar" / "v1").glob("*.proto"))
    if not files:
        raise RuntimeError(f"no .proto files under {PROTO_DIR}")
    digest = _proto_hash(files)
    stamp = OUT_DIR / ".proto-hash"
    if stamp.exists() and stamp.read_text() == digest:  # current: nothing is written (a read-only image)
        return
    OUT_DIR.mkdir(exist_ok=True)
    with open(OUT_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == digest:
            return
        include = str(Path(protoc.__file__).parent / "_proto")
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}"]
        if protoc.main(args + [str(f) for f in files]) != 0:
            raise RuntimeError("protoc failed on proto/apar/v1")
        (OUT_DIR / "__init__.py").write_text('"""Generated from proto/apar/v1 by apar.protogen; do not edit."""\n')
        stamp.write_text(digest)


def stubs():
    """The generated modules: `pb.apar_pb2`, `pb.worker_pb2_grpc`, ..."""
    generate()
    importlib.invalidate_caches()
    pkg = importlib.import_module("apar.v1")
    for name in NAMES:
        for suffix in ("_pb2", "_pb2_grpc"):
            setattr(pkg, name + suffix, importlib.import_module(f"apar.v1.{name}{suffix}"))
    return pkg
