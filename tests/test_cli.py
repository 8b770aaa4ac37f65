"""The `apar` command as a user runs it: real processes, output on stdout, one-line errors."""
import json
import subprocess
import sys

import pytest


def apar(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "apar.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_streams_linear_text_and_json_agrees(llama_dir):
    common = ["generate", "--model", llama_dir, "--prompt", "Name three colours.", "--max-tokens", 24,
              "--kv-blocks", 64]
    linear = apar(*common)
    assert linear.returncode == 0, linear.stderr
    final = apar(*common, "--json")
    assert final.returncode == 0, final.stderr
    out = json.loads(final.stdout)
    assert out["finish_reason"] in ("stop", "length")
    assert linear.stdout == out["text"] + "\n"
    assert out["usage"]["prompt_tokens"] > 0 and 0 < out["usage"]["completion_tokens"] <= 24
    assert set(out["usage"]) >= {"steps", "threads", "peak_kv_blocks", "attended_tokens"}
    assert "Loading" not in final.stderr
    threads = apar(*common, "--stream", "threads")
    lines = [json.loads(x) for x in threads.stdout.splitlines()]
    assert lines[0]["kind"] == "started" and lines[-1]["final"] == out["text"]


@pytest.mark.parametrize("args, words", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["--prompt", "x", "--max-tokens", "0"], "max_tokens must be > 0"),
    (["--prompt", "x", "--fork-token", "[SplitMask]"], "control token '[SplitMask]' is not in"),
    (["--prompt", "x", "--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0"),
    (["--prompt", "x", "--frequency-penalty", "2.5"], "frequency_penalty must be a number in [-2, 2]"),
    (["--prompt", "x", "--presence-penalty", "-3"], "presence_penalty must be a number in [-2, 2]"),
])
def test_errors_are_one_line(llama_dir, args, words):
    r = apar("generate", "--model", llama_dir, *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and words in r.stderr and "Traceback" not in r.stderr


def test_missing_model_directory(tmp_path):
    r = apar("generate", "--model", tmp_path / "nope", "--prompt", "hi")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_client_against_serve_prints_what_in_process_prints(llama_dir, tmp_path):
    from tests.procs import Proc, free_port

    port = free_port()
    proc = Proc("serve", "--model", str(llama_dir), "--port", str(port), "--kv-blocks", "64")
    try:
        common = ["--prompt", "Name three colours.", "--max-tokens", 16, "--temperature", 0.8, "--seed", 4]
        remote = apar("generate", "--server", f"127.0.0.1:{port}", *common)  # waits while the server starts
        local = apar("generate", "--model", llama_dir, "--kv-blocks", 64, *common)
        assert remote.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout
        remote_json = json.loads(apar("generate", "--server", f"127.0.0.1:{port}", *common, "--json").stdout)
        local_json = json.loads(apar("generate", "--model", llama_dir, "--kv-blocks", 64, *common, "--json").stdout)
        assert remote_json == local_json
        bad = apar("generate", "--server", f"127.0.0.1:{port}", "--prompt", "hi", "--max-threads", "0")
        assert bad.returncode == 2 and "max_threads" in bad.stderr
    finally:
        proc.stop()
    gone = apar("generate", "--server", f"127.0.0.1:{port}", "--prompt", "hi", "--connect-timeout", "0.5")
    assert gone.returncode == 2 and "server unavailable" in gone.stderr


def test_engine_flags_leave_compiling_to_the_device_unless_given():
    """Without --compile or --no-compile the engine decides (on with CUDA, off on the CPU); either flag is
    passed on as it is."""
    import argparse

    from apar.commands.generate import add_engine_args, engine_config

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config(p.parse_args([])).compile is None
    assert engine_config(p.parse_args(["--compile"])).compile is True
    assert engine_config(p.parse_args(["--no-compile"])).compile is False
