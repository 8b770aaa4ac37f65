"""Every attention backend gives every thread the plain model's logits on its context.

The golden tests of the engine (forks, nested forks, chunked prefill, grouped-query attention, preempted
requests, n answers) are run again with each backend (`--attention`); sliding windows get models whose
window is smaller than the contexts (Mistral: every layer; Qwen2: full then sliding). Then the parts:
the cascade grouping rule, the merge by log-sum-exp, and the context table's rows.

The triton backend's kernels run in Triton's interpreter here (about 20 ms a program, hundreds a step), so
it runs the cases that together hold every feature: the trees on the Mistral with a window (forks, nested
forks, chunked prefill, GQA, a sliding window, an AR request beside), the golden test through preemption
and recompute (the Llama, without a window), a child reading its parent's [Fork] of the same step, and its
CUDA-graph buffers below. The other cases (other architectures, n answers) differ in what the engine
does, not in what a backend computes.
"""
from __future__ import annotations

import dataclasses
import functools
import random

import pytest
import torch
from transformers import MistralConfig, Qwen2Config

import tests.test_engine_golden as golden
import tests.test_engine_n as answers
import tests.test_engine_pressure as pressure
from apar.engine.backends import BACKENDS, cascade, native, portable
from apar.engine.backends.base import Run, attention_with_lse, merge_by_lse
from apar.engine.backends.cascade import Span, plan_cascade
from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.events import TokenEvent
from apar.engine.params import SamplingParams
from apar.engine.replay import ReplayNode
from apar.modelgen import ModelShape, random_model, save_model

WINDOW = 8  # positions: far shorter than the golden contexts (prompts of 5-40 tokens, trees below)


def _window_model(path, arch: str, tokenizer, seed: int):
    s = ModelShape()
    common = dict(vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
                  num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                  max_position_embeddings=s.max_positions, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if arch == "mistral":
        cfg = MistralConfig(sliding_window=WINDOW, **common)
    else:  # layer 0 full, layer 1 sliding: both kinds in one model
        cfg = Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **common)
    return save_model(path, random_model(cfg, tokenizer, seed), tokenizer)


@pytest.fixture(scope="session")
def mistral_window_dir(tmp_path_factory, tokenizer):
    return _window_model(tmp_path_factory.mktemp("mistral-window"), "mistral", tokenizer, seed=4)


@pytest.fixture(scope="session")
def qwen2_window_dir(tmp_path_factory, tokenizer):
    return _window_model(tmp_path_factory.mktemp("qwen2-window"), "qwen2", tokenizer, seed=5)


