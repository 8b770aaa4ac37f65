"""`apar bench chaos`: a whole cluster on loopback under a storm of requests, each component killed with
SIGKILL in turn and restarted, and a verdict on what it left behind.

The cluster: its own redis-server (append-only), a KV manager, `--workers` workers and `--routers`
routers (a random-weight model unless `--model`), every internal call authenticated with a cluster token
read from a file. The storm, `--concurrency` clients at once over gRPC and HTTP: streams, whole answers,
clients that cancel after a few messages, deadlines of 10-500 ms, HTTP clients that disconnect mid-stream,
`n` > 1, stop strings, prompts that share a long system prompt. A call refused or broken by a dead router
or worker is retried on the next router, as a client behind a Service would. Kills: each component kind
in turn (router, worker, KV manager, Redis), `--rounds` times, spread over the run, in that order or in
a seeded random order (`--schedule random --seed N`); each killed process is restarted on its own port.

The verdict (`--json` prints it as JSON): requests by outcome, each a documented status; blocks in use
per worker once idle (0); each KV manager replica equal to its worker's ledger (`Digest`, contents hash
included); the ledgers Redis holds equal to the replicas, and the KV manager restarted at the end from
Redis alone equal to them too; resident memory of each process at its start, after warm-up and at the
end; log lines per component, tracebacks among them. The exit code is 1 when anything is wrong.
"""

from apar.bench_suite.chaos.cli import main, register, run_chaos_cmd
from apar.bench_suite.chaos.run import run_chaos
from apar.bench_suite.chaos.storm import DOCUMENTED
from apar.bench_suite.chaos.verdict import failures, render

__all__ = ["DOCUMENTED", "failures", "main", "register", "render", "run_chaos", "run_chaos_cmd"]
