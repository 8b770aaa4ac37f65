"""Engine benchmarks: APAR beside auto-regressive decoding on the same model and the same answers.

Part 1 replays real answer shapes: paragraph trees of the AlpacaEval data's test-split responses, tokenized
with the model's tokenizer. APAR feeds each tree (forks where the tree forks); AR feeds the same answer's
restored linear tokens as one thread. Same model, same requests, one run, so the rows compare.
Part 2 compares the engine in AR mode with Hugging Face `generate` (greedy, same batch, same token
counts): the library a user would otherwise call.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apar.engine.engine import Engine
from apar.engine.events import RequestFinished
from apar.engine.params import SamplingParams
from apar.engine.replay import ReplayNode


@dataclass(slots=True)
class RunStats:
    name: str
    requests: int
    tokens: int  # completion tokens over all requests
    engine_steps: int
    steps_mean: float  # generation steps per request
    wall_s: float
    peak_blocks: int
    attended: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def answer_trees(engine: Engine, n: int, max_answer_tokens: int, seed: int, data: Path | None = None
                 ) -> list[tuple[list[int], ReplayNode, list[int]]]:
    """(prompt ids, APAR tree, AR linear ids) for n forkable test-split answers of the AlpacaEval data
    (`data`, else `apar.data.alpaca_split.data_dir()`)."""
    return answer_trees_for(engine.tokenizer, engine.config.control, n, max_answer_tokens, seed, data)


def answer_trees_for(tokenizer, control_tokens, n: int, max_answer_tokens: int, seed: int,
                     data: Path | None = None) -> list[tuple[list[int], ReplayNode, list[int]]]:
    """`answer_trees` from a tokenizer and the control token strings (`ControlTokens`), no engine needed."""
    from apar.data.packing import ControlIds, tokenize_tree
    from apar.data.readers import read_conversations
    from apar.data.rules import build_tree
    from apar.data.alpaca_split import data_dir, is_test_instruction

    data = data_dir(data)
    control = ControlIds.from_tokenizer(tokenizer, control_tokens.fork, control_tokens.child)
    convs = [c for c in read_conversations(data) if is_test_instruction(c.prompt)]
    random.Random(seed).shuffle(convs)
    out = []
    for conv in convs:
        tree = build_tree(conv.response)
        if not tree.forks:
            continue
        tt = tokenize_tree(conv.prompt, tree, tokenizer, control)
        if tt.response_tokens > max_answer_tokens or len(tt.prompt) > 256:
            continue
        nodes = [ReplayNode(list(t.ids[1:] if t.parent is not None else t.ids)) for t in tt.threads]
        for t, node in zip(tt.threads, nodes):
            if t.parent is not None:
                nodes[t.parent].children.append(node)  # pre-order: children come in fork order
        linear = [tok for tok in _restore(tt, 0) if tok not in (control.fork, control.child, control.eos)]
        out.append((tt.prompt, nodes[0], linear + [control.eos]))
        if len(out) == n:
            break
    return out


def _restore(tt, index: int) -> list[int]:
    thread = tt.threads[index]
    kids = {t.anchor: i for i, t in enumerate(tt.threads) if t.parent == index}
    out = []
    for i, tok in enumerate(thread.ids):
        out.append(tok)
        if i in kids:
            out.extend(_restore(tt, kids[i]))
    return out


def run_replay(engine: Engine, name: str, items: list[tuple[list[int], ReplayNode]], auto_parallel: bool) -> RunStats:
    requests = [(prompt, SamplingParams(max_tokens=tree_tokens(tree), auto_parallel=auto_parallel,
                                        max_threads=tree.threads(), max_depth=64), tree) for prompt, tree in items]
    return _timed(engine, name, requests)


def run_sampled(engine: Engine, name: str, prompts: list[list[int]], params: SamplingParams) -> RunStats:
    return _timed(engine, name, [(p, params, None) for p in prompts])


def _timed(engine: Engine, name: str, requests: list[tuple[list[int], SamplingParams, ReplayNode | None]]) -> RunStats:
    """Submit every request at once, run them to the end, and sum their usage."""
    engine.peak_blocks = 0
    start_steps = engine.steps
    t0 = time.perf_counter()
    for prompt, params, tree in requests:
        engine.add_request(prompt, params, replay=tree)
    done = [e for e in engine.run_to_completion() if isinstance(e, RequestFinished)]
    wall = time.perf_counter() - t0
    return RunStats(name, len(done), sum(e.usage.completion_tokens for e in done), engine.steps - start_steps,
                    sum(e.usage.steps for e in done) / len(done), wall, engine.peak_blocks,
                    sum(e.usage.attended_tokens for e in done))


def tree_tokens(node: ReplayNode) -> int:
    """Tokens the engine produces for a replayed tree: every thread's tokens and each child's [Child]."""
    return len(node.tokens) + sum(1 + tree_tokens(c) for c in node.children)


def run_engine_ar(engine: Engine, prompts: list[list[int]], new_tokens: int) -> RunStats:
    return run_sampled(engine, "engine AR", prompts, SamplingParams(max_tokens=new_tokens, auto_parallel=False,
                                                                    ignore_eos=True))


@torch.inference_mode()
def run_hf_generate(model_dir: Path, prompts: list[list[int]], new_tokens: int, device: torch.device,
                    dtype: torch.dtype) -> RunStats:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
    model.generate(ids[:, :4], max_new_tokens=2, do_sample=False)  # warm up
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    n = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return RunStats("HF generate", len(prompts), n, new_tokens, float(new_tokens), wall, 0, 0)


def fastest(runs: list[RunStats]) -> RunStats:
    return min(runs, key=lambda r: r.wall_s)


def table(rows: list[RunStats], columns: list[tuple[str, str]]) -> str:
    head = ["run"] + [c for c, _ in columns]
    return text_table(head, [[r.name] + [_fmt(getattr(r, attr)) for _, attr in columns] for r in rows])


def text_table(head: list[str], body: list[list[str]]) -> str:
    """The first column left-aligned, the others right-aligned."""
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
             for line in [head] + body]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    return str(v)