COMPILED = native(torch.device("cpu"))  # triton's kernels are interpreted on the CPU: see the module's docstring
TREE_CASES = [(b, arch) for b in BACKENDS for arch in ["llama", "qwen2", "mistral", "mistral_window", "qwen2_window"]
              if b in COMPILED or arch == "mistral_window"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Engines built by the reused golden tests use this backend; cascade groups every span that two
    threads share from 4 positions on (the tiny models' K/V would never be worth it by default)."""
    monkeypatch.setattr(cascade, "MIN_SHARED", 4)
    monkeypatch.setattr(cascade, "MIN_SAVED_BYTES", 0)
    config = functools.partial(EngineConfig, attention=request.param)
    for module in (golden, pressure, answers):
        monkeypatch.setattr(module, "EngineConfig", config)
    return request.param


@pytest.mark.parametrize(("backend", "arch"), TREE_CASES, indirect=["backend"])
def test_replayed_trees_match_plain_model(backend, arch, request):
    """Forks, nested forks, chunked prefill (16-token steps), 4-token blocks, GQA (4 heads, 2 KV heads),
    sliding windows; an AR request beside."""
    golden.test_replayed_trees_match_plain_model(arch, "cpu", request)


def test_child_sees_parent_fork_in_the_same_step(backend, llama_dir):
    golden.test_child_sees_parent_fork_in_the_same_step(llama_dir)


def test_golden_through_preemption_and_recompute(backend, llama_dir):
    pressure.test_golden_through_preemption_and_recompute(llama_dir)


@pytest.mark.parametrize("backend", COMPILED, indirect=True)
def test_every_thread_of_every_answer_matches_the_plain_model(backend, llama_dir):
    answers.test_every_thread_of_every_answer_matches_the_plain_model(llama_dir)


@pytest.mark.parametrize("backend", COMPILED, indirect=True)
def test_preempted_answers_go_on_unchanged(backend, llama_dir):
    answers.test_preempted_answers_go_on_unchanged(llama_dir)


def test_backends_pick_the_same_greedy_tokens(llama_dir, monkeypatch):
    """Many threads over a long shared prompt (cascade groups it, flex reads it once): the same tokens."""
    monkeypatch.setattr(cascade, "MIN_SAVED_BYTES", 0)
    got = {}
    for name in COMPILED:
        eng = Engine(llama_dir, EngineConfig(block_size=16, num_blocks=256, max_batch_tokens=64, attention=name))
        rng = random.Random(5)
        plain = [i for i in range(5, 400) if i not in (eng.fork_id, eng.child_id, *eng.eos_ids)]
        kids = [ReplayNode(rng.sample(plain, 20)) for _ in range(6)]
        root = []
        for _ in kids:
            root += [rng.choice(plain), eng.fork_id]
        tree = ReplayNode(root + [7] * 20, kids)
        eng.add_request(rng.sample(plain, 120), SamplingParams(max_tokens=400), replay=tree)
        eng.add_request(rng.sample(plain, 50), SamplingParams(max_tokens=30, auto_parallel=False, n=4))
        got[name] = [(e.request, e.thread, e.token) for e in eng.run_to_completion() if isinstance(e, TokenEvent)]
        if name == "cascade":
            assert eng.runner.backend.shared_steps > 20
    assert got["cascade"] == got["portable"] == got["flex"]


@pytest.mark.parametrize("backend_name", ["portable", "cascade"])
@pytest.mark.parametrize("arch", ["llama", "mistral_window"])
def test_length_buckets_match_plain_model(backend_name, arch, request, monkeypatch):
    """Every decode step split into length buckets (any split that saves a padded cell pays): the
    replayed trees still match the plain model, windows included (cascade on its plain path)."""
    monkeypatch.setattr(portable, "BUCKET_CELLS", 0)
    monkeypatch.setattr(golden, "EngineConfig", functools.partial(EngineConfig, attention=backend_name))
    counts = []
    real = portable.gather_buckets

    def counted(step):
        buckets = real(step)
        counts.append(len(buckets))
        return buckets

    monkeypatch.setattr(portable, "gather_buckets", counted)
    monkeypatch.setattr(cascade, "gather_buckets", counted)
    golden.test_replayed_trees_match_plain_model(arch, "cpu", request)
    assert max(counts) > 1


@pytest.mark.parametrize("arch", ["llama", "mistral_window"])
def test_cascade_private_buckets_match_plain_model(arch, request, monkeypatch):
    """Sharing forced on and every private-part split that saves a padded cell made: several private
    buckets beside the groups, merged by log-sum-exp; the replayed trees still match the plain model."""
    monkeypatch.setattr(portable, "BUCKET_CELLS", 0)
    monkeypatch.setattr(cascade, "MIN_SHARED", 4)
    monkeypatch.setattr(cascade, "MIN_SAVED_BYTES", 0)
    monkeypatch.setattr(golden, "EngineConfig", functools.partial(EngineConfig, attention="cascade"))
    counts = []
    real = cascade.length_buckets

    def counted(lens):
        groups = real(lens)
        counts.append(len(groups))
        return groups

    monkeypatch.setattr(cascade, "length_buckets", counted)
    golden.test_replayed_trees_match_plain_model(arch, "cpu", request)
    assert counts and max(counts) > 1


def test_length_buckets_split_where_padding_costs():
    lens = [30, 5, 6, 400, 7, 31, 5, 29]
    groups = portable.length_buckets(lens, cost=0)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))  # every thread once
    assert len(groups) <= portable.MAX_BUCKETS
    spans = [(min(lens[i] for i in g), max(lens[i] for i in g)) for g in groups]
    assert all(hi < lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # ascending, not overlapping
    assert [3] in groups  # the long outlier alone: padding the others to 400 is what the split saves
    assert portable.length_buckets([9, 9, 9]) == [[0, 1, 2]]  # nothing to save: one bucket, in order
    assert portable.length_buckets(lens, cost=10**9) == [list(range(len(lens)))]  # no split pays


# ---- the parts ----------------------------------------------------------------------------------------
def test_cascade_groups_positions_by_their_readers():
    """Root (writer 1, row 10) forked child A (writer 2, row 11) at 40 and child B (writer 3, row 12) at
    60; A forked grandchild C (writer 4, row 13) at 50. Decoding: root at 80, A at 55, B at 70, C at 52."""
    runs = [
        (Run(1, 0, 81),),
        (Run(1, 0, 40), Run(2, 40, 56)),
        (Run(1, 0, 60), Run(3, 60, 71)),
        (Run(1, 0, 40), Run(2, 40, 50), Run(4, 50, 53)),
    ]
    plan = plan_cascade(runs, [10, 11, 12, 13], min_shared=8)
    groups = {key: spans for key, spans in plan.groups}
    assert groups == {(0, 1, 2, 3): [Span(10, 0, 40)], (0, 2): [Span(10, 40, 60)], (1, 3): [Span(11, 40, 50)]}
    assert plan.private == [[Span(10, 60, 81)], [Span(11, 50, 56)], [Span(12, 60, 71)], [Span(13, 50, 53)]]
    # every thread reads each of its positions exactly once, across its parts
    for i, thread_runs in enumerate(runs):
        want = sorted(p for r in thread_runs for p in range(r.start, r.end))
        have = sorted(p for key, spans in plan.groups if i in key for s in spans for p in range(s.start, s.end))
        have = sorted(have + [p for s in plan.private[i] for p in range(s.start, s.end)])
        assert have == want
    # a shared piece shorter than min_shared is read by each of its readers instead, from its own row
    small = plan_cascade(runs, [10, 11, 12, 13], min_shared=15)
    assert {key for key, _ in small.groups} == {(0, 1, 2, 3), (0, 2)}
    assert small.private[1] == [Span(11, 40, 56)] and small.private[3] == [Span(13, 40, 53)]  # neighbours joined


def test_lse_merge_equals_attention_over_the_whole_context():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 2, 8)  # [Hkv, B, M, D]: 3 queries, 2 query heads per KV head
    k, v = torch.randn(2, 3, 20, 8), torch.randn(2, 3, 20, 8)
    keep = torch.rand(3, 1, 20) > 0.3
    keep[2] = False  # a query whose keys are all elsewhere
    keep[2, 0, :5] = True
    whole, _ = attention_with_lse(q, k, v, keep, 0.35)
    cut = torch.zeros_like(keep)
    cut[..., :7] = True
    a, lse_a = attention_with_lse(q, k, v, keep & cut, 0.35)
    b, lse_b = attention_with_lse(q, k, v, keep & ~cut, 0.35)  # query 2 keeps nothing here: weight 0
    flat = lambda t: t.transpose(0, 1).reshape(3, 4, -1)  # noqa: E731  [Hkv, B, G, ...] -> [B, H, ...]
    lses = torch.cat([flat(lse_a[..., None]), flat(lse_b[..., None])])[..., 0]
    merged = merge_by_lse(torch.cat([flat(a), flat(b)]), lses, torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    assert torch.allclose(merged, flat(whole), atol=1e-6)
    ref = torch.softmax((q @ k.transpose(-1, -2) * 0.35).masked_fill(~keep, -torch.inf), -1) @ v
    assert torch.allclose(whole, ref, atol=1e-6)


def test_context_table_rows_follow_the_ledger(llama_dir):
    """A thread holds a row while the ledger holds its KV; a child's row starts with its parent's slots up
    to the [Fork]; rows come back once threads end; row 0 (padding) is never given."""
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=64, max_batch_tokens=16))
    table = eng.runner.contexts
    tree = ReplayNode([11, 12, eng.fork_id, 13, 14, 15], [ReplayNode([21, 22, 23, 24, 25, 26, 27])])
    rid = eng.add_request([5, 6, 7, 8, 9], SamplingParams(max_tokens=50), replay=tree)
    seen = False
    while eng.has_work():
        eng.step()
        req = eng.requests.get(rid)
        if req and len(req.threads) == 2 and req.threads[1].ctx.row is not None and req.threads[0].running:
            root, child = req.threads
            rows = table.table[[root.ctx.row, child.ctx.row]].tolist()
            assert rows[1][: child.start_pos] == rows[0][: child.start_pos]  # the fork copied the prefix
            assert len(set(rows[1][child.start_pos : child.ctx.n_ctx]) & set(rows[0][: root.ctx.n_ctx])) == 0
            seen = True
    assert seen
    table.flush()  # rows come back at the next step's flush
    assert not table._holders and sorted(table._free) == list(range(1, table.rows))
    assert (table.table[0] == -1).all()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_decode_graph_path_on_padded_static_buffers(compiled, llama_dir, monkeypatch):
    """The CUDA-graph path without a GPU: `DecodeGraphs` with its capture replaced by the forward itself
    (a replay reruns the captured forward on the static buffers, which is what this runs), built with the
    runner as on CUDA, so the engine's warm-up runs through it and then captures every bucket up front
    (`capture_all`) from padding rows only. Decode steps padded to their bucket (padding rows writing to
    the trash slot, reading row 0) give the plain model's logits, with the flex backend's static block
    tables; with eager layers and with compiled ones (the CUDA default)."""
    from apar.engine.cuda_graphs import DecodeGraphs
    from apar.engine.model_runner import ModelRunner

    class EagerGraphs(DecodeGraphs):
        def _record(self, forward):
            return forward

    monkeypatch.setattr(golden, "EngineConfig", functools.partial(EngineConfig, attention="flex", compile=compiled))
    made = []
    real_init = ModelRunner.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.graphs = EagerGraphs(self, buckets=(1, 2, 4, 8, 16, 24, 32))
        made.append(self.graphs)

    monkeypatch.setattr(ModelRunner, "__init__", init)
    golden.test_replayed_trees_match_plain_model("llama", "cpu", _Request(llama_dir))
    graphs = made[0]
    assert sorted(graphs.graphs)[:5] == [1, 2, 4, 8, 16]  # the warm-up's, then capture_all's up to 16 threads
    assert graphs.off is None and graphs.replays > 20


