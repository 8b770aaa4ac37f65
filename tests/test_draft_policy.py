"""The drafts that pay (apar/engine/draft_policy.py): a step takes draft tokens in order of their odds while
its expected tokens per second grow, from what its steps cost by rows and how often drafts held. The
engine tests fix the cost curve (the engine's own is learned from its steps' wall time) and check that
the policy changes only how many tokens are drafted: greedy answers stay those without drafts."""
from __future__ import annotations

import pytest

from apar.engine.config import SpeculativeConfig
from apar.engine.draft_policy import GATE_WINDOW, MAX_PAUSE_STEPS, PAUSE_STEPS, DraftGate, DraftOdds, StepCost, bucket, choose
from apar.engine.params import SamplingParams
from tests.test_engine_speculation import APAR, PROMPTS, engine, fork_string, run, same_answers  # noqa: F401


class FixedCost(StepCost):
    """A step of r rows costs base + per_row * r seconds, whatever the engine measures."""

    def __init__(self, base: float, per_row: float) -> None:
        super().__init__()
        self.base, self.per_row = base, per_row

    def observe(self, rows: int, seconds: float) -> None:
        pass

    def of(self, rows: int) -> float:
        return self.base + self.per_row * rows


def test_buckets_are_exact_to_eight_rows_then_powers_of_two():
    assert [bucket(r) for r in (1, 2, 8, 9, 16, 17, 64, 65)] == [1, 2, 8, 16, 16, 32, 64, 128]


def test_a_bucket_not_seen_costs_what_the_nearest_smaller_one_does():
    cost = StepCost()
    assert cost.of(3) is None
    cost.observe(2, 0.05)
    cost.observe(12, 0.09)
    assert cost.of(2) == 0.05 and cost.of(5) == 0.05 and cost.of(16) == 0.09 and cost.of(40) == 0.09
    assert cost.of(1) is None
    cost.observe(2, 0.10)  # a moving average: the new time moves it part of the way
    assert 0.05 < cost.of(2) < 0.10


def test_free_rows_take_every_token_and_dear_rows_only_likely_ones():
    odds = [[0.9, 0.6, 0.2], [0.5], []]
    assert choose(4, odds, FixedCost(1.0, 0.0)) == [3, 1, 0]
    # a row costs a tenth of a step of 4 (4 tokens a second): a token pays when its odds pass a tenth of
    # the rate with the tokens before it (about 0.46 here)
    assert choose(4, [[0.9, 0.6, 0.2], [0.4], []], FixedCost(0.6, 0.1)) == [2, 0, 0]
    assert choose(4, [[0.9, 0.6, 0.2], [0.5], []], FixedCost(0.6, 0.1)) == [2, 1, 0]
    # a row costs as much as a token earns on average: nothing pays
    assert choose(4, odds, FixedCost(0.0, 1.0)) == [0, 0, 0]
    # nothing known of the step's cost yet: every token (its time will be known after it)
    assert choose(4, odds, StepCost()) == [3, 1, 0]


def test_a_threads_tokens_are_taken_in_draft_order():
    # equal odds: a later token never comes before an earlier one of its thread
    assert choose(1, [[0.5, 0.5, 0.5]], FixedCost(1.0, 0.0)) == [3]
    taken = choose(2, [[0.7, 0.7], [0.7]], FixedCost(1.0, 0.05))
    assert taken[0] >= 1 and sum(taken) >= 2


def test_odds_follow_how_often_each_position_held():
    odds = DraftOdds(3)
    assert odds.odds([1.0, 1.0, 1.0]) == [1.0, 1.0, 1.0]  # the prior: trust the drafter's scores
    for _ in range(400):
        odds.observe([1.0, 1.0, 1.0], 1)  # the first token always holds, the second never
    first, second, third = odds.odds([1.0, 1.0, 1.0])
    assert first > 0.95 and second < 0.05 and third <= second
    # scores scale the odds: a token the drafter is less sure of has lower odds at the same position
    assert odds.odds([0.5])[0] < odds.odds([1.0])[0]


