"""Bad input gets a clear error and changes nothing; it never crashes the engine."""
import json

import pytest

from apar.engine.config import ControlTokens, EngineConfig
from apar.engine.engine import Engine
from apar.engine.errors import CapacityError, UserError
from apar.engine.params import SamplingParams


@pytest.mark.parametrize("kwargs, words", [
    ({"max_tokens": 0}, "max_tokens must be > 0"),
    ({"max_tokens": -5}, "max_tokens must be > 0"),
    ({"max_tokens": 10**9}, "absurd"),
    ({"max_tokens": 2.5}, "integer"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "finite"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"max_threads": 0}, "max_threads"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"repetition_penalty": True}, "repetition_penalty"),
    ({"frequency_penalty": 2.01}, r"frequency_penalty must be a number in \[-2, 2\]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"presence_penalty": "1"}, "presence_penalty"),
])
def test_bad_sampling_parameters(kwargs, words):
    with pytest.raises(UserError, match=words):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def short(short_llama_dir):
    return Engine(short_llama_dir, EngineConfig(block_size=4, num_blocks=8))


def test_bad_prompts_queue_nothing(short):
    with pytest.raises(UserError, match="prompt is empty"):
        short.add_request([], SamplingParams())
    with pytest.raises(UserError, match="longer than the model allows"):
        short.add_request(list(range(10, 80)), SamplingParams())
    with pytest.raises(UserError, match="outside the vocabulary"):
        short.add_request([1, 10**7], SamplingParams())
    with pytest.raises(UserError, match="exceeds the model's context"):
        short.add_request(list(range(10, 40)), SamplingParams(max_tokens=50, auto_parallel=False))
    with pytest.raises(CapacityError, match="needs 9 KV blocks, the pool has 8"):
        short.add_request(list(range(10, 43)), SamplingParams(max_tokens=5))
    rid = short.add_request([5, 6], SamplingParams(max_tokens=3), request_id="x")
    with pytest.raises(UserError, match="already in use"):
        short.add_request([5, 6], SamplingParams(), request_id="x")
    assert [r.id for r in short.scheduler.waiting] == [rid]
    short.run_to_completion()
    assert short.ledger.num_used == 0


def test_answer_stops_at_the_models_context(short):
    rid = short.add_request(list(range(10, 30)), SamplingParams(max_tokens=500))  # APAR: positions per path
    fin = [e for e in short.run_to_completion() if getattr(e, "usage", None)][-1]
    assert fin.request == rid and fin.reason.value == "length"
    assert fin.usage.prompt_tokens + fin.usage.completion_tokens <= 64


def test_control_token_strings_the_tokenizer_lacks(llama_dir):
    # neither string: an ordinary model as far as these strings go, served auto-regressively
    assert not Engine(llama_dir, EngineConfig(num_blocks=8, control=ControlTokens.published())).auto_parallel
    # only one of them: a misconfiguration (a mistyped string), refused
    with pytest.raises(UserError, match=r"control token '\[SplitMask\]' is not in the tokenizer"):
        Engine(llama_dir, EngineConfig(num_blocks=8, control=ControlTokens(fork="[SplitMask]", child="[Child]")))


def test_bad_model_directories(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Engine(tmp_path / "missing")
    with pytest.raises(UserError, match="no config.json"):
        Engine(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(UserError, match="not a causal LM"):
        Engine(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Engine(tmp_path)


@pytest.mark.parametrize("kwargs, words", [
    ({"block_size": 3}, "power of two"),
    ({"num_blocks": 0}, "num_blocks"),
    ({"max_batch_tokens": 1}, "max_batch_tokens"),
    ({"dtype": "int8"}, "dtype"),
])
def test_bad_engine_config(kwargs, words):
    with pytest.raises(UserError, match=words):
        EngineConfig(**kwargs)