class _Request:
    """Enough of pytest's `request` for the reused golden test."""

    def __init__(self, llama_dir) -> None:
        self.llama_dir = llama_dir

    def getfixturevalue(self, name: str):
        return getattr(self, name)


def test_auto_gives_way_to_cascade_when_flex_cannot_run(llama_dir, monkeypatch):
    """`auto` that picked flex (on CUDA) and cannot run it (no compiler, a kernel error) before its first
    success decodes with cascade instead; `--attention flex` asked explicitly fails loudly."""
    from apar.engine.backends import flex
    import apar.engine.model_runner as model_runner

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(model_runner, "resolve", lambda name, device, head_dim=None: "flex")
    monkeypatch.setattr(flex.FlexBackend, "attend", broken)
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=64, attention="auto"))
    assert eng.runner.backend.name == "flex"
    eng.add_request([5, 6, 7, 8], SamplingParams(max_tokens=6, auto_parallel=False))
    assert sum(isinstance(e, TokenEvent) for e in eng.run_to_completion()) == 6
    assert eng.runner.backend.name == "cascade"
    strict = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=64, attention="flex"))
    strict.add_request([5, 6, 7, 8], SamplingParams(max_tokens=6, auto_parallel=False))
    with pytest.raises(RuntimeError, match="no compiler here"):
        strict.step()


