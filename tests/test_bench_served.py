"""`apar bench served`: two real `apar serve` processes, an APAR model beside its AR twin (here the same
tiny random model), closed loop per level; the report's arithmetic comes from the answers it got."""
from __future__ import annotations

from apar.bench_suite.served import run


def test_served_bench_runs_both_servers_per_level(llama_dir):
    prompts = ["Give three tips.", "Name two colours.", "Say hello."]
    result = run(llama_dir, llama_dir, prompts, [1, 2], max_tokens=8, requests_per_level=3)
    levels = result["levels"]
    assert [(x["model"], x["concurrency"]) for x in levels] == [("apar", 1), ("ar", 1), ("apar", 2), ("ar", 2)]
    for x in levels:
        assert x["requests"] == 3 and x["answer_tokens"] > 0 and x["wall_s"] > 0
        assert x["tokens_per_s"] == x["answer_tokens"] / x["wall_s"]
        assert x["preemptions"] == 0 and x["recomputed_tokens"] == 0  # the default pool has room for all
    ar = [x for x in levels if x["model"] == "ar"]
    assert all(x["threads_mean"] == 1.0 for x in ar)  # the twin's requests never fork
    for r, c in zip(result["ratios"], (1, 2)):
        a, b = (next(x for x in levels if x["model"] == m and x["concurrency"] == c) for m in ("apar", "ar"))
        assert r["concurrency"] == c and r["tokens_per_s_ratio"] == a["tokens_per_s"] / b["tokens_per_s"]


def test_served_bench_counts_the_preemptions_of_a_crowded_pool(llama_dir):
    """A pool of 12 blocks of 4 tokens cannot hold three 40-token answers at once: the level says how many
    requests the server preempted (from its metrics); with the default pool, the test above reads none.
    Twelve requests, three at a time: with only three, the first could end before a slow client sent the
    next (it did on a loaded machine), and nothing had to be preempted."""
    prompts = ["Give three tips for a long walk.", "Name two colours of the sea.", "Say hello to everyone."]
    crowded = run(llama_dir, llama_dir, prompts, [3], max_tokens=40, requests_per_level=12,
                  serve_args=["--block-size", "4", "--kv-blocks", "12"])
    for x in crowded["levels"]:
        assert x["preemptions"] > 0 and x["recomputed_tokens"] > 0, x
    assert crowded["settings"]["serve_args"] == ["--block-size", "4", "--kv-blocks", "12"]
