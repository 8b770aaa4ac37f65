"""Which drafted tokens enter a step: those that pay for their rows (docs/design.md, "Speculation").

A drafted token costs a row of the step, and saves a step of its thread only if the model agrees with it
and with every draft token before it. Whether that pays depends on the device and the batch. On a GPU a
decode step's time hardly moves with a few more rows. On a CPU a one-row step runs a matrix-vector
product, cheaper than the matrix product of two rows; from a few rows to about a dozen the weights' read
dominates and rows are nearly free; past that every row costs its share of the arithmetic, so at
concurrency 16 a draft is rarely worth its row (docs/benchmarks.md, "Speculation that pays").

So the engine learns both sides as it runs:
- `StepCost`: what its own steps cost, by the step's rows (a moving average of the step's wall time per
  bucket of row counts). A bucket not seen yet is assumed to cost what the nearest smaller one does:
  the engine tries it once, then knows.
- `DraftOdds`: how likely a draft token is to be kept. Each token comes with the drafter's own score
  (medusa: the product of its heads' probabilities up to it; ngram: 1); the odds of position j are that
  score times the kept share, per unit of score, of the position's past tokens (their decayed counts).

`choose` takes draft tokens in order of their odds (a thread's in its own order, since each is kept only
after those before it) as long as the step's expected tokens per second still grow: the step's rows
each give a token, a draft token its odds, and the step costs `StepCost` of its rows.

The drafter's own work (a by-thread drafter's chain: the eagle layer's passes, the hydra heads) runs after
every step whatever the next step takes, so `choose` cannot weigh it. `DraftGate` does: after each step
that drafted it notes the gain it expected from drafting, the step's expected tokens per second with its
drafts over those of a step of its base rows without the drafter's work, and after `GATE_WINDOW` such
steps whose gains average below 1 it pauses the drafter's guesses for `PAUSE_STEPS` steps (the threads'
states still go into a drafter that keeps them, so its guesses resume where they would be), then drafts
again to look afresh; each further window in a row that does not pay doubles the pause, up to
`MAX_PAUSE_STEPS`. So on a machine where drafting does not pay even its chain, speculation costs a probe
of a few steps in hundreds instead of a tenth of every step.

The choice depends on timing, so it applies to greedy threads (whose answers never depend on their
drafts) and to sampled ones without a seed; a thread sampled with a seed drafts as without this policy,
so that its seed repeats its answer.
"""
from __future__ import annotations

import math
from typing import Sequence

# buckets of row counts: each count up to 8, then powers of two (a step of 9-16 rows shares one)
_EXACT = 8
# weight of a new step's time in its bucket's average; a bucket's first time is taken as it is
_COST_ALPHA = 0.2
# kept share of a draft position's past tokens: counts decay by this per verified token, so they follow
# the answers being written; a new position starts from the prior below (as if `_PRIOR` tokens held)
_ODDS_DECAY = 0.995
_PRIOR = 4.0
# `DraftGate`: steps that drafted whose expected gains decide together; steps then without the drafter,
# doubled after each window in a row that did not pay, up to the most
GATE_WINDOW = 8
PAUSE_STEPS = 32
MAX_PAUSE_STEPS = 1024


def bucket(rows: int) -> int:
    return rows if rows <= _EXACT else 1 << math.ceil(math.log2(rows))


class StepCost:
    """Seconds a step takes by its rows (the module's docstring)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}  # bucket -> moving average

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or seconds <= 0:
            return
        b = bucket(rows)
        old = self.seconds.get(b)
        self.seconds[b] = seconds if old is None else old + _COST_ALPHA * (seconds - old)

    def of(self, rows: int) -> float | None:
        """The expected seconds of a step of `rows` rows: its bucket's average, else the nearest smaller
        bucket's (a bucket not seen yet is tried), else None (nothing seen yet)."""
        b = bucket(rows)
        if b in self.seconds:
            return self.seconds[b]
        smaller = [k for k in self.seconds if k < b]
        return self.seconds[max(smaller)] if smaller else None


