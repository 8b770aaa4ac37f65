"""`apar train`: control tokens added, loss goes down, checkpoint/resume gives the same model, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from apar.cli import main
from apar.data.alpaca_split import is_test_instruction
from apar.tokenizer import train_bpe
from apar.train.trainer import CHECKPOINT, SUMMARY_FILE, Trainer

ANSWER = "Tips:\n1. Sleep: go to bed early.\n2. Eat: more greens.\n3. Walk: every day.\n\nGood luck!"


def _bare_model_dir(path: Path) -> Path:
    """A tiny Llama whose tokenizer lacks the control tokens."""
    tok = train_bpe([ANSWER, "Question about tips?"] * 20, 300, control_tokens=())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = _bare_model_dir(root / "base")
    prompts = [f"Question {i}?" for i in range(30)]
    assert any(is_test_instruction(p) for p in prompts)  # some held-out records
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": ANSWER}) + "\n" for p in prompts))
    return model, data, root


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(model), str(data), "--out", str(out), "--steps", "6", "--batch-size", "2",
            "--lr", "1e-2", "--warmup", "1", "--max-length", "96", "--log-every", "2", *extra]


def test_train_writes_a_loadable_model_with_control_tokens(setup, capsys):
    model, data, root = setup
    out = root / "run"
    assert main(_args(model, data, out)) == 0
    printed = capsys.readouterr().out
    assert "added control tokens [Fork], [Child]" in printed
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("[Fork]") != tok.unk_token_id
    assert tok.decode(tok.encode("a:[Fork]", add_special_tokens=False)[-1:]) == "[Fork]"
    reloaded = LlamaForCausalLM.from_pretrained(str(out))
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tok)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["held_out_records"] > 0 and summary["train_records"] > 0
    result = summary["result"]
    assert result["steps"] == 6 and result["held_out_loss"] is not None
    assert result["train_loss"] < 5.0  # from about ln(302) = 5.7 at random init
    assert not (out / CHECKPOINT).exists()


def test_resume_from_a_checkpoint_gives_the_same_model(setup, monkeypatch, capsys):
    model, data, root = setup
    straight, resumed = root / "straight", root / "resumed"
    assert main(_args(model, data, straight, "--save-every", "2")) == 0

    real_step = Trainer._train_step

    def crash_at_step_4(self, batch):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_step_4)
    assert main(_args(model, data, resumed, "--save-every", "2")) == 130
    assert (resumed / CHECKPOINT).is_dir()
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    assert main(_args(model, data, resumed, "--save-every", "2")) == 2  # a checkpoint is there
    assert "--resume" in capsys.readouterr().err
    assert main(_args(model, data, resumed, "--save-every", "2", "--resume")) == 0
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_train_errors_name_the_path(setup, tmp_path, capsys):
    model, data, _ = setup
    assert main(_args(tmp_path / "no-model", data, tmp_path / "o")) == 2
    assert "no-model: not a model directory" in capsys.readouterr().err
    assert main(_args(model, tmp_path / "none.jsonl", tmp_path / "o")) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert main(_args(model, data, tmp_path / "o", "--resume")) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
