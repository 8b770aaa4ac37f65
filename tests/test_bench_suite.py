"""The trace benchmark's driver on a tiny random model: the JSON's keys, counts that add up, the plot; the prefix
benchmark's token counts."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from apar.bench import tree_tokens
from apar.bench_suite.driver import LevelPlan
from apar.bench_suite.workloads import SuiteSettings, run_trace, trace_jobs

LEVEL_KEYS = {"concurrency", "requests", "tokens", "steps", "wall_s", "tokens_per_s", "latency_p50_s",
              "latency_p99_s", "ttft_p50_s", "running_mean", "steps_per_request", "peak_kv_blocks",
              "attended_tokens", "preemptions"}
TOTAL_KEYS = {"requests", "tokens", "steps", "wall_s", "peak_kv_blocks", "attended_tokens", "preemptions",
              "steps_per_request"}


@pytest.fixture
def one_thread():
    """One torch thread, as the bench commands use on a CPU (two are several times slower on shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_trace_report_adds_up(llama_dir, tmp_path, one_thread):
    plan = LevelPlan(levels=(1, 2), rounds=1, min_requests=1)
    s = SuiteSettings(plan, progress=False)
    report = run_trace(llama_dir, s, answers=2, max_answer_tokens=250)
    json_path, png_path = report.write(tmp_path)

    data = json.loads(json_path.read_text())
    assert data["workload"] == "trace" and png_path.stat().st_size > 0
    assert [r["pool"] for r in data["runs"]] == ["unlimited", "limited"]
    unlimited, limited = data["runs"]
    assert limited["kv_blocks"] < unlimited["kv_blocks"]

    ar_jobs, apar_jobs = trace_jobs(llama_dir, s, 2, 250, 0)
    run_jobs = [list(itertools.islice(itertools.cycle(range(len(ar_jobs))), plan.requests(c))) for c in (1, 2)]
    ar_tokens = sum(len(ar_jobs[i].replay.tokens) for level in run_jobs for i in level)
    apar_tokens = sum(tree_tokens(apar_jobs[i].replay) for level in run_jobs for i in level)
    for run in data["runs"]:
        ar, apar = run["modes"]["ar"], run["modes"]["apar"]
        for mode in (ar, apar):
            assert TOTAL_KEYS <= set(mode["totals"])
            assert [x["concurrency"] for x in mode["levels"]] == [1, 2]
            for level in mode["levels"]:
                assert LEVEL_KEYS <= set(level)
            assert mode["totals"]["tokens"] == sum(x["tokens"] for x in mode["levels"])
            assert mode["totals"]["errors"] == 0
        assert ar["totals"]["requests"] == apar["totals"]["requests"] == sum(map(len, run_jobs))
        assert ar["totals"]["tokens"] == ar_tokens  # preemption keeps every token
        if apar["totals"]["forks_refused"] == 0:
            assert apar["totals"]["tokens"] == apar_tokens
        assert [r["concurrency"] for r in run["ratios"]["levels"]] == [1, 2]
    ar_u, apar_u = unlimited["modes"]["ar"]["totals"], unlimited["modes"]["apar"]["totals"]
    assert apar_u["tokens"] == apar_tokens and apar_u["forked_share"] == 1.0
    assert apar_u["steps_per_request"] < ar_u["steps_per_request"]  # the trees fork: fewer steps
    assert "APAR against AR per level" in report.text()


def test_prefix_bench_counts_the_cached_tokens(llama_dir, one_thread):
    from apar.bench_suite.prefix import PrefixBenchConfig, measure

    r = measure(llama_dir, PrefixBenchConfig(requests=6, concurrency=3, system_tokens=100, max_tokens=2))
    on, off = r["on"], r["off"]
    assert on["requests"] == off["requests"] == 6 and on["prompt_tokens"] == off["prompt_tokens"]
    assert off["cached_tokens"] == 0 and off["prefilled_tokens"] == off["prompt_tokens"]
    # the system prompt's 6 full blocks, at least for every request admitted after the first wave's prefill
    assert on["cached_tokens"] % 16 == 0 and on["cached_tokens"] >= 3 * 96
    assert on["prefilled_tokens"] == on["prompt_tokens"] - on["cached_tokens"]
    assert r["prefilled_ratio"] == on["prefilled_tokens"] / off["prefilled_tokens"]


@pytest.mark.parametrize("replay,shards", [(True, 2), (False, 1)])
def test_kvmanager_bench_applies_every_step_and_ends_with_equal_ledgers(replay, shards):
    """`apar bench kvmanager` on real manager processes and a scratch Redis, both ways of producing the steps
    (made live, or made first and replayed by the sender's rule; the replay over two shards): every step
    made is applied over real messages and Redis rounds (every worker's ledger equals its replica), and
    the replay counts each step due in the measured window once. Rates and lags are reported, not
    bounded: the figures are the command's."""
    from apar.bench_suite.kvmanager import KVBenchConfig, measure

    cfg = KVBenchConfig(workers=4, threads=8, steps_per_s=50, seconds=2, warmup_s=0.5, procs=1, blocks=256,
                        replay=replay, shards=shards)
    r = measure(cfg)
    assert r["ledgers_equal"] == 4 and r["resyncs"] == 0  # every step made was applied, none resynced
    made = r["made_steps_per_s"] * cfg.seconds
    if replay:  # the steps due inside the window by the schedule, each counted once whatever the load
        assert abs(made - cfg.workers * cfg.steps_per_s * cfg.seconds) <= cfg.workers, made
    assert made > 0 and r["steps_per_s"] > 0
    # several steps per message (a send at most every 25 ms, a step every 20 ms per worker), one Redis
    # transaction per round of messages at most, beside each shard's expiry check (once a second; the
    # counters are read a moment apart, so give it two)
    assert 0 < r["messages_per_s"] < r["made_steps_per_s"]
    assert 0 < r["redis_transactions_per_s"] <= r["messages_per_s"] + 2 * shards
    assert 0 < r["lag_p50_ms"] <= r["lag_p99_ms"] <= r["lag_max_ms"]
