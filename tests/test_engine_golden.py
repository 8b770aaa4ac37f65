"""The golden test: every thread's logits at every step equal the plain HF model's no-cache forward on
that thread's context as one ordinary sequence; AR mode gives HF generate's greedy tokens."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.events import RequestFinished, ThreadStarted, TokenEvent
from apar.engine.params import SamplingParams
from apar.engine.replay import ReplayNode, random_tree


def reference_logits(model, context: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([context], device=model.device)).logits[0, -1].float().cpu()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tolerance(device: str, ref: torch.Tensor) -> float:
    """float32 on the CPU: 1e-4 absolute. bf16 on a GPU: both sides round every op to an 8-bit
    significand (relative step 2^-8 = 0.4%) and sum in different orders, so differences of a few steps
    at the scale of the logits are expected: 3% of the largest |logit|, at least 0.05."""
    if device == "cpu":
        return 1e-4
    return max(0.05, 0.03 * ref.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_replayed_trees_match_plain_model(arch, device, request):
    model_dir = request.getfixturevalue(f"{arch}_dir")
    dtype = "float32" if device == "cpu" else "bfloat16"
    # 4-token blocks and 16-token steps: block boundaries, sealed fork blocks and chunked prefill all occur
    eng = Engine(model_dir, EngineConfig(block_size=4, num_blocks=256, max_batch_tokens=16, device=device,
                                         dtype=dtype), keep_logits=True)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=eng.runner.dtype,
                                               attn_implementation="eager").to(device)
    rng = random.Random(7)
    eos = next(iter(eng.eos_ids))
    plain = [i for i in range(5, 400) if i not in (eng.fork_id, eng.child_id, eos)]
    trees = {}
    for k in range(3):
        prompt = rng.sample(plain, rng.randint(5, 40))
        tree = random_tree(rng, plain, eng.fork_id, depth=2, eos=eos)
        rid = eng.add_request(prompt, SamplingParams(max_tokens=500), replay=tree)
        trees[rid] = tree
    ar_prompt = rng.sample(plain, 9)
    ar_id = eng.add_request(ar_prompt, SamplingParams(max_tokens=12, auto_parallel=False))

    checked, worst = 0, 0.0
    tokens: dict[tuple[str, int], list[int]] = {}
    finished = {}
    while eng.has_work():
        res = eng.step()
        for (rid, tid), (ctx, logits) in res.logits.items():
            want = reference_logits(ref, ctx)
            diff = (logits - want).abs().max().item()
            assert diff < tolerance(device, want), (rid, tid, len(ctx), diff)
            worst = max(worst, diff)
            checked += 1
        for ev in res.events:
            if isinstance(ev, TokenEvent):
                tokens.setdefault((ev.request, ev.thread), []).append(ev.token)
            elif isinstance(ev, RequestFinished):
                finished[ev.request] = ev
        eng.ledger.check()
    assert checked > 60
    # the engine fed exactly the replayed trees: threads in fork order, tokens without the EOS
    for rid, tree in trees.items():
        order = []

        def walk(node):
            order.append([t for t in node.tokens if t != eos])
            for c in node.children:
                walk(c)

        walk(tree)
        got = [tokens.get((rid, i), []) for i in range(len(order))]
        assert sorted(map(tuple, got)) == sorted(map(tuple, order))
        assert finished[rid].usage.threads == tree.threads()
    assert finished[ar_id].usage.threads == 1
    assert eng.ledger.num_used == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_ar_mode_equals_hf_generate_greedy(arch, request):
    model_dir = request.getfixturevalue(f"{arch}_dir")
    eng = Engine(model_dir, EngineConfig(block_size=8, num_blocks=128, max_batch_tokens=32))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    rng = random.Random(3)
    prompts = [rng.sample(range(5, 900), n) for n in (3, 17, 40)]
    ids = [eng.add_request(p, SamplingParams(max_tokens=24, auto_parallel=False)) for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    for ev in eng.run_to_completion():
        if isinstance(ev, TokenEvent):
            got[ev.request].append(ev.token)
    for rid, prompt in zip(ids, prompts):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                           suppress_tokens=[eng.fork_id, eng.child_id])
        expected = [t for t in out[0, len(prompt):].tolist() if t not in eng.eos_ids]
        assert got[rid] == expected
    assert eng.ledger.num_used == 0


def test_child_sees_parent_fork_in_the_same_step(llama_dir):
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=64), keep_logits=True)
    tree = ReplayNode([11, 12, eng.fork_id, 13, 14], [ReplayNode([21, 22])])
    eng.add_request([5, 6, 7], SamplingParams(max_tokens=50), replay=tree)
    steps_with_both = 0
    while eng.has_work():
        res = eng.step()
        started = [e for e in res.events if isinstance(e, ThreadStarted) and e.parent is not None]
        if started:
            # next step: parent feeds [Fork] and the child feeds [Child] together
            nxt = eng.step()
            assert set(nxt.logits) == {(started[0].request, 0), (started[0].request, 1)}
            ctx, _ = nxt.logits[(started[0].request, 1)]
            assert ctx == [5, 6, 7, 11, 12, eng.fork_id, eng.child_id]
            steps_with_both += 1
    assert steps_with_both == 1
