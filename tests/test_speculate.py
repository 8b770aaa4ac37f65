"""Speculation's parts without a model: the ngram drafter (prompt lookup) against a brute-force search,
greedy acceptance, and the speculative-sampling rule, whose output must be distributed as the model's
(a chi-square test over thousands of draws on a small vocabulary)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from apar.engine.errors import UserError
from apar.engine.config import SpeculativeConfig
from apar.engine.speculate import NgramDrafter, accept_greedy, accept_sampled, make_drafter

FORK, CHILD = 90, 91


# ---- the ngram drafter -------------------------------------------------------------------------------
def test_longest_ngram_wins_over_a_later_shorter_one():
    ctx = [1, 2, 3, 10, 4, 3, 11, 1, 2, 3]
    assert NgramDrafter(1, 3).draft(ctx, 2) == [10, 4]  # [1, 2, 3] at 0
    assert NgramDrafter(1, 1).draft(ctx, 2) == [11, 1]  # [3] last seen at 5


def test_latest_earlier_occurrence_and_k_bound_the_draft():
    assert NgramDrafter(1, 2).draft([5, 6, 5, 7, 8, 9, 5], 2) == [7, 8]
    assert NgramDrafter(1, 2).draft([5, 6, 5, 7, 8, 9, 5], 9) == [7, 8, 9, 5]  # up to the context's end
    assert NgramDrafter(1, 2).draft([5, 6, 5, 7, 8, 9, 5], 0) == []
    assert NgramDrafter(1, 2).draft([1, 2, 3, 4], 3) == []  # nothing repeats
    assert NgramDrafter(2, 3).draft([4, 1, 4], 3) == []  # only a 1-gram repeats, and 2 is the least


def test_a_control_token_ends_the_draft():
    d = NgramDrafter(1, 2, stop_ids=(FORK, CHILD))
    assert d.draft([1, 2, 4, FORK, 5, 1, 2], 4) == [4]
    assert d.draft([1, 2, FORK, 5, 1, 2], 4) == []
    assert d.draft([7, 1, CHILD, 6, 7, 1], 4) == []


def test_tokens_whose_bytes_overlap_are_not_matched_across_two_tokens():
    # 256 and 0 as little-endian int32: 00 01 00 00 | 00 00 00 00 holds the bytes of 1 at offset 1
    assert NgramDrafter(1, 1).draft([256, 0, 5, 1], 2) == []
    assert NgramDrafter(1, 1).draft([1, 9, 256, 0, 5, 1], 2) == [9, 256]


def _brute_force(ctx: list[int], k: int, lo: int, hi: int, stop: set[int]) -> list[int]:
    for n in range(hi, lo - 1, -1):
        if len(ctx) < n + 1:
            continue
        suffix = ctx[-n:]
        for i in range(len(ctx) - n - 1, -1, -1):
            if ctx[i:i + n] == suffix:
                out = []
                for tok in ctx[i + n:i + n + k]:
                    if tok in stop:
                        break
                    out.append(tok)
                return out
    return []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 256, 65536, 65537, FORK]), max_size=40), st.integers(1, 5),
       st.integers(1, 3), st.integers(0, 3))
def test_ngram_drafter_equals_a_brute_force_search(ctx, k, lo, extra):
    hi = lo + extra
    assert NgramDrafter(lo, hi, (FORK,)).draft(ctx, k) == _brute_force(ctx, k, lo, hi, {FORK})


def test_config_is_checked_and_names_the_drafter():
    assert make_drafter(SpeculativeConfig(), (FORK,)) is None
    d = make_drafter(SpeculativeConfig("ngram", 3, 2, 5), (FORK,))
    assert isinstance(d, NgramDrafter) and (d.min_n, d.max_n, d.stop_ids) == (2, 5, {FORK})
    with pytest.raises(ValueError, match="model runner"):  # medusa heads are read beside a served model
        make_drafter(SpeculativeConfig("medusa"), (FORK,))
    for bad in (dict(method="eagle"), dict(num_tokens=0), dict(num_tokens=17), dict(min_ngram=3, max_ngram=2)):
        with pytest.raises(UserError):
            SpeculativeConfig(**bad)


# ---- acceptance --------------------------------------------------------------------------------------
def test_greedy_keeps_the_prefix_the_argmax_agrees_with_then_one_model_token():
    assert accept_greedy([4, 5, 6], [4, 5, 7, 8]).tokens == [4, 5, 7]  # correction at the first mismatch
    assert accept_greedy([4, 5, 6], [4, 5, 6, 8]).tokens == [4, 5, 6, 8]  # all accepted: the bonus
    v = accept_greedy([4, 5], [3, 5, 6])
    assert (v.accepted, v.tokens) == (0, [3])
    assert accept_greedy([], [9]).tokens == [9]


def test_sampled_rule_accepts_a_certain_token_and_never_a_banned_one():
    g = torch.Generator().manual_seed(0)
    certain = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert accept_sampled([1, 2], certain, g).tokens == [1, 2, 0]
    for _ in range(50):  # p(1) == 0 at row 0: always rejected, the residual is p itself
        v = accept_sampled([1, 2], torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), g)
        assert v.accepted == 0 and v.tokens[0] in (0, 2)


# A small Markov "model": P[prev] is the distribution of the next token, every entry >= 0.06.
V = 5


def _model(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(V, V, generator=g) ** 3 + 0.5  # uneven, so acceptance varies by token
    return p / p.sum(dim=1, keepdim=True)  # [V, V]


Q = _model(99)  # a drafter's own distribution


def _speculative_sequence(P: torch.Tensor, first: int, length: int, k: int, g: torch.Generator,
                          drafted: str) -> list[int]:
    """`length` tokens after `first`, drafted k at a time and verified by `accept_sampled`."""
    out = [first]
    while len(out) <= length:
        if drafted == "point":  # a deterministic drafter: always its favourite continuation
            draft = [(out[-1] + 1 + i) % V for i in range(k)]
            q = None
        else:  # a drafter with its own distribution Q, the draft sampled from it
            draft, prev = [], out[-1]
            for _ in range(k):
                prev = int(torch.multinomial(Q[prev], 1, generator=g))
                draft.append(prev)
            q = Q[[out[-1], *draft[:-1]]]  # [K, V]
        probs = P[[out[-1], *draft]]  # [K + 1, V]: row i follows draft[:i]
        out += accept_sampled(draft, probs, g, q).tokens
    return out[1:length + 1]


@pytest.mark.parametrize("drafted", ["point", "sampled"])
def test_speculative_sampling_keeps_the_model_distribution(drafted):
    P, first, draws = _model(1), 0, 2000
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V, V)
    for _ in range(draws):
        a, b = _speculative_sequence(P, first, 2, 3, g, drafted)
        counts[a, b] += 1

    def pvalue(model: torch.Tensor) -> float:
        expected = model[first][:, None] * model * draws  # [V, V]: p(a | first) p(b | a)
        return chisquare(counts.flatten().numpy(), expected.flatten().numpy()).pvalue

    assert pvalue(P) > 0.01
    assert pvalue(_model(2)) < 0.01 and pvalue(Q) < 0.01  # the test tells another model apart


def test_a_draft_the_model_likes_is_mostly_accepted():
    P = torch.full((V, V), 0.01)
    for i in range(V):
        P[i, (i + 1) % V] = 1 - 0.01 * (V - 1)  # the point drafter's favourite, p = 0.96
    g = torch.Generator().manual_seed(5)
    accepted = sum(accept_sampled([1, 2, 3], P[[0, 1, 2, 3]], g).accepted for _ in range(500))
    assert abs(accepted / 500 - (0.96 + 0.96 ** 2 + 0.96 ** 3)) < 0.15  # the expected accepted length