def test_rows_come_back_from_requests_ended_mid_recompute(llama_dir):
    """Cancelled requests (waiting, preempted, recomputing, running) leave no row behind."""
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=40, max_batch_tokens=16, fork_watermark=0.0))
    ids = [eng.add_request(p, SamplingParams(max_tokens=300), replay=t) for p, t in pressure.make_trees(eng, 6, 3)]
    for step in range(400):
        if not eng.has_work():
            break
        eng.step()
        if step % 7 == 3 and ids:
            eng.abort(ids.pop())
    while eng.has_work():
        eng.step()
    table = eng.runner.contexts
    table.flush()
    assert eng.preemptions > 0 and not table._holders and sorted(table._free) == list(range(1, table.rows))


def test_triton_graph_buffers_give_the_eager_answer():
    """The triton backend as a CUDA graph runs it, without a GPU: the step padded to its bucket (padding
    threads reading row 0, no runs), fixed capacities of empty items, groups at their widest: the real
    threads' outputs equal the eager, exactly sized launch's, with and without a window; padding rows get
    zeros. One thread's graph (the AR step at batch 1) has no group launch at all. The kernels run in
    Triton's interpreter."""
    from apar.bench_suite.attention import AttentionShape, _step
    from apar.engine.backends import triton as triton_backend
    from apar.engine.backends.base import DecodeQueries, ModelInputs
    from apar.engine.backends.triton import TritonBackend

    shape = AttentionShape(threads=6, context=40, shared=24, heads=4, kv_heads=2, head_dim=16, block_size=4)
    pool, _, step = _step(shape, torch.device("cpu"), torch.float32)
    backend = TritonBackend(torch.device("cpu"), query_group=2, min_shared=4)
    query = torch.randn(8, shape.heads, shape.head_dim, generator=torch.Generator().manual_seed(3))
    d = step.decode
    pad = 2
    padded = ModelInputs(step.input_ids, step.positions, step.write_slots, step.sample_rows,
                      DecodeQueries(torch.arange(8, dtype=torch.int32), torch.cat([d.table_rows, d.table_rows.new_zeros(pad)]),
                                    torch.cat([d.lens, d.lens.new_ones(pad)]), list(range(8)),
                                    d.host_table_rows + [0] * pad, d.host_lens + [1] * pad,
                                    d.families + [-1, -2], d.runs + [(), ()]), [], step.contexts)
    eager = backend.prepare(step)
    assert len(eager.kinds) == 2  # private items and one group (the shared prefix)
    fixed = backend.prepare(padded, fixed=True)
    assert fixed.kinds[0].items.shape[0] == 2 * 8 + 8 and fixed.kinds[1].qb == triton_backend.MAX_ROWS // 2
    for window in (None, 8):
        want = backend.attend(eager, query[:6], pool.k[0], pool.v[0], 0.25, window)
        got = backend.attend(fixed, query, pool.k[0], pool.v[0], 0.25, window)
        assert (got[:6] - want).abs().max().item() < 1e-5
        assert (got[6:] == 0).all()
    assert backend.shared_steps == 2
    one = DecodeQueries(torch.arange(1, dtype=torch.int32), d.table_rows[:1], d.lens[:1], [0], d.host_table_rows[:1],
                        d.host_lens[:1], d.families[:1], d.runs[:1])
    alone = backend.prepare(dataclasses.replace(step, decode=one), fixed=True)
    assert len(alone.kinds) == 1 and alone.kinds[0].items.shape[0] == 2 + 8  # private items only
    want = backend.attend(backend.prepare(dataclasses.replace(step, decode=one)), query[:1], pool.k[0], pool.v[0],
                          0.25, None)
    got = backend.attend(alone, query[:1], pool.k[0], pool.v[0], 0.25, None)
    assert (got - want).abs().max().item() < 1e-5


