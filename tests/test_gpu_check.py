"""`apar bench gpu-check --tiny-cpu`: the GPU script's whole path on the CPU, as the GPU machine would
import it: without the packages that machine lacks (gRPC tools, health and reflection, Redis, FastAPI,
uvicorn, Kubernetes), blocked here by an import hook."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ABSENT_ON_GPU = ("grpc_tools", "grpc_health", "grpc_reflection", "redis", "fastapi", "uvicorn", "starlette",
                 "kubernetes", "pydantic")

BLOCKER = textwrap.dedent(f"""
    import sys
    class Absent:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {ABSENT_ON_GPU!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)", name=name)
    sys.meta_path.insert(0, Absent())
    for name in list(sys.modules):
        if name.split(".")[0] in {ABSENT_ON_GPU!r}:
            del sys.modules[name]
""")


def test_dry_run_without_the_packages_the_gpu_machine_lacks(tmp_path):
    code = BLOCKER + textwrap.dedent(f"""
        from apar.cli import main
        sys.exit(main(["bench", "gpu-check", "--tiny-cpu", "--no-progress", "--out", {str(tmp_path)!r},
                       "--model-cache", {str(tmp_path / 'model')!r}, "--attention", "portable,cascade"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    golden, attention, engine = (result["parts"][k] for k in ("golden", "attention", "engine"))
    # triton's kernels run interpreted on the CPU: its golden runs are the tests', not the dry run's
    assert {k for k in golden if k != "seconds"} == {"portable/llama", "cascade/llama", "flex/llama"}
    assert all(r["passed"] and r["checked"] > 60 for k, r in golden.items() if k != "seconds")
    assert golden["cascade/llama"]["shared_steps"] > 20  # the grouped path ran
    assert set(attention["backends"]) == {"portable", "cascade", "flex"}
    assert all(r["max_diff"] < 1e-4 for r in attention["backends"].values())
    assert attention["floor_ms"] > 0
    for name in ("portable", "cascade"):  # the engine part once per backend asked for
        run = engine[name]
        assert run["settings"]["attention"] == name
        assert run["ar_step"]["1"]["engine_step_ms"] > 0 and run["trace"]["1"]["latency_ar_over_apar"] > 0
        assert (tmp_path / name / "gpu.json").is_file()
        profile = run["profile_ar_batch1"]  # the AR step at batch 1 under torch.profiler (host ops only here)
        assert profile["wall_ms"] > 0 and profile["top_host_ops"] and profile["device_busy_ms"] == 0
        assert profile["kernels_per_step"] == 0 and profile["most_launched"] == []
    assert "golden flex/llama: passed" in proc.stdout and proc.stdout.count("trace at concurrency 1") == 2


def test_the_blocker_blocks():
    code = BLOCKER + "import redis\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "absent on the GPU machine" in proc.stderr


def test_backend_variants_name_the_compiled_layers():
    from apar.bench_suite.gpu_check import variant
    from apar.engine.errors import UserError

    assert variant("triton") == ("triton", None) and variant("triton+compile") == ("triton", True)
    assert variant("flex+nocompile") == ("flex", False)
    with pytest.raises(UserError, match=r"\+compile or \+nocompile only"):
        variant("triton+graphs")