class DraftOdds:
    """The odds that a draft token is kept, by its position in the draft (the module's docstring)."""

    def __init__(self, positions: int) -> None:
        self.kept = [_PRIOR] * positions  # decayed count of kept tokens, per position
        self.score = [_PRIOR] * positions  # decayed sum of the drafter's scores of drafted ones

    def odds(self, scores: Sequence[float]) -> list[float]:
        """Per draft token (scores in draft order), the odds it is kept, never above the one before."""
        out, last = [], 1.0
        for j, s in enumerate(scores):
            last = min(last, s * self.kept[j] / self.score[j], 1.0)
            out.append(last)
        return out

    def observe(self, scores: Sequence[float], kept: int) -> None:
        """A verified draft: the drafter's scores of its tokens, and how many of them were kept."""
        for j, s in enumerate(scores):
            self.kept[j] = self.kept[j] * _ODDS_DECAY + (1.0 if j < kept else 0.0)
            self.score[j] = self.score[j] * _ODDS_DECAY + s


def choose(base_rows: int, odds: Sequence[Sequence[float]], cost: StepCost) -> list[int]:
    """How many of each thread's draft tokens to take (odds[i]: thread i's, non-increasing) into a step of
    `base_rows` rows without them, where each row gives one token: the count that gives the most
    expected tokens per second, taking tokens in order of their odds. With nothing known of the step's
    cost, every token is taken."""
    take = [0] * len(odds)
    if base_rows <= 0 or cost.of(base_rows) is None:
        return [len(o) for o in odds]
    order = sorted(((p, i, j) for i, o in enumerate(odds) for j, p in enumerate(o)), key=lambda x: (-x[0], x[2]))
    best, best_n, tokens = base_rows / cost.of(base_rows), 0, float(base_rows)
    for n, (p, _, _) in enumerate(order, start=1):
        tokens += p
        rate = tokens / cost.of(base_rows + n)
        if rate > best:
            best, best_n = rate, n
    for _, i, j in order[:best_n]:
        take[i] = max(take[i], j + 1)
    return take


class DraftGate:
    """Whether the drafter guesses after this step (the module's docstring)."""

    def __init__(self) -> None:
        self.work: float | None = None  # moving average of the drafter's seconds a step
        self.plain = StepCost()  # what steps cost without the drafter's work, by rows (from paused steps)
        self.gains: list[float] = []  # the current window's
        self.pause = 0  # steps left without the drafter's guesses
        self.next_pause = PAUSE_STEPS  # the pause after a window that does not pay
        self.paused_steps = 0  # in all
        self.guessed = True  # whether the drafter guessed after the last step (its guesses are this step's)

    def observe_work(self, seconds: float) -> None:
        """The drafter's work after a step took this long."""
        self.work = seconds if self.work is None else self.work + _COST_ALPHA * (seconds - self.work)

    def observe_step(self, base_rows: int, tokens: float, cost: StepCost, rows: int) -> None:
        """A step of `base_rows` rows that took draft tokens up to `rows` rows, expecting `tokens` tokens
        (a row each, a draft token its odds); `cost` its costs by rows, the drafter's work included."""
        with_drafts, base = cost.of(rows), cost.of(base_rows)
        if not self.guessed or not base_rows or with_drafts is None or base is None or self.work is None:
            return  # (a step after a paused one has no guesses to judge)
        plain = self.plain.of(base_rows)
        plain = plain if plain is not None else max(base - self.work, 0.1 * base)
        self.gains.append((tokens / with_drafts) / (base_rows / plain))
        if len(self.gains) >= GATE_WINDOW:
            if sum(self.gains) < len(self.gains):
                self.pause, self.next_pause = self.next_pause, min(2 * self.next_pause, MAX_PAUSE_STEPS)
            else:
                self.next_pause = PAUSE_STEPS
            self.gains = []

    def guesses(self, must: bool = False) -> bool:
        """After this step: True when the drafter guesses, False during a pause (counted); `must`: it
        guesses whatever the pause (which then waits)."""
        self.guessed = must or self.pause <= 0
        if not self.guessed:
            self.pause -= 1
            self.paused_steps += 1
        return self.guessed
