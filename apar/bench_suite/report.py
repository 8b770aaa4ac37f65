"""What a benchmark run hands back: `Run`s (one per pool setting), their ratios, the JSON, plot and tables.

Every ratio is oriented so that above 1 means the new side is better: throughput new/base, latency,
steps and KV blocks base/new. Both sides come from the same run.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from apar.bench import text_table
from apar.bench_suite.driver import ModeRun

_HIGHER_BETTER = ("tokens_per_s", "requests_per_s")
_LOWER_BETTER = ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "steps_per_request", "peak_kv_blocks")


@dataclass(slots=True)
class Run:
    """The modes measured under one setting (a pool size), `new` beside `base`."""

    name: str  # "unlimited", "limited" (the pool settings), or what ran: "trace", "hf"
    kv_blocks: int  # the engine's pool
    base: str  # the baseline's mode name ("ar", or "hf")
    new: str  # the mode compared with it ("apar", or "ar")
    modes: dict[str, ModeRun]
    limited: bool = False  # the pool set below what the baseline needs

    @property
    def title(self) -> str:
        pool = "limited" if self.limited else "unlimited"
        head = f"{self.name} pool" if self.name == pool else f"{self.name}, {pool} pool"
        return f"{head} ({self.kv_blocks} KV blocks)"

    def level_ratios(self) -> list[dict]:
        base, new = self.modes[self.base], self.modes[self.new]
        out = []
        for b, n in zip(base.levels, new.levels):
            out.append({"concurrency": b.concurrency, **ratios(b.summary(), n.summary())})
        return out

    def total_ratios(self) -> dict:
        return ratios(self.modes[self.base].totals(), self.modes[self.new].totals())

    def to_json(self) -> dict:
        return {
            "name": self.name, "pool": "limited" if self.limited else "unlimited", "kv_blocks": self.kv_blocks,
            "modes": {name: {"label": m.label, "totals": m.totals(), "levels": [x.summary() for x in m.levels]}
                      for name, m in self.modes.items()},
            "ratios": {"of": self.new, "over": self.base, "levels": self.level_ratios(),
                       "totals": self.total_ratios()},
        }


def ratios(base: dict, new: dict) -> dict:
    """Ratios > 1 when `new` is better; None where a side is 0 or missing."""
    out = {}
    for key in _HIGHER_BETTER + _LOWER_BETTER:
        if key not in base or key not in new:
            continue
        num, den = (new[key], base[key]) if key in _HIGHER_BETTER else (base[key], new[key])
        out[key] = num / den if num and den else None
    return out


@dataclass(slots=True)
class Report:
    workload: str  # "trace", "live", "hf", "gpu"
    settings: dict  # what defines the run (model, levels, requests): written into the JSON as given
    runs: list[Run]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> dict:
        return {"workload": self.workload, "created": self.created, "settings": self.settings,
                "ratio_note": "every ratio > 1 means `of` is better than `over`: throughput of/over; "
                              "latency, steps per request and KV blocks over/of",
                "runs": [r.to_json() for r in self.runs]}

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, png_path = out / f"{self.workload}.json", out / f"{self.workload}.png"
        json_path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        plot(self, png_path)
        return json_path, png_path

    def text(self) -> str:
        return "\n\n".join(run_text(r) for r in self.runs)


_COLUMNS = (("C", "concurrency", "d"), ("requests", "requests", "d"), ("tokens", "tokens", "d"),
            ("tok/s", "tokens_per_s", ".1f"), ("req/s", "requests_per_s", ".2f"), ("p50 s", "latency_p50_s", ".2f"),
            ("p99 s", "latency_p99_s", ".2f"), ("TTFT p50 s", "ttft_p50_s", ".3f"), ("running", "running_mean", ".1f"),
            ("steps/req", "steps_per_request", ".1f"), ("peak KV", "peak_kv_blocks", "d"),
            ("preempt", "preemptions", "d"))
_RATIO_COLUMNS = (("tok/s", "tokens_per_s"), ("req/s", "requests_per_s"), ("p50 latency", "latency_p50_s"),
                  ("TTFT p50", "ttft_p50_s"), ("steps/req", "steps_per_request"), ("peak KV", "peak_kv_blocks"))


def run_text(run: Run) -> str:
    """The run's levels per mode, then the ratios per level and one line on the totals."""
    rows = []
    for m in run.modes.values():
        for x in m.levels:
            s = x.summary()
            rows.append([m.label] + [format(s[k], f) for _, k, f in _COLUMNS])
    levels = text_table(["mode"] + [h for h, _, _ in _COLUMNS], rows)
    base, new = run.modes[run.base], run.modes[run.new]
    ratio_rows = [[str(r["concurrency"])] + [_x(r.get(k)) for _, k in _RATIO_COLUMNS] for r in run.level_ratios()]
    ratio_table = text_table(["C"] + [h for h, _ in _RATIO_COLUMNS], ratio_rows)
    t = run.total_ratios()
    note = (f"{run.title}: steps per request {base.label}/{new.label} {_x(t.get('steps_per_request'))}, "
            f"peak KV {base.label}/{new.label} {_x(t.get('peak_kv_blocks'))}, "
            f"tokens/s {new.label}/{base.label} over all levels {_x(t.get('tokens_per_s'))}")
    if run.new == "apar":
        note += f", {new.label} answers that forked {new.totals()['forked_share']:.0%}"
    return (f"== {run.title}\n{levels}\n\n{new.label} against {base.label} per level (>1: {new.label} better; "
            f"throughput {new.label}/{base.label}, the rest {base.label}/{new.label})\n{ratio_table}\n{note}")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def plot(report: Report, path: Path) -> None:
    """Tokens/s and p50 latency against concurrency, one column per run, a line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.runs)
    fig, axes = plt.subplots(2, n, figsize=(5 * n, 7), squeeze=False)
    for j, run in enumerate(report.runs):
        top, bottom = axes[0][j], axes[1][j]
        for m in run.modes.values():
            xs = [x.concurrency for x in m.levels]
            top.plot(xs, [x.tokens_per_s for x in m.levels], marker="o", label=m.label)
            bottom.plot(xs, [x.summary()["latency_p50_s"] for x in m.levels], marker="o", label=m.label)
        top.set_title(run.title)
        top.set_ylabel("generated tokens/s")
        bottom.set_ylabel("p50 latency per request (s)")
        bottom.set_xlabel("concurrency (requests in flight; batch size for HF)")
        levels = sorted({x.concurrency for m in run.modes.values() for x in m.levels})
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(f"apar bench {report.workload}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