@pytest.mark.parametrize("dear", [False, True])
def test_the_policy_changes_how_much_is_drafted_never_the_greedy_answer(llama_dir, fork_string, dear):
    requests = [(p, APAR) for p in PROMPTS]
    plain = run(engine(llama_dir, fork_string), requests)
    every = engine(llama_dir, fork_string, SpeculativeConfig("ngram", 4, policy="all"))
    every_answers = run(every, requests)
    pays = engine(llama_dir, fork_string, SpeculativeConfig("ngram", 4, policy="pays"))
    pays.step_cost = FixedCost(0.0, 1.0) if dear else FixedCost(1.0, 0.0)
    pays_answers = run(pays, requests)
    same_answers(plain, every_answers)
    same_answers(plain, pays_answers)
    assert every.spec_draft_tokens > 50
    assert every.spec_skipped_tokens == 0
    if dear:  # a row costs what it earns: no draft pays, every drafted token is skipped
        assert pays.spec_draft_tokens == 0 and pays.spec_skipped_tokens > 50
    else:  # rows are free: every drafted token is taken, as with policy "all"
        assert pays.spec_draft_tokens == every.spec_draft_tokens and pays.spec_skipped_tokens == 0
        assert pays.spec_accepted_tokens == every.spec_accepted_tokens


def test_worker_metrics_count_the_skipped_draft_tokens(llama_dir, fork_string):
    from services.worker.metrics import WorkerMetrics

    eng = engine(llama_dir, fork_string, SpeculativeConfig("ngram", 4, policy="pays"))
    eng.step_cost = FixedCost(0.0, 1.0)  # no draft pays
    metrics = WorkerMetrics("m")
    eng.add_request(PROMPTS[0], SamplingParams(max_tokens=40, auto_parallel=False))
    while eng.has_work():
        metrics.on_step(eng, 0.01, eng.step())
    value = metrics.registry.get_sample_value("apar_spec_decode_num_skipped_tokens_total", {"model_name": "m"})
    assert value == eng.spec_skipped_tokens > 0 and eng.spec_draft_tokens == 0


def test_a_thread_sampled_with_a_seed_drafts_every_token(llama_dir, fork_string):
    """Its answer depends on its drafts (the acceptance rule draws from its generator), so the policy,
    which depends on timing, leaves it alone: the seed repeats the answer."""
    seeded = SamplingParams(max_tokens=60, temperature=0.8, seed=7)
    answers = []
    for _ in range(2):
        eng = engine(llama_dir, fork_string, SpeculativeConfig("ngram", 4, policy="pays"))
        eng.step_cost = FixedCost(0.0, 1.0)  # no draft pays
        answers.append(run(eng, [(PROMPTS[1], seeded)]))
        assert eng.spec_draft_tokens > 0
    same_answers(*answers)


