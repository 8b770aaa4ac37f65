"""Does a trained APAR model fork, stay well-formed and save steps? Test-split prompts through the engine.

Data flow: the test split's instructions (never trained on) -> `structured` marks the ones whose
reference answers mostly fork (lists, multi-paragraph) -> each model answers every prompt on the
engine (`apar.engine.engine`), all requests batched together: the APAR model in APAR mode, its AR
twin in AR mode -> per-answer usage (steps, threads, forks) and text checks -> `Report`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from apar.data.pipeline import TreeRecord
from apar.data.tree import CHILD, FORK

_NUMBERED = re.compile(r"^([ \t]*)(\d{1,3})[.)][ \t]", re.M)


@dataclass(frozen=True, slots=True)
class Answer:
    prompt: str
    text: str
    steps: int
    tokens: int
    threads: int
    finish_reason: str


def held_out_prompts(records: list[TreeRecord]) -> list[tuple[str, bool]]:
    """Test-split prompts in first-seen order, each with whether most reference answers fork."""
    votes: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        if record.split == "test":
            votes[record.prompt].append(record.tree.num_threads > 1)
    return [(prompt, sum(v) * 2 > len(v)) for prompt, v in votes.items()]


def lists_in_order(text: str) -> bool:
    """True when every numbered list counts up by one (a new list may start again at 1)."""
    last: dict[str, int] = {}
    for m in _NUMBERED.finditer(text):
        indent, number = m.group(1), int(m.group(2))
        previous = last.get(indent)
        if previous is not None and number not in (previous + 1, 1):
            return False
        last[indent] = number
        for deeper in [k for k in last if len(k) > len(indent)]:
            del last[deeper]  # a shallower item closes the nested lists below it
    return True


def well_formed(text: str) -> bool:
    return FORK not in text and CHILD not in text and lists_in_order(text)


def generate_all(model_dir: Path, prompts: list[str], params) -> list[Answer]:
    """Answer every prompt with one engine, all requests in flight together."""
    from apar.engine.engine import Engine
    from apar.quiet import quiet_transformers
    from services.router.prompt import encode_prompt
    from services.router.stream import RequestStream

    quiet_transformers()
    engine = Engine(str(model_dir))
    streams = {}
    for prompt in prompts:
        rid = engine.add_request(encode_prompt(engine.tokenizer, prompt), params)
        streams[rid] = RequestStream(engine.tokenizer, engine.fork_id, engine.child_id, engine.eos_ids)
    while engine.has_work():
        for event in engine.step().events:
            streams[event.request].feed(event)
    answers = []
    for prompt, stream in zip(prompts, streams.values()):
        final = stream.final
        usage = final.usage
        answers.append(Answer(prompt, final.text, usage["steps"], usage["completion_tokens"],
                              usage["threads"], final.finish_reason))
    return answers


@dataclass(frozen=True, slots=True)
class Report:
    prompts: int
    structured_prompts: int
    forked_share: float  # APAR answers with at least one fork, over all prompts
    forked_share_structured: float  # the same over prompts whose reference answers fork
    threads_mean: float
    well_formed_share: float
    apar_steps_mean: float
    ar_steps_mean: float
    step_ratio: float  # AR twin's steps / APAR model's steps, summed over the same prompts
    apar_tokens_mean: float
    ar_tokens_mean: float


def report(prompts: list[tuple[str, bool]], apar: list[Answer], ar: list[Answer]) -> Report:
    n = len(prompts)
    structured = [i for i, (_, s) in enumerate(prompts) if s]
    forked = [a.threads > 1 for a in apar]
    return Report(
        prompts=n,
        structured_prompts=len(structured),
        forked_share=sum(forked) / n,
        forked_share_structured=sum(forked[i] for i in structured) / max(1, len(structured)),
        threads_mean=sum(a.threads for a in apar) / n,
        well_formed_share=sum(well_formed(a.text) for a in apar) / n,
        apar_steps_mean=sum(a.steps for a in apar) / n,
        ar_steps_mean=sum(a.steps for a in ar) / n,
        step_ratio=sum(a.steps for a in ar) / max(1, sum(a.steps for a in apar)),
        apar_tokens_mean=sum(a.tokens for a in apar) / n,
        ar_tokens_mean=sum(a.tokens for a in ar) / n,
    )
