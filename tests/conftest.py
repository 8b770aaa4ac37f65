"""Shared fixtures: small random-weight model directories, built once per test session; a scratch
Redis per module."""
from __future__ import annotations

import pytest

from apar.modelgen import ModelShape, build_tokenizer, make_model
from tests.procs import require


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
    a test's calls."""
    return make_model(tmp_path_factory.mktemp("long"), "llama", ModelShape(max_positions=1 << 15),
                      tokenizer=tokenizer)
