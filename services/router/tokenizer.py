"""The router's tokenizer, loaded without torch (a router pod should start in seconds on a small image).

`transformers.AutoTokenizer` imports torch when it is installed; the fast tokenizer class alone does
not, and it reads `tokenizer.json` and the chat template as AutoTokenizer would for the models we serve.
"""
from __future__ import annotations

from pathlib import Path

from apar.engine.errors import UserError


def load_tokenizer(model_dir: str | Path):
    p = Path(model_dir)
    if not p.is_dir():
        raise UserError(f"model directory {p} does not exist")
    if not (p / "tokenizer.json").is_file():
        raise UserError(f"{p} has no tokenizer.json: the router needs a fast (tokenizers) tokenizer")
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(p))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer in {p}: {exc}") from None
