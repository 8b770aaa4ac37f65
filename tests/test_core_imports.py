"""The engine core (`apar/engine/`) is a library the services adapt: dependencies point one way.

Nothing in the core imports from `services`, and importing every core module loads none of gRPC, Redis,
FastAPI, uvicorn or Kubernetes. The request types the router shares stay torch-free, and so does the
text package (`apar/text/`) the router shares with the in-process tools.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "apar" / "engine"
TEXT = ROOT / "apar" / "text"
FORBIDDEN = ("services", "grpc", "grpc_health", "grpc_tools", "redis", "fastapi", "uvicorn", "starlette",
             "kubernetes")


def _core_modules() -> list[str]:
    mods = []
    for f in sorted(CORE.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_core_has_modules_to_check():
    mods = _core_modules()
    assert "apar.engine.engine" in mods and "apar.engine.kv.ledger" in mods and len(mods) >= 20


def test_no_core_source_imports_services_or_a_service_library():
    bad = {str(f.relative_to(ROOT)): sorted(_imported_roots(f) & set(FORBIDDEN)) for f in CORE.rglob("*.py")}
    assert {f: r for f, r in bad.items() if r} == {}


def test_importing_the_whole_core_loads_no_service_library():
    mods = [m for m in _core_modules() if not m.endswith("triton_kernels")]  # triton: only on a GPU host
    code = (f"import sys\nfor m in {mods!r}: __import__(m)\n"
            f"roots = {FORBIDDEN!r}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in roots))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_shared_request_types_import_no_torch():
    code = ("import sys\nimport apar.engine.params, apar.engine.events, apar.engine.prefix, apar.engine.errors\n"
            "import apar.engine.kv.ledger, apar.engine.kv.ops\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _apar_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "apar"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "apar":
            names.add(node.module)
    return names


def test_the_text_package_imports_no_service_and_no_torch():
    bad = {str(f.relative_to(ROOT)): sorted(_imported_roots(f) & (set(FORBIDDEN) | {"torch"}))
           for f in TEXT.rglob("*.py")}
    assert len(bad) >= 3 and {f: r for f, r in bad.items() if r} == {}
    code = ("import sys\nimport apar.text.stitch, apar.text.stream, apar.text.prompt\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _services_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "services"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "services":
            names.add(node.module)
    return names


def test_only_the_commands_reach_into_the_router():
    """`apar generate`, the client, evaluation and the benches share the router's text handling through
    `apar/text/`; only the commands that start a router (`apar/commands/`) import `services.router`, and
    the one bench that measures the router's own prefix lookup against a KV manager."""
    measures_the_router = {"apar/bench_suite/prefix_memory.py"}
    seen = {str(f.relative_to(ROOT)): _services_imports(f) for f in (ROOT / "apar").rglob("*.py")
            if "commands" not in f.relative_to(ROOT).parts and str(f.relative_to(ROOT)) not in measures_the_router}
    assert any(seen.values())  # the client and the benches do use the services
    bad = {f: sorted(n for n in names if n.startswith("services.router")) for f, names in seen.items()}
    assert {f: n for f, n in bad.items() if n} == {}


def test_services_use_only_the_core_and_the_wire_stubs_from_apar():
    """The CLI, client and benches (the rest of `apar/`) sit above the services, never below them; the
    text package is shared with them."""
    allowed = ("apar.engine", "apar.protogen", "apar.v1", "apar.text")
    seen = {str(f.relative_to(ROOT)): _apar_imports(f) for f in (ROOT / "services").rglob("*.py")}
    assert any(seen.values())  # the services do import the core
    bad = {f: sorted(n for n in names if not n.startswith(allowed)) for f, names in seen.items()}
    assert {f: n for f, n in bad.items() if n} == {}
