"""From what a user sends to prompt token ids: the chat template when the tokenizer has one."""
from __future__ import annotations

from apar.engine.errors import UserError

ROLES = ("system", "user", "assistant")


def encode_prompt(tokenizer, prompt: str | None = None, messages: list[dict] | None = None,
                  use_chat_template: bool = True) -> list[int]:
    """Token ids for a prompt string or chat messages; raises UserError naming what is wrong."""
    if messages:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"message {i} needs a role in {ROLES} and a string content")
            _check_text(m["content"], f"message {i}")
        if not any(m["content"].strip() for m in messages):
            raise UserError("every message is empty")
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("this model's tokenizer has no chat template: send a plain prompt")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    if prompt is None or not prompt.strip():
        raise UserError("prompt is empty")
    _check_text(prompt, "the prompt")
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return encode_prompt(tokenizer, messages=[{"role": "user", "content": prompt}])
    return [int(t) for t in tokenizer(prompt, add_special_tokens=True)["input_ids"]]


def _check_text(text: str, what: str) -> None:
    """A lone UTF-16 surrogate (JSON's `\\ud800`) is no Unicode text: the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{what} holds a lone UTF-16 surrogate at character {exc.start}: it is no Unicode "
                        "text") from None
