"""The router process imports no torch: a router pod starts in seconds on a small image."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.procs import Proc, free_port

ROUTER_MODULES = ("services.router.service", "services.router.http", "services.router.gateway",
                  "services.router.workers", "apar.text.stream", "apar.text.stitch", "apar.text.prompt",
                  "services.router.tokenizer",
                  "services.protocol.wire", "apar.commands.serve", "apar.client", "services.router.guard",
                  "services.security", "services.cluster_auth", "services.router.http_server",
                  "services.router.openai_request")


def test_router_modules_import_no_torch(llama_dir):
    code = (f"import sys\nfor m in {ROUTER_MODULES!r}: __import__(m)\n"
            "from services.router.tokenizer import load_tokenizer\n"
            "from services.router.gateway import Gateway\n"
            "from services.router.http import build_app\n"
            "from services.router.workers import WorkerDirectory\n"
            f"tok = load_tokenizer({str(llama_dir)!r})\n"
            "tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True)\n"
            "build_app(Gateway(tok, WorkerDirectory([]), 'm'))\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_running_router_process_has_no_torch_loaded(llama_dir):
    proc = Proc("router", "--model", str(llama_dir), "--workers", f"127.0.0.1:{free_port()}",
                "--port", str(free_port()), "--http-port", "0")
    try:
        proc.wait_for("listening on")
        maps = Path(f"/proc/{proc.p.pid}/maps").read_text()
        assert "libtorch" not in maps and "/torch/" not in maps
        assert "grpc" in maps  # the check looks at the right process: its gRPC library is mapped
    finally:
        proc.stop()
