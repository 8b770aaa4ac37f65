"""Reading an OpenAI-style request body for the HTTP API (`http.py`): the parameters it may hold, each
checked by hand so an error names the offending one, and `ApiError`, OpenAI's error shape.

A parameter we do not implement (`logprobs`, `tools`, ...) is refused by name, never ignored, unless it
holds its no-op value (`logprobs: false`, `logit_bias: {}`, ...), since common clients send those.
"""
from __future__ import annotations

import json
import math

from fastapi.responses import JSONResponse

from apar.engine.errors import UserError
from apar.engine.params import MAX_DEPTH, MAX_THREADS, PENALTY_RANGE, SamplingParams
from services.protocol.wire import DEFAULT_MAX_TOKENS
from services.router.gateway import GatewayError

_HTTP = {"invalid": 400, "exhausted": 429, "unavailable": 503, "deadline": 504}
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout",
          500: "internal_error"}
# accepted only with these no-op values
_NOOP = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
         "parallel_tool_calls": (None,), "functions": (None, []), "function_call": (None, "none"),
         "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "echo": (None, False), "best_of": (None, 1), "suffix": (None,),
         "store": (None, False), "metadata": (None,), "service_tier": (None, "auto"), "modalities": (None, ["text"]),
         "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,)}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user",
           "apar", "frequency_penalty", "presence_penalty", "repetition_penalty"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _COMMON | {"prompt"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after_s = status, message, param, code, \
            retry_after_s

    @classmethod
    def of(cls, exc: GatewayError) -> ApiError:
        if exc.status == "deadline":  # over HTTP only the request time limit sets a deadline
            return cls(504, "the request ran past its time limit (--http-request-timeout)", code="request_timeout")
        return cls(_HTTP[exc.status], exc.message, exc.param, exc.code, retry_after_s=exc.retry_after_s)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"), "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- reading a body -----------------------------------------------------------------------------------
def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo}, {hi}]", name)
    return float(v)


def _integer(obj: dict, name: str, lo: int, hi: int, param: str | None = None) -> int | None:
    v = obj.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"{param or name} must be an integer in [{lo}, {hi}]", param or name)
    return v


def check_names(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed:
            continue
        if name in _NOOP:
            if any(value == v and type(value) is type(v) for v in _NOOP[name]):
                continue
            raise ApiError(400, f"unsupported parameter: {name}", name, "unsupported_parameter")
        raise ApiError(400, f"unknown parameter: {name}", name, "unknown_parameter")


def read_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 8:
        raise ApiError(400, "stop must be a string or a list of at most 8 strings", "stop")
    return tuple(stop)


def read_params(body: dict, chat: bool) -> tuple[SamplingParams, str, bool]:
    """SamplingParams, the APAR stream mode and whether usage is streamed, from a request body."""
    max_tokens = _integer(body, "max_tokens", 1, 1 << 20)
    if chat:
        alt = _integer(body, "max_completion_tokens", 1, 1 << 20)
        if max_tokens is not None and alt is not None and alt != max_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ", "max_completion_tokens")
        max_tokens = max_tokens if max_tokens is not None else alt
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    n = _integer(body, "n", 1, 16) or 1
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise ApiError(400, "stream_options may hold include_usage only", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ApiError(400, "stream_options.include_usage must be a boolean", "stream_options")
        if options.get("continuous_usage_stats"):
            raise ApiError(400, "unsupported parameter: stream_options.continuous_usage_stats", "stream_options")
    apar = body.get("apar") or {}
    if not isinstance(apar, dict):
        raise ApiError(400, "apar must be an object", "apar")
    unknown = set(apar) - {"auto_parallel", "max_threads", "max_depth", "stream", "ignore_eos"}
    if unknown:
        raise ApiError(400, f"unknown parameter: apar.{sorted(unknown)[0]}", f"apar.{sorted(unknown)[0]}")
    auto_parallel, ignore_eos = apar.get("auto_parallel", True), apar.get("ignore_eos", False)
    for name, v in (("auto_parallel", auto_parallel), ("ignore_eos", ignore_eos)):
        if not isinstance(v, bool):
            raise ApiError(400, f"apar.{name} must be a boolean", f"apar.{name}")
    mode = apar.get("stream", "linear")
    if mode not in ("linear", "threads"):
        raise ApiError(400, "apar.stream must be linear or threads", "apar.stream")
    kw = {}
    for name in ("max_threads", "max_depth"):
        v = _integer(apar, name, 0 if name == "max_depth" else 1, MAX_DEPTH if name == "max_depth" else MAX_THREADS,
                     f"apar.{name}")
        if v is not None:
            kw[name] = v
    if seed is not None:
        seed %= 1 << 63  # OpenAI seeds may be negative; ours are unsigned
    for name in ("frequency_penalty", "presence_penalty"):
        kw[name] = _number(body, name, -PENALTY_RANGE, PENALTY_RANGE, 0.0)
    kw["repetition_penalty"] = _repetition_penalty(body)
    try:
        params = SamplingParams(
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS, temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
            top_p=_number(body, "top_p", 0.0, 1.0, 1.0) or 1e-6, seed=seed, n=n, auto_parallel=auto_parallel,
            ignore_eos=ignore_eos, **kw)
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    return params, mode, include_usage


def _repetition_penalty(body: dict) -> float:
    """vLLM's extension: a number > 0 (1, the default, is off)."""
    v = body.get("repetition_penalty")
    if v is None:
        return 1.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ApiError(400, "repetition_penalty must be a number > 0", "repetition_penalty")
    return float(v)


def read_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in _ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(_ROLES)}", f"messages[{i}].role")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ApiError(400, f"unsupported parameter: messages[{i}].{sorted(extra)[0]}", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": _ROLES[m["role"]], "content": content})
    return out


def read_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be one string (batches and token ids are not supported)", "prompt")
    return prompt


def is_unicode(body) -> bool:
    """Whether every string of a parsed JSON body is Unicode text: JSON's `\\ud800` escapes may leave a
    lone surrogate in a Python string, which no tokenizer or encoder takes."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    except RecursionError:  # nested deeper than the encoder goes: some check below refuses it by name
        return True
    return True
