"""Demo evaluation helpers: well-formed answers, structured test prompts, the report's arithmetic."""
from __future__ import annotations

import pytest

from apar.data.pipeline import TreeRecord
from apar.data.rules import build_tree
from apar.split import is_test_instruction
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
