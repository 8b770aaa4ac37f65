"""`apar demo-model` on a tiny stand-in for the AlpacaEval data: reproducible, both forms, loadable."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from apar.cli import main
from apar.train.demo import PRESETS
from apar.train.trainer import SUMMARY_FILE

LIST = "Here you go:\n\n1. **Sleep**: Go to bed early.\n2. **Eat**: More greens.\n3. **Walk**: Every day."
PLAIN = "A short plain answer. It has two sentences."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("alpaca")
    records = [{"instruction": f"Question {i}?", "output": LIST if i % 2 else PLAIN} for i in range(40)]
    (d / "m.json").write_text(json.dumps(records))
    return d


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid_shapes(preset):
    p = PRESETS[preset]
    assert p.hidden % p.heads == 0 and p.heads % p.kv_heads == 0 and p.vocab >= 300


def test_demo_model_is_seeded_and_loadable(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("APAR_DATA", str(data_dir))
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "twin"]
    for out, extra in zip(outs, ([], [], ["--ar"])):
        assert main(["demo-model", "--preset", "quick", "--out", str(out), "--steps", "2", *extra]) == 0
    capsys.readouterr()
    first, again = (load_file(str(o / "model.safetensors")) for o in outs[:2])
    for key in first:
        assert torch.equal(first[key], again[key]), key
    summaries = [json.loads((o / SUMMARY_FILE).read_text()) for o in outs]
    assert [s["form"] for s in summaries] == ["apar", "apar", "ar"]
    assert summaries[0]["held_out_records"] > 0 and summaries[2]["result"]["held_out_tree_loss"] is None
    tok = AutoTokenizer.from_pretrained(str(outs[0]))
    assert tok.convert_tokens_to_ids("[Fork]") != tok.unk_token_id and tok.chat_template
    assert LlamaForCausalLM.from_pretrained(str(outs[2])).config.vocab_size == len(tok)


def test_unknown_data_dir_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("APAR_DATA", str(tmp_path / "missing"))
    assert main(["demo-model", "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert "missing: data folder not found ($APAR_DATA)" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["demo-model", "--out", str(tmp_path / "o"), "--steps", "1", "--data", str(empty)]) == 2
    assert "empty: data folder holds no" in capsys.readouterr().err
