"""Paragraph trees: restoration over every AlpacaEval record, thread texts, JSON, structural checks."""
from __future__ import annotations

import json

import pytest

from apar.data.rules import build_tree
from apar.data.tree import (
    Fork,
    Node,
    ThreadText,
    TreeError,
    from_json,
    linear,
    longest_chain,
    restore,
    thread_texts,
    to_json,
    validate,
)
from apar.data.readers import data_files, read_text
from apar.data.alpaca_split import data_dir

# "Tips:\n1. A:" [Fork -> " x\n - p:" [Fork -> " deep"] ] "\n2. B:" [Fork -> " y"] "\nEnd."
NESTED = Node([
    "Tips:\n1. A:",
    Fork(Node([" x\n - p:", Fork(Node([" deep"]))])),
    "\n2. B:",
    Fork(Node([" y"])),
    "\nEnd.",
])


def test_every_alpaca_eval_record_restores_byte_for_byte():
    files = data_files(data_dir())
    assert len(files) == 16
    records = forked = 0
    for path in files:
        for index, record in enumerate(json.loads(read_text(path))):
            tree = build_tree(record["output"])
            assert restore(tree) == record["output"], f"{path.name}#{index}"
            validate(tree)
            records += 1
            forked += tree.num_threads > 1
    assert records >= 805
    # the data was chosen because most answers have parallel structure
    assert 0.5 < forked / records < 0.9


def test_restore_is_depth_first():
    assert restore(NESTED) == "Tips:\n1. A: x\n - p: deep\n2. B: y\nEnd."


def test_tree_shape_properties():
    assert NESTED.num_threads == 4
    assert NESTED.depth == 2
    assert linear("x").depth == 0 and linear("x").num_threads == 1
    assert NESTED.own_text == "Tips:\n1. A:\n2. B:\nEnd."


def test_thread_texts_insert_control_strings_in_pre_order():
    threads = thread_texts(NESTED)
    assert threads == [
        ThreadText(0, None, None, "Tips:\n1. A:[Fork]\n2. B:[Fork]\nEnd."),
        ThreadText(1, 0, 0, "[Child] x\n - p:[Fork]"),
        ThreadText(2, 1, 0, "[Child] deep"),
        ThreadText(3, 0, 1, "[Child] y"),
    ]


def test_thread_texts_with_other_control_strings():
    threads = thread_texts(NESTED, fork="[SplitMask]", child="[SplitSop]")
    assert threads[0].text == "Tips:\n1. A:[SplitMask]\n2. B:[SplitMask]\nEnd."
    assert threads[3].text == "[SplitSop] y"


def test_json_round_trip_keeps_the_tree():
    data = to_json(NESTED)
    assert data[1] == {"fork": [" x\n - p:", {"fork": [" deep"]}]}
    assert from_json(json.loads(json.dumps(data))) == NESTED


@pytest.mark.parametrize("bad", [{"parts": []}, ["a", {"child": ["x"]}], ["a", 3], "text"])
def test_from_json_rejects_other_shapes(bad):
    with pytest.raises(TreeError):
        from_json(bad)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (Node([Fork(Node(["x"])), "a"]), "must start with text"),
        (Node(["a", Fork(Node(["x"])), Fork(Node(["y"]))]), "two forks"),
        (Node(["a", Fork(Node(["  \n"]))]), "no visible text"),
        (Node(["a", Fork(Node(["x [Fork] y"]))]), "control token"),
        (Node(["a", ""]), "empty text part"),
        (Node([]), "must start with text"),
    ],
)
def test_validate_rejects_undecodable_trees(tree, message):
    with pytest.raises(TreeError, match=message):
        validate(tree)


def test_longest_chain_counts_forks_and_eos_but_not_child():
    words = lambda text: len(text.split())  # noqa: E731
    # root: "Tips: 1. A:"(3) [Fork](1) "2. B:"(2) [Fork](1) "End."(1) EOS(1) = 9 steps
    # child 1 starts after step 4: " x - p:"(3) [Fork](1) then grandchild " deep"(1)+EOS -> 4+4+2 = 10
    assert longest_chain(NESTED, words) == 10
    assert longest_chain(linear("a b c"), words) == 4
