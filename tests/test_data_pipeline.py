"""Readers, tree files and the `apar data` commands: formats, clear errors, never a broken tree file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from apar.cli import main
from apar.data.pipeline import approx_tokens, read_trees, tree_record, write_trees
from apar.data.readers import Conversation, read_conversations
from apar.data.tree import restore
from apar.engine.errors import UserError
from apar.data.readers import data_files
from apar.data.alpaca_split import data_dir

LIST_ANSWER = "Tips:\n1. Sleep: early.\n2. Eat: greens.\n3. Walk: daily.\n\nThat is all."
STATS_KEYS = {"records", "forkable", "threads_mean", "depth_max", "step_bound", "restore_mismatches"}


def write_alpaca(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_both_formats_and_directories(tmp_path):
    write_alpaca(tmp_path / "a.json", [{"instruction": "Tips?", "output": LIST_ANSWER, "generator": "x"}])
    write_jsonl(tmp_path / "b.jsonl", [json.dumps({"prompt": "Hi", "response": "Hello."}), ""])
    convs = read_conversations(tmp_path)
    assert convs == [
        Conversation("Tips?", LIST_ANSWER, f"{tmp_path / 'a.json'}#0"),
        Conversation("Hi", "Hello.", f"{tmp_path / 'b.jsonl'}:1"),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"instruction": "a", "output": "b"},', "a.json: not valid JSON"),
        ('{"instruction": "a"}', "a.json: expected a JSON list"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "a.json: record 1: missing 'output'"),
        ('[{"instruction": "a", "output": "  \\n"}]', "a.json: record 0: empty response"),
        ('[{"instruction": "a", "output": 3}]', "record 0: 'output' must be a string"),
        ('[["a", "b"]]', "record 0: expected a JSON object"),
        ('[{"question": "a", "answer": "b"}]', "record 0: missing 'prompt'/'response'"),
    ],
)
def test_bad_alpaca_files_name_the_file_and_record(tmp_path, content, message):
    (tmp_path / "a.json").write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_conversations(tmp_path / "a.json")


def test_bad_jsonl_line_is_named(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"prompt": "a", "response": "b"}), "{oops"])
    with pytest.raises(UserError, match=r"c.jsonl: line 2: not valid JSON"):
        read_conversations(path)


def test_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_conversations(tmp_path / "nope.json")
    with pytest.raises(UserError, match="holds no .json, .jsonl, .json.xz or .jsonl.xz files"):
        read_conversations(tmp_path)


def test_control_token_in_text_is_refused():
    with pytest.raises(UserError, match=r"f.json#4: .*control token '\[Fork\]'"):
        tree_record(Conversation("q", "1. A: x [Fork] y", "f.json#4"))


def test_tree_file_round_trip(tmp_path):
    record = tree_record(Conversation("Tips?", LIST_ANSWER, "a.json#0"))
    assert record.tree.num_threads == 4
    out = tmp_path / "t.jsonl"
    assert write_trees([record, record], out) == 2
    back = read_trees(out)
    assert [r.response for r in back] == [LIST_ANSWER, LIST_ANSWER]
    assert back[0].tree == record.tree and back[0].source == "a.json#0"
    assert not (tmp_path / "t.jsonl.tmp").exists()


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ([{"fork": ["x"]}, "a"], "line 1: unbalanced tree: root: a thread must start with text"),
        (["a", {"fork": [" "]}], "line 1: unbalanced tree: root.fork1: a child thread with no visible text"),
        (["a", {"fork": ["x"]}, {"fork": ["y"]}], "two forks with no text"),
        (["a", {"fork": 3}], "must be a JSON list"),
    ],
)
def test_unbalanced_tree_files_are_refused(tmp_path, tree, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"prompt": "q", "tree": tree})])
    with pytest.raises(UserError, match=message):
        read_trees(path)


def test_approx_tokens():
    assert approx_tokens("Hello, world!\n\nBye") == 6  # Hello , world ! \n\n Bye


def test_cli_trees_and_stats(tmp_path, capsys):
    src = write_alpaca(tmp_path / "a.json", [
        {"instruction": "Tips?", "output": LIST_ANSWER},
        {"instruction": "Hi", "output": "Hello there."},
    ])
    out = tmp_path / "trees.jsonl"
    assert main(["data", "trees", str(src), "--out", str(out)]) == 0
    assert "wrote 2 trees (1 forked)" in capsys.readouterr().out
    assert [r.response for r in read_trees(out)] == [LIST_ANSWER, "Hello there."]

    for path in (src, out):  # conversations or the tree file give the same figures
        assert main(["data", "stats", str(path), "--json"]) == 0
        stats = json.loads(capsys.readouterr().out)
        assert set(stats) == STATS_KEYS
        assert stats["records"] == 2 and stats["forkable"] == 0.5 and stats["threads_mean"] == 2.5
        assert stats["depth_max"] == 1 and stats["restore_mismatches"] == 0
        assert 0.5 < stats["step_bound"] < 1.0


def test_cli_never_writes_a_tree_file_from_bad_input(tmp_path, capsys):
    src = write_alpaca(tmp_path / "a.json", [
        {"instruction": "Tips?", "output": LIST_ANSWER},
        {"instruction": "Bad", "output": ""},
    ])
    out = tmp_path / "trees.jsonl"
    assert main(["data", "trees", str(src), "--out", str(out)]) == 2
    assert "record 1: empty response" in capsys.readouterr().err
    assert not out.exists()


def test_cli_stats_over_the_alpaca_eval_data(capsys):
    files = data_files(data_dir())
    assert files and all(f.name.endswith(".json.xz") for f in files)
    assert main(["data", "stats", str(files[0]), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 805 and stats["restore_mismatches"] == 0
    assert stats["forkable"] > 0.3 and stats["step_bound"] < 0.9


def test_restore_of_written_records_matches_input(tmp_path):
    text = "Para one. More here.\n\nPara two. More.\n\nPara three. Yes."
    record = tree_record(Conversation("p", text, "x"))
    assert restore(record.tree) == text and record.tree.num_threads == 4
