"""A model whose tokenizer lacks the control tokens serves auto-regressively: one notice at start, every
request (auto-parallel asked for or not) runs without forking and gives HF generate's greedy answer, and
`ModelInfo` and `/v1/models` say so; in-process (`apar generate`), in `apar serve` and in a split worker
and router."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.errors import UserError
from apar.engine.events import RequestFinished, TokenEvent
from apar.engine.params import SamplingParams
from apar.engine.replay import ReplayNode
from apar.protogen import stubs
from apar.text.prompt import encode_prompt
from tests.procs import Proc, free_port

pb = stubs()
A = pb.apar_pb2
REPO = Path(__file__).resolve().parents[1]
PROMPT = "Give me three tips for sleep."
NOTICE = "serving auto-regressively"


def hf_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       max_new_tokens=n, do_sample=False)
    eos = ref.generation_config.eos_token_id
    return [t for t in out[0, len(prompt):].tolist() if t != eos]


def test_engine_runs_every_request_auto_regressively(plain_llama_dir, caplog):
    with caplog.at_level(logging.WARNING):
        eng = Engine(plain_llama_dir, EngineConfig(num_blocks=64, block_size=8))
    notices = [r.getMessage() for r in caplog.records if NOTICE in r.getMessage()]
    assert len(notices) == 1 and "neither control token ('[Fork]', '[Child]')" in notices[0]
    assert not eng.auto_parallel and eng.fork_id is None and eng.child_id is None
    prompt = encode_prompt(eng.tokenizer, PROMPT)
    asks = eng.add_request(prompt, SamplingParams(max_tokens=20))  # auto-parallel asked for
    plain = eng.add_request(prompt, SamplingParams(max_tokens=20, auto_parallel=False))
    tokens: dict[str, list[int]] = {asks: [], plain: []}
    done = {}
    for ev in eng.run_to_completion():
        if isinstance(ev, TokenEvent):
            tokens[ev.request].append(ev.token)
        elif isinstance(ev, RequestFinished):
            done[ev.request] = ev
    expected = hf_greedy(plain_llama_dir, prompt, 20)
    assert tokens[asks] == tokens[plain] == expected and expected
    assert done[asks].usage.threads == 1 and done[asks].usage.forks == 0 and done[asks].error is None
    assert eng.ledger.num_used == 0
    # checked as an AR request: the whole answer must fit the context
    with pytest.raises(UserError, match="exceeds the model's context"):
        eng.add_request(prompt, SamplingParams(max_tokens=eng.runner.max_positions))
    with pytest.raises(UserError, match="cannot fork"):
        eng.add_request(prompt, SamplingParams(), replay=ReplayNode([5], [ReplayNode([6])]))


def test_apar_generate_in_process(plain_llama_dir):
    out = subprocess.run([sys.executable, "-m", "apar.cli", "generate", "--model", str(plain_llama_dir), "--prompt",
                          PROMPT, "--max-tokens", "16", "--json"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    notices = [line for line in out.stderr.splitlines() if NOTICE in line]
    assert len(notices) == 1, out.stderr
    final = json.loads(out.stdout)
    tok = AutoTokenizer.from_pretrained(str(plain_llama_dir))
    expected = hf_greedy(plain_llama_dir, encode_prompt(tok, PROMPT), 16)
    assert final["text"] == tok.decode(expected) and final["usage"]["forks"] == 0


def grpc_final(address: str, auto_regressive: bool):
    with grpc.insecure_channel(address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        req = A.GenerateRequest(prompt=PROMPT, stream=A.STREAM_MODE_FINAL, auto_regressive=auto_regressive,
                                sampling=pb.common_pb2.SamplingParameters(max_tokens=16, temperature=0))
        final = [r.final for r in stub.Generate(req, timeout=60) if r.WhichOneof("event") == "final"][0]
        return final, stub.ModelInfo(A.ModelInfoRequest(), timeout=10)


def http_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_serve_says_so_and_answers(plain_llama_dir):
    port = free_port()
    proc = Proc("serve", "--model", str(plain_llama_dir), "--port", str(port), "--http-port", "0",
                "--kv-blocks", "64", "--served-model-name", "plain")
    try:
        http_port = proc.wait_for(r"HTTP on 127\.0\.0\.1:(\d+)").group(1)
        http = f"http://127.0.0.1:{http_port}"
        assert sum(NOTICE in line for line in proc.lines) == 1, "".join(proc.lines)
        apar, info = grpc_final(f"127.0.0.1:{port}", auto_regressive=False)
        ar, _ = grpc_final(f"127.0.0.1:{port}", auto_regressive=True)
        assert info.autoregressive_only and info.fork_token == "[Fork]"
        assert apar.text == ar.text and apar.text and apar.usage.forks == 0 and apar.error == ""
        model = http_json(http + "/v1/models")["data"][0]
        assert model["apar"]["auto_parallel"] is False
        chat = http_json(http + "/v1/chat/completions", {
            "model": "plain", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16,
            "temperature": 0, "apar": {"auto_parallel": True}})
        assert chat["choices"][0]["message"]["content"] == apar.text and chat["usage"]["forks"] == 0
    finally:
        proc.stop()


def test_split_worker_and_router(plain_llama_dir):
    wport, rport = free_port(), free_port()
    worker = Proc("worker", "--model", str(plain_llama_dir), "--port", str(wport), "--kv-blocks", "64")
    router = None
    try:
        worker.wait_for("listening on")
        assert sum(NOTICE in line for line in worker.lines) == 1, "".join(worker.lines)
        router = Proc("router", "--model", str(plain_llama_dir), "--workers", f"127.0.0.1:{wport}",
                      "--port", str(rport))
        router.wait_for("listening on")
        final, info = grpc_final(f"127.0.0.1:{rport}", auto_regressive=False)
        assert info.autoregressive_only and final.text and final.usage.forks == 0 and final.usage.threads == 1
    finally:
        for p in (router, worker):
            if p is not None:
                p.stop()
