"""Shared fixtures: small random-weight model directories and a server for long requests, built once per
test session; a scratch Redis per module. With APAR_REQUIRE_ALL=1 (CI sets it) a skipped test fails."""
from __future__ import annotations

import os

import pytest

from apar.modelgen import ModelShape, build_tokenizer, make_model
from tests.procs import LONG_TOKENS, Proc, free_port, require


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under APAR_REQUIRE_ALL=1 a skip is a failure: CI runs every test or fails, saying what was missing
    (the programs the tests run already fail their tests, never skip them: `tests.procs.require`)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("APAR_REQUIRE_ALL") == "1" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, which APAR_REQUIRE_ALL=1 does not allow: {report.longrepr}"


def pytest_sessionstart(session):
    """Build the engine's CPU rows kernel (apar/engine/rows_gemm.py) once before any test: on a fresh
    machine a worker process that a test starts would otherwise build it inside its start-up wait."""
    from apar.engine import rows_gemm

    rows_gemm.kernel()


@pytest.fixture(scope="module")
def redis_server():
    """A private redis-server on a free loopback port, no persistence, for one test module."""
    from apar.bench_suite.simulated import ScratchRedis

    require("redis-server")
    server = ScratchRedis()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(1024)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    return make_model(tmp_path_factory.mktemp("llama"), "llama", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, tokenizer):
    return make_model(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=1, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory, tokenizer):
    return make_model(tmp_path_factory.mktemp("mistral"), "mistral", seed=2, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def short_llama_dir(tmp_path_factory, tokenizer):
    """A model with a 64-token context, for limits."""
    return make_model(tmp_path_factory.mktemp("short"), "llama", ModelShape(max_positions=64), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def long_llama_dir(tmp_path_factory, tokenizer):
    """A model with a 32,768-token context, for requests that must still be running when a test acts on
    them: on a loaded machine a tiny model's 1,024 tokens can all be decoded in the gap between two of
    a test's calls. Where the test starts the server, holding its engine (tests/gated.py) is surer."""
    return make_model(tmp_path_factory.mktemp("long"), "llama", ModelShape(max_positions=1 << 15),
                      tokenizer=tokenizer)


@pytest.fixture(scope="session")
def plain_llama_dir(tmp_path_factory):
    """An ordinary model: its tokenizer has no control tokens, so it serves auto-regressively only."""
    return make_model(tmp_path_factory.mktemp("plain"), "llama", ModelShape(vocab=512), seed=4, control=())


@pytest.fixture(scope="session")
def long_serve(long_llama_dir):
    """`apar serve` (gRPC and HTTP) on the 32,768-position model with a pool that holds a request of
    LONG_TOKENS: for tests that cancel, time out or drop a request that must still be running and cannot
    start their own server (one that can holds its engine instead: tests/gated.py). Each such test
    leaves every block free."""
    port = free_port()
    proc = Proc("serve", "--model", str(long_llama_dir), "--port", str(port), "--http-port", "0", "--kv-blocks",
                str(LONG_TOKENS // 16 + 100), "--block-size", "16", "--served-model-name", "apar-long")
    http_port = int(proc.wait_for(r"listening on .*HTTP on 127\.0\.0\.1:(\d+)").group(1))
    yield {"grpc": f"127.0.0.1:{port}", "http": f"http://127.0.0.1:{http_port}", "port": http_port,
           "model": "apar-long"}
    proc.stop()
