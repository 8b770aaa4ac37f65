"""Demo evaluation helpers: well-formed answers, structured test prompts, the report's arithmetic."""
from __future__ import annotations

import pytest

from apar.data.pipeline import TreeRecord
from apar.data.rules import build_tree
from apar.data.alpaca_split import is_test_instruction
from apar.train.evaluate import Answer, held_out_prompts, lists_in_order, report, well_formed


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("1. a\n2. b\n3. c", True),
        ("1. a\n   1. x\n   2. y\n2. b\n   1. z", True),  # nested lists restart at 1
        ("Pros:\n1. a\n2. b\nCons:\n1. c\n2. d", True),  # a new list starts again at 1
        ("1. a\n3. b", False),
        ("1. a\n2. b\n2. c", False),
        ("no list at all", True),
    ],
)
def test_lists_in_order(text, ok):
    assert lists_in_order(text) is ok


def test_well_formed_refuses_control_strings():
    assert not well_formed("1. a:[Fork]")
    assert not well_formed("[Child] text")
    assert well_formed("1. A: x\n2. B: y")


def _record(prompt: str, response: str) -> TreeRecord:
    return TreeRecord("x", prompt, build_tree(response), "test" if is_test_instruction(prompt) else "train")


def test_held_out_prompts_vote_on_structure():
    test = [p for p in (f"Question {i}?" for i in range(60)) if is_test_instruction(p)][:2]
    lists = "1. A: x\n2. B: y\n3. C: z"
    records = [_record(test[0], lists), _record(test[0], lists), _record(test[0], "plain"),
               _record(test[1], "plain"), _record(test[1], lists), _record("Question 1?", lists)]
    assert not is_test_instruction("Question 1?")
    assert held_out_prompts(records) == [(test[0], True), (test[1], False)]  # a tie is not a majority


def test_report_ratios():
    prompts = [("p", True), ("q", False)]
    apar = [Answer("p", "1. A: x\n2. B: y", 10, 30, 3, "stop"), Answer("q", "text", 20, 20, 1, "stop")]
    ar = [Answer("p", "", 30, 30, 1, "stop"), Answer("q", "", 30, 30, 1, "stop")]
    r = report(prompts, apar, ar)
    assert r.forked_share == 0.5 and r.forked_share_structured == 1.0
    assert r.threads_mean == 2.0 and r.well_formed_share == 1.0
    assert r.step_ratio == 60 / 30 and r.apar_steps_mean == 15


def test_repeated_4grams_count_only_repeats():
    from apar.train.evaluate import repeated_4grams

    assert repeated_4grams("a b c d e f") == (0, 3)
    assert repeated_4grams("a b c d a b c d") == (1, 5)  # "a b c d" again; the rest are new
    assert repeated_4grams("a b c") == (0, 0)


def test_report_quality_and_speed_from_one_run():
    from apar.train.evaluate import markdown

    prompts = [("p", True), ("q", False), ("r", True)]
    apar = [Answer("p", "1. A: x\n2. B: y", 10, 30, 3, "stop", 1.0),
            Answer("q", "x y z w x y z w", 20, 20, 1, "length", 2.0),
            Answer("r", "one two", 5, 10, 2, "stop", 4.0)]
    ar = [Answer("p", "a b c d e", 30, 30, 1, "stop", 3.0), Answer("q", "a", 20, 20, 1, "stop", 4.0),
          Answer("r", "b", 10, 10, 1, "length", 8.0)]
    r = report(prompts, apar, ar)
    assert r.apar_eos_share == pytest.approx(2 / 3) and r.ar_eos_share == pytest.approx(2 / 3)
    assert r.apar_repeated_4gram_rate == pytest.approx(1 / 8)  # one repeat among 3 + 5 four-grams
    assert r.ar_repeated_4gram_rate == 0.0
    assert r.apar_tokens_per_s == 60 / 4.0 and r.ar_tokens_per_s == 60 / 8.0 and r.tokens_per_s_ratio == 2.0
    assert r.apar_p50_s == 2.0 and r.ar_p50_s == 4.0 and r.p50_speedup == 2.0
    assert r.threads_mean_structured == 2.5
    text = markdown({"prompts": 3, "step_ratio": 1.23456}, apar, ar, samples=2)
    assert "| step_ratio | 1.2346 |" in text
    assert text.count("**APAR**") == 2 and "> 1. A: x" in text  # the two answers with most threads