def test_triton_layout_cuts_spans_and_fits_a_graphs_capacities():
    """Work items cut each span at `split` positions; reader j of an item owns part part0 + j; every thread
    owns one part per item it reads. A graph's capacities are met with longer items, or not at all."""
    from apar.engine.backends import triton as triton_backend
    from apar.engine.backends.triton import TritonBackend, layout

    plan = cascade.CascadePlan(groups=[((0, 1, 2), [Span(1, 0, 100)])],
                               private=[[Span(1, 100, 130)], [Span(2, 100, 110), Span(2, 120, 125)], []])
    lay = layout(plan, per_item=2, split=64)
    items = [lay.private[i : i + triton_backend.ITEM] for i in range(0, len(lay.private), triton_backend.ITEM)]
    assert items == [[1, 100, 130, 0, 1, 0], [2, 100, 110, 1, 1, 1], [2, 120, 125, 1, 1, 2]]
    groups = [lay.group[i : i + triton_backend.ITEM] for i in range(0, len(lay.group), triton_backend.ITEM)]
    # readers 0, 1 then 2 (two per item), the span cut at 64: four items
    assert groups == [[1, 0, 64, 2, 2, 3], [1, 64, 100, 2, 2, 5], [1, 0, 64, 4, 1, 7], [1, 64, 100, 4, 1, 8]]
    assert lay.readers == [0, 1, 0, 1, 2] and lay.widest == 2  # a private item reads its thread's slot
    owned = {t: lay.parts[lay.offsets[t] : lay.offsets[t + 1]] for t in range(3)}
    assert owned == {0: [0, 3, 5], 1: [1, 2, 4, 6], 2: [7, 8]}
    backend = TritonBackend(torch.device("cpu"))
    fits = backend._fit(plan, 2, (3 * triton_backend.ITEM, 3 * triton_backend.ITEM, 100, 4, 100))  # 3 group items at most
    assert fits is not None and len(fits.group) == 2 * triton_backend.ITEM  # cut at 512: one item per reader pair
    assert backend._fit(plan, 2, (3 * triton_backend.ITEM, triton_backend.ITEM, 100, 4, 100)) is None


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_triton_kernels_compile_for_a_hopper_gpu(dtype):
    """Without a GPU: Triton compiles both kernels for sm_90 (an H100's) down to a cubin, for the shapes the
    engine launches (a private item; 64 readers of a group; 4 query heads per KV head, with a window).
    Catches what the interpreter does not check (types, layouts the GPU compiler refuses); in bf16 the
    products run on the tensor cores (mma instructions in the PTX)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from apar.engine.backends import triton as triton_backend
    from apar.engine.backends.triton_kernels import merge, partial

    target = GPUTarget("cuda", 90, 32)

    def build(fn, types: list[str], consts: dict, **options):
        jit = triton.jit(fn)
        names = jit.arg_names
        signature = dict(zip(names, types + ["constexpr"] * len(consts)))
        src = ASTSource(jit, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
        return triton.compile(src, target=target, options=options)

    args = [f"*{dtype}"] * 3 + ["*i32"] * 5 + ["*fp32"] * 2 + ["i32"] * 4 + ["fp32", "i32"]
    for rows, readers, group, windowed in ((16, 1, 1, False), (64, 64, 1, False), (16, 1, 4, True)):
        kernel = build(partial, args, {"H": 32, "GROUP": group, "QB": readers, "M": rows, "D": 128, "BLOCK": triton_backend.BLOCK_N,
                                       "IEEE": dtype == "fp32", "WINDOWED": windowed},
                       num_warps=triton_backend.NUM_WARPS, num_stages=triton_backend.NUM_STAGES)
        assert kernel.asm["cubin"]
        if dtype == "bf16":
            assert "mma" in kernel.asm["ptx"]
    kernel = build(merge, ["*fp32"] * 2 + ["*i32"] * 3 + [f"*{dtype}"] + ["i32"] * 2, {"H": 32, "HP": 32, "D": 128})
    assert kernel.asm["cubin"]


def test_compiled_layers_match_the_plain_model(llama_dir, monkeypatch):
    """`compile=True` on the CPU (on CUDA it is the default): every decoder layer under torch.compile as one
    graph, its K/V write traced and the backend's attention the opaque op `apar::attend`. The engine's
    warm-up compiles before any request and leaves the ledger empty and the counters at zero; then the
    golden trees (forks, nested forks, chunked prefill, an AR request beside) give the plain model's
    logits."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=64, compile=True))
    layers = eng.runner.model.get_decoder().layers
    assert eng.runner.compiled and all(layer._compiled_call_impl is not None for layer in layers)
    assert eng.runner.model.config._attn_implementation == "apar_paged_compiled"
    assert counters["stats"]["unique_graphs"] > before  # the warm-up compiled
    assert eng.ledger.num_used == 0 and eng.steps == 0 and not eng.requests
    assert not Engine(llama_dir, EngineConfig(block_size=4, num_blocks=64)).runner.compiled  # CPU default: off
    monkeypatch.setattr(golden, "EngineConfig", functools.partial(EngineConfig, compile=True))
    golden.test_replayed_trees_match_plain_model("llama", "cpu", _Request(llama_dir))


@pytest.mark.parametrize(("backend", "arch"), [("cascade", "mistral_window"), ("flex", "qwen2_window")],
                         indirect=["backend"])
def test_compiled_layers_match_the_plain_model_with_windows(backend, arch, request, monkeypatch):
    """Compiled layers with a sliding window (every layer; full then sliding) through two backends: the
    window reaches `apar::attend` as a number, and the compiled layers never break their graph."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    monkeypatch.setattr(golden, "EngineConfig", functools.partial(golden.EngineConfig, compile=True))
    golden.test_replayed_trees_match_plain_model(arch, "cpu", request)
    assert sum(counters["graph_break"].values()) == breaks
