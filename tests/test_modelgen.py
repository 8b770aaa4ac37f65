"""Random-weight model directories from a config: loadable by the engine, equal to the plain model."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.errors import UserError
from apar.engine.events import TokenEvent
from apar.engine.params import SamplingParams
from apar.modelgen import make_model


def test_model_from_a_config_file(tmp_path, tokenizer):
    cfg = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 256}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    out = make_model(tmp_path / "m", tokenizer=tokenizer, config_file=tmp_path / "c.json")
    eng = Engine(out, EngineConfig(num_blocks=16))
    eng.add_request([5, 6, 7], SamplingParams(max_tokens=6, auto_parallel=False))
    got = [e.token for e in eng.run_to_completion() if isinstance(e, TokenEvent)]
    ref = AutoModelForCausalLM.from_pretrained(str(out))
    want = ref.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False,
                        suppress_tokens=[eng.fork_id, eng.child_id])[0, 3:].tolist()
    assert got == [t for t in want if t not in eng.eos_ids]
    assert ref.config.vocab_size == len(tokenizer)


def test_bad_config_files(tmp_path, tokenizer):
    with pytest.raises(UserError, match="cannot read config"):
        make_model(tmp_path / "m", tokenizer=tokenizer, config_file=tmp_path / "missing.json")
    (tmp_path / "c.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UserError, match="no model_type"):
        make_model(tmp_path / "m", tokenizer=tokenizer, config_file=tmp_path / "c.json")
    with pytest.raises(UserError, match="unknown architecture"):
        make_model(tmp_path / "m", arch="gpt5", tokenizer=tokenizer)