def test_the_gate_pauses_a_drafter_whose_work_does_not_pay_then_looks_again():
    gate, cost = DraftGate(), FixedCost(0.05, 0.001)  # a step of r rows: 50 ms + 1 ms a row
    gate.observe_work(0.02)  # the drafter's work: 20 ms of every step
    for _ in range(GATE_WINDOW - 1):  # 4 threads, 2 tokens drafted, 0.3 expected to hold: 4.3 tokens in
        gate.observe_step(4, 4.3, cost, 6)  # 56 ms against 4 tokens in 34 ms without the drafter
        assert gate.guesses()  # a window decides, not one step
    gate.observe_step(4, 4.3, cost, 6)
    assert [gate.guesses() for _ in range(PAUSE_STEPS)] == [False] * PAUSE_STEPS
    gate.observe_step(4, 4.0, cost, 4)  # the step after a pause has no guesses: not judged
    assert gate.guesses() and gate.paused_steps == PAUSE_STEPS and gate.gains == []
    for _ in range(GATE_WINDOW):  # another window that does not pay: a pause twice as long
        gate.observe_step(4, 4.3, cost, 6)
    assert sum(not gate.guesses() for _ in range(4 * PAUSE_STEPS)) == 2 * PAUSE_STEPS
    for _ in range(GATE_WINDOW):  # drafts that hold: 4 threads, 8 tokens drafted, 7 expected
        gate.observe_step(4, 11.0, cost, 12)
        assert gate.guesses()
    assert gate.pause == 0 and gate.paused_steps == 3 * PAUSE_STEPS and gate.next_pause == PAUSE_STEPS
    for _ in range(12):  # windows that never pay: pauses double, up to the most
        for _ in range(GATE_WINDOW):
            gate.observe_step(4, 4.3, cost, 6)
        while not gate.guesses():
            pass
    assert gate.next_pause == MAX_PAUSE_STEPS
    cheap = DraftGate()  # measured steps without the drafter's work come first
    cheap.observe_work(0.001)
    cheap.plain.observe(4, 0.03)
    for _ in range(GATE_WINDOW):
        cheap.observe_step(4, 4.3, cost, 6)  # against 4 tokens in 30 ms measured: 4.3 in 56 ms loses
    assert not cheap.guesses()


@pytest.mark.parametrize("dear", [False, True])
def test_a_paused_drafter_changes_the_steps_never_the_greedy_answer(llama_dir, fork_string, tmp_path, dear):
    """The eagle layer (it keeps each thread's past) behind the gate: where no draft pays it is paused,
    still reading the threads' states; the answers are those without drafts."""
    import json

    import torch

    from apar.engine.eagle import EagleHeads
    from tests.test_engine_medusa import _with_heads

    hidden = json.loads((llama_dir / "config.json").read_text())["hidden_size"]
    torch.manual_seed(5)
    model_dir = _with_heads(llama_dir, tmp_path / "model", EagleHeads(hidden, 4, attn_heads=2))
    requests = [(p, APAR) for p in PROMPTS]
    plain = run(engine(model_dir, fork_string), requests)
    gated = engine(model_dir, fork_string, SpeculativeConfig("medusa", 4, policy="pays"))
    gated.drafter.min_confidence = 0.0  # a guess at every step
    gated.step_cost = FixedCost(0.0, 1.0) if dear else FixedCost(1.0, 0.0)
    answers = run(gated, requests)
    same_answers(plain, answers)
    if dear:  # no draft pays its row, so the drafter's work earns nothing: paused most of the time
        assert gated.draft_gate.paused_steps > gated.steps / 2 and gated.spec_draft_tokens == 0
    else:  # free rows: every guess is drafted and the drafter is never paused
        assert gated.draft_gate.paused_steps == 0 and gated.spec_draft_tokens > 50


def test_worker_metrics_count_the_steps_the_drafter_was_paused(llama_dir, fork_string, tmp_path):
    import json

    from apar.engine.eagle import EagleHeads
    from services.worker.metrics import WorkerMetrics
    from tests.test_engine_medusa import _with_heads

    hidden = json.loads((llama_dir / "config.json").read_text())["hidden_size"]
    eng = engine(_with_heads(llama_dir, tmp_path / "model", EagleHeads(hidden, 4, attn_heads=2)), fork_string,
                 SpeculativeConfig("medusa", 4, policy="pays"))
    eng.step_cost = FixedCost(0.0, 1.0)  # no draft pays, so neither does the drafter's work
    metrics = WorkerMetrics("m")
    eng.add_request(PROMPTS[0], SamplingParams(max_tokens=60, auto_parallel=False))
    while eng.has_work():
        metrics.on_step(eng, 0.01, eng.step())
    value = metrics.registry.get_sample_value("apar_spec_decode_paused_steps_total", {"model_name": "m"})
    assert value == eng.draft_gate.paused_steps > 0
