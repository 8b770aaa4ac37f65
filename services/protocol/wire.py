"""Worker API messages <-> the shared event and parameter types. Torch-free: the router and the worker both use it."""
from __future__ import annotations

from apar.engine.errors import UserError
from apar.engine.events import (
    Event,
    FinishReason,
    RequestFinished,
    ThreadFinished,
    ThreadStarted,
    TokenEvent,
    Usage,
)
from apar.engine.params import SamplingParams

DEFAULT_MAX_TOKENS = 256


def params_from_pb(sampling, limits, auto_regressive: bool) -> SamplingParams:
    """SamplingParams from the shared proto messages; UserError names a bad field."""
    kw = {}
    if sampling.HasField("max_tokens"):
        kw["max_tokens"] = int(sampling.max_tokens)
    if sampling.HasField("top_p"):
        kw["top_p"] = float(sampling.top_p)
    if sampling.HasField("seed"):
        kw["seed"] = int(sampling.seed)
    if sampling.HasField("n"):
        kw["n"] = int(sampling.n)
    if sampling.HasField("repetition_penalty"):
        kw["repetition_penalty"] = float(sampling.repetition_penalty)
    if limits.HasField("max_threads"):
        kw["max_threads"] = int(limits.max_threads)
    if limits.HasField("max_depth"):
        kw["max_depth"] = int(limits.max_depth)
    if len(sampling.stop_token_ids) > 64:
        raise UserError("at most 64 stop_token_ids")
    return SamplingParams(
        max_tokens=kw.pop("max_tokens", DEFAULT_MAX_TOKENS), temperature=float(sampling.temperature),
        top_k=int(sampling.top_k), stop_token_ids=tuple(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
        frequency_penalty=float(sampling.frequency_penalty), presence_penalty=float(sampling.presence_penalty),
        auto_parallel=not auto_regressive, **kw,
    )


def params_to_pb(params: SamplingParams, pb):
    """(SamplingParameters, Limits, auto_regressive) for a request the router forwards."""
    sampling = pb.common_pb2.SamplingParameters(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos, n=params.n,
        repetition_penalty=params.repetition_penalty, frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty)
    if params.seed is not None:
        sampling.seed = params.seed
    limits = pb.common_pb2.Limits(max_threads=params.max_threads, max_depth=params.max_depth)
    return sampling, limits, not params.auto_parallel


def usage_to_pb(usage: Usage, pb):
    return pb.common_pb2.Usage(**usage.as_dict())


def events_to_pb(events: list[Event], pb):
    """One step's events of one request -> WorkerEvents (consecutive tokens of a thread in one entry)."""
    w = pb.worker_pb2
    out = w.WorkerEvents()
    for ev in events:
        if isinstance(ev, TokenEvent):
            last = out.events[-1] if out.events else None
            if last is not None and last.WhichOneof("event") == "tokens" and last.tokens.thread == ev.thread:
                last.tokens.tokens.append(ev.token)
            else:
                out.events.add(tokens=w.ThreadTokens(thread=ev.thread, tokens=[ev.token]))
        elif isinstance(ev, ThreadStarted):
            started = w.ThreadStarted(thread=ev.thread, anchor=ev.anchor)
            if ev.parent is not None:
                started.parent = ev.parent
            out.events.add(started=started)
        elif isinstance(ev, ThreadFinished):
            out.events.add(finished=w.ThreadFinished(thread=ev.thread, reason=ev.reason.value))
        elif isinstance(ev, RequestFinished):
            out.events.add(done=w.RequestDone(reason=ev.reason.value, usage=usage_to_pb(ev.usage, pb),
                                              error=ev.error or ""))
    return out


def events_from_pb(request_id: str, msg) -> list[Event]:
    """WorkerEvents -> engine events, for the router's stitcher."""
    out: list[Event] = []
    for e in msg.events:
        kind = e.WhichOneof("event")
        if kind == "tokens":
            out.extend(TokenEvent(request_id, e.tokens.thread, int(t)) for t in e.tokens.tokens)
        elif kind == "started":
            parent = e.started.parent if e.started.HasField("parent") else None
            out.append(ThreadStarted(request_id, e.started.thread, parent, e.started.anchor))
        elif kind == "finished":
            out.append(ThreadFinished(request_id, e.finished.thread, FinishReason(e.finished.reason)))
        elif kind == "done":
            u = e.done.usage
            usage = Usage(**{k: getattr(u, k) for k in Usage.__slots__})
            out.append(RequestFinished(request_id, FinishReason(e.done.reason), usage, e.done.error or None))
    return out
