"""Does a trained APAR model fork, stay well-formed and save steps? Test-split prompts through the engine.

Data flow: the test split's instructions (never trained on) -> `structured` marks the ones whose
reference answers mostly fork (lists, multi-paragraph) -> each model answers every prompt on the
engine (`apar.engine.engine`), all requests batched together: the APAR model in APAR mode, its AR
twin in AR mode -> per-answer usage (steps, threads, forks), latency and text checks -> `Report`
(speed as ratios from the same run; quality: ends with EOS before max_tokens, repeated 4-grams; the
held-out loss of both models on the test split's reference answers comes from `held_out_loss`).
"""
from __future__ import annotations

import re
import statistics
import time
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
    seconds: float = 0.0  # from the batch's start until this request finished


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


def repeated_4grams(text: str) -> tuple[int, int]:
    """(word 4-grams that already occurred earlier in the text, all word 4-grams)."""
    words = text.split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return len(grams) - len(set(grams)), len(grams)


def generate_all(model_dir: Path, prompts: list[str], params) -> list[Answer]:
    """Answer every prompt with one engine, all requests in flight together."""
    from apar.engine.engine import Engine
    from apar.quiet import quiet_transformers
    from apar.engine.events import RequestFinished
    from apar.text.prompt import encode_prompt
    from apar.text.stream import RequestStream

    quiet_transformers()
    engine = Engine(str(model_dir))
    _warm_up(engine, encode_prompt(engine.tokenizer, prompts[0]), params)
    streams, done = {}, {}
    for prompt in prompts:
        rid = engine.add_request(encode_prompt(engine.tokenizer, prompt), params)
        streams[rid] = RequestStream(engine.tokenizer, engine.fork_id, engine.child_id, engine.eos_ids)
    started = time.perf_counter()
    while engine.has_work():
        for event in engine.step().events:
            streams[event.request].feed(event)
            if isinstance(event, RequestFinished):
                done[event.request] = time.perf_counter() - started
    answers = []
    for prompt, (rid, stream) in zip(prompts, streams.items()):
        final = stream.final
        usage = final.usage
        answers.append(Answer(prompt, final.text, usage["steps"], usage["completion_tokens"],
                              usage["threads"], final.finish_reason, done.get(rid, 0.0)))
    return answers


def _warm_up(engine, prompt: list[int], params) -> None:
    """One short request first, so one-time costs (allocation, first kernels) fall outside the timing."""
    import dataclasses

    engine.add_request(prompt, dataclasses.replace(params, max_tokens=4))
    while engine.has_work():
        engine.step()


def held_out_loss(model_dir: Path, records: list[TreeRecord], max_length: int = 512, batch_size: int = 4) -> float:
    """Token-weighted loss of a model on the records' restored (linear) reference answers, the control
    tokens removed from the softmax: the same tokens for an APAR model and its AR twin."""
    from apar.data.packing import ControlIds
    from apar.train.trainer import TrainConfig, Trainer, encode, load_model

    model, tokenizer = load_model(Path(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    control = ControlIds.from_tokenizer(tokenizer)
    config = TrainConfig(batch_size=batch_size, max_length=max_length, device="cpu")
    trainer = Trainer(model, tokenizer, config, Path(model_dir), groups=[{"params": []}])
    return trainer.evaluate(encode(records, tokenizer, control, max_length, flat=True), ban_control=True)


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
    threads_mean_structured: float = 0.0
    apar_eos_share: float = 0.0  # answers that ended (EOS) before max_tokens
    ar_eos_share: float = 0.0
    apar_repeated_4gram_rate: float = 0.0  # repeated word 4-grams / all word 4-grams, over all answers
    ar_repeated_4gram_rate: float = 0.0
    apar_tokens_per_s: float = 0.0  # all answers' tokens / the batch's wall time
    ar_tokens_per_s: float = 0.0
    tokens_per_s_ratio: float = 0.0  # APAR / AR
    apar_p50_s: float = 0.0  # median request latency
    ar_p50_s: float = 0.0
    p50_speedup: float = 0.0  # AR p50 / APAR p50


def _rate(answers: list[Answer]) -> float:
    counts = [repeated_4grams(a.text) for a in answers]
    return sum(r for r, _ in counts) / max(1, sum(n for _, n in counts))


def _speed(answers: list[Answer]) -> tuple[float, float]:
    """(tokens per second of the whole batch, median latency)."""
    wall = max((a.seconds for a in answers), default=0.0)
    p50 = statistics.median(a.seconds for a in answers) if answers else 0.0
    return sum(a.tokens for a in answers) / wall if wall else 0.0, p50


def report(prompts: list[tuple[str, bool]], apar: list[Answer], ar: list[Answer]) -> Report:
    n = len(prompts)
    structured = [i for i, (_, s) in enumerate(prompts) if s]
    forked = [a.threads > 1 for a in apar]
    (apar_tps, apar_p50), (ar_tps, ar_p50) = _speed(apar), _speed(ar)
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
        threads_mean_structured=sum(apar[i].threads for i in structured) / max(1, len(structured)),
        apar_eos_share=sum(a.finish_reason == "stop" for a in apar) / n,
        ar_eos_share=sum(a.finish_reason == "stop" for a in ar) / n,
        apar_repeated_4gram_rate=_rate(apar),
        ar_repeated_4gram_rate=_rate(ar),
        apar_tokens_per_s=apar_tps,
        ar_tokens_per_s=ar_tps,
        tokens_per_s_ratio=apar_tps / ar_tps if ar_tps else 0.0,
        apar_p50_s=apar_p50,
        ar_p50_s=ar_p50,
        p50_speedup=ar_p50 / apar_p50 if apar_p50 else 0.0,
    )


def markdown(result: dict, apar: list[Answer], ar: list[Answer], samples: int = 3) -> str:
    """The report as markdown: a table of the figures, then answers side by side."""
    lines = ["| measure | value |", "|---|---|"]
    for key, value in result.items():
        lines.append(f"| {key} | {round(value, 4) if isinstance(value, float) else value} |")
    picked = sorted(range(len(apar)), key=lambda i: -apar[i].threads)[:samples]
    for i in sorted(picked):
        lines += ["", f"### {apar[i].prompt.strip()[:200]}", "",
                  f"**APAR** ({apar[i].threads} threads, {apar[i].steps} steps, {apar[i].tokens} tokens, "
                  f"{apar[i].finish_reason}):", "", _quote(apar[i].text), "",
                  f"**AR twin** ({ar[i].steps} steps, {ar[i].tokens} tokens, {ar[i].finish_reason}):", "",
                  _quote(ar[i].text)]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.strip().splitlines()) or "> (empty)"
