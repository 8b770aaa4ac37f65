"""The AlpacaEval data kept in the repository: complete, readable, found from a bare copy of the repository."""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apar.cli import main
from apar.data.readers import data_files, read_conversations, read_text
from apar.engine.errors import UserError
from apar.data.alpaca_split import DATA_ENV, REPO_DATA, data_dir, is_test_instruction
from tests.procs import require

ROOT = Path(__file__).resolve().parent.parent
MODELS = 16
INSTRUCTIONS = 805


def test_repo_copy_is_complete():
    assert REPO_DATA == ROOT / "data" / "alpaca_eval"
    files = sorted(REPO_DATA.glob("*.json.xz"))
    assert len(files) == MODELS and data_files(REPO_DATA) == files
    sums = dict(line.split()[::-1] for line in (REPO_DATA / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == [f.name.removesuffix(".xz") for f in files]
    assert (REPO_DATA / "README.md").is_file()
    instruction_sets = []
    for path in files:
        raw = lzma.decompress(path.read_bytes())
        assert hashlib.sha256(raw).hexdigest() == sums[path.name.removesuffix(".xz")], path.name
        records = json.loads(raw)
        assert isinstance(records, list) and len(records) == INSTRUCTIONS, path.name
        for record in records:
            assert all(isinstance(record[k], str) for k in ("instruction", "output", "generator")), path.name
        assert {r["generator"] for r in records} == {path.name.removesuffix(".json.xz")}
        instructions = {r["instruction"] for r in records}
        assert len(instructions) == INSTRUCTIONS, path.name
        instruction_sets.append(instructions)
    assert all(s == instruction_sets[0] for s in instruction_sets)  # the split by instruction holds across files
    assert sum(map(is_test_instruction, instruction_sets[0])) == 64


def test_data_dir_order_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert data_dir() == REPO_DATA
    env, explicit = tmp_path / "env", tmp_path / "explicit"
    for d in (env, explicit):
        d.mkdir()
        (d / "m.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    monkeypatch.setenv(DATA_ENV, str(env))
    assert data_dir() == env
    assert data_dir(explicit) == explicit
    with pytest.raises(UserError, match=r"missing: data folder not found \(--data\)"):
        data_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"empty: data folder holds no .* \(\$APAR_DATA\)"):
        data_dir()


def test_import_compresses_checks_and_reads_back(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    records = [{"instruction": f"Q{i}?", "output": "1. A: x\n2. B: y\n3. C: z", "generator": "m"} for i in range(5)]
    raw = json.dumps(records, indent=2).encode()
    (src / "m.json").write_bytes(raw)
    assert main(["data", "import", str(src), "--out", str(out)]) == 0
    assert "written" in capsys.readouterr().out
    assert lzma.decompress((out / "m.json.xz").read_bytes()) == raw
    assert (out / "SHA256SUMS").read_text() == f"{hashlib.sha256(raw).hexdigest()}  m.json\n"
    assert [c.prompt for c in read_conversations(out)] == [f"Q{i}?" for i in range(5)]
    assert main(["data", "import", str(src), "--out", str(out)]) == 0
    assert "unchanged" in capsys.readouterr().out

    (out / "t.jsonl.xz").write_bytes(lzma.compress(b'{"prompt": "p", "response": "r"}\n'))
    assert read_text(out / "t.jsonl.xz").startswith("{")
    assert [c.source for c in read_conversations(out)][-1].endswith("t.jsonl.xz:1")

    (src / "bad.json").write_text(json.dumps([{"instruction": "Q", "output": ""}]))
    fresh = tmp_path / "fresh"
    assert main(["data", "import", str(src), "--out", str(fresh)]) == 2
    assert "bad.json: record 0: empty response" in capsys.readouterr().err
    assert not fresh.exists()  # nothing written when any source is bad


def _repo_files() -> list[str]:
    require("git")
    done = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{ROOT} is not a git work tree: run the tests from a clone ({done.stderr.strip()})",
                    pytrace=False)
    return [name for name in done.stdout.split("\0") if name and (ROOT / name).is_file()]


def test_a_bare_copy_of_the_repository_finds_its_data(tmp_path):
    """Only the repository's own files (tracked, or untracked and not ignored), with nothing beside them:
    the data commands and the demo model's data step run there on the repository's copy of the data."""
    copy = tmp_path / "repo"
    for name in _repo_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no shared/ beside it
    env = {k: v for k, v in os.environ.items() if k not in (DATA_ENV, "PYTHONPATH")}
    env["PYTHONPATH"] = str(copy)

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    stats = json.loads(run("-m", "apar.cli", "data", "stats", "--json"))
    assert stats["records"] == MODELS * INSTRUCTIONS and stats["restore_mismatches"] == 0
    assert 0.5 < stats["forkable"] < 0.9 and stats["threads_mean"] > 1

    step = run("-c", """
import json
import apar
from apar.data.alpaca_split import data_dir, is_test_instruction
from apar.train.demo import PRESETS, prepare_data

preset = PRESETS["quick"]
records, tokenizer = prepare_data(preset)
train = [r for r in records if r.split == "train"]
print(json.dumps({
    "apar": apar.__file__, "data": str(data_dir()), "train": len(train), "held_out": len(records) - len(train),
    "test_in_train": sum(is_test_instruction(r.prompt) for r in train), "vocab": len(tokenizer),
    "fork_id": tokenizer.convert_tokens_to_ids("[Fork]"), "unk_id": tokenizer.unk_token_id,
}))
""")
    got = json.loads(step.strip().splitlines()[-1])
    assert Path(got["apar"]).is_relative_to(copy) and Path(got["data"]) == copy / "data" / "alpaca_eval"
    assert got["train"] > 9000 and got["held_out"] == 64 and got["test_in_train"] == 0
    assert got["vocab"] >= 2048 and got["fork_id"] != got["unk_id"]
